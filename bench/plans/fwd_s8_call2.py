"""Session 8, call 2: plans for `bench/attention.py --parts fplan --fwd-plan A,B,C` (one process,
JSON written to the three paths given). A: fwd+bwd checks of the new D 128 causal <= 2k backward
default (rows + early dS / dV + one loop + one ring mbarrier) through the dispatch at 2048 (the
shape of the deferred-dq race, and MQA window 300) and of the same without one mbarrier
(`rows_ol`), then D 128 causal fwd+bwd at 1k (kernel times of the default) and 2k against the
old defaults, `rows_ol` and the anchors. B: forward checks of D 128 causal 1k candidates (64-key
blocks, a 3-deep K/V ring), then the forward cells: D 64 full 1k / 2k (two warpgroups on
tokamax's structure, the 4k default), D 128 full 16k (forward-only tile order, second run),
D 128 causal 1k (bk64, s3, bk64_s3), D 128 full 4k / 1k (tile order). C: D 128 full fwd+bwd 1k
(the session-5 rows kernel with and without one mbarrier against the deferred-dq default)."""
import json
import sys

from _plan import (
    FA3,
    FTF,
    KW,
    LE,
    LEAN_OL1B,
    MB,
    NAB,
    NF,
    OBS,
    PERS,
    ROWS_DEFER,
    ROWS_OL,
    RW,
    WG2,
    WP,
    o,
)

TK64 = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, LE, RW)   # = the D 64 full 2k-4k default
BK64, S3 = dict(block_k=64), dict(mgpu_stages=3)
FB = "fwd+bwd"
ROWS_DV = dict(MB, mgpu_bwd_rows=True, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True)
plan_a = dict(anchors=True, rounds=20, sample_ms=12,
              fb_checks=[[2, 2048, 4, 4, 128, True, None, {}],
                         [1, 2048, 8, 1, 128, True, 300, {}],
                         [2, 1000, 8, 2, 128, True, None, ROWS_OL]],
              cells=[[128, True, 1024, [["rows_defer", ROWS_DEFER], ["rows_ol", ROWS_OL],
                                        ["lean_ol1b", LEAN_OL1B]],
                      True, FB, ["default"]],
                     [128, True, 2048, [["lean_ol1b", LEAN_OL1B], ["rows_ol", ROWS_OL]],
                      True, FB]])
plan_b = dict(anchors=True, rounds=20, sample_ms=12,
              checks=[[2, 1000, 8, 2, 128, True, None, o(BK64)],
                      [2, 1000, 8, 2, 128, True, None, o(S3)],
                      [2, 1000, 8, 2, 128, True, None, o(BK64, S3)]],
              cells=[[64, False, 1024, [["tk64", TK64]]],
                     [64, False, 2048, [["tk64", TK64]]],
                     [128, False, 16384, [["ftf", o(FTF)]]],
                     [128, True, 1024, [["bk64", o(BK64)], ["s3", o(S3)],
                                        ["bk64_s3", o(BK64, S3)]]],
                     [128, False, 4096, [["ftf", o(FTF)]]],
                     [128, False, 1024, [["ftf", o(FTF)]]]])
plan_c = dict(anchors=True, rounds=20, sample_ms=12,
              cells=[[128, False, 1024, [["rows_dv", ROWS_DV],
                                         ["rows_dv_1b", dict(ROWS_DV, mgpu_bwd_one_bar=True)]],
                      True, FB]])
for path, plan in zip(sys.argv[1:4], (plan_a, plan_b, plan_c), strict=True):
    with open(path, "w") as f:
        json.dump(plan, f)

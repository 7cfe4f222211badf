"""Session 8, call 1: plans for `bench/attention.py --parts fplan --fwd-plan A,B` (one process,
JSON written to the two paths given). A: the fwd+bwd check of rows + deferred dq + one loop
(never GPU-checked), then D 128 causal fwd+bwd 1k interleaved: the <= 1k default (rows +
deferred dq) against the > 1k default (lean + one loop + one mbarrier), rows + one loop + one
mbarrier and rows + deferred dq + one loop. B: forward checks of the new forward-only tile order
(`mgpu_fwd_tiles_fastest`) and of tokamax's structure at causal, then the forward cells D 128
causal 1k, D 64 full 1k, D 128 full 16k, then D 128 causal fwd+bwd 2k (the boundary)."""
import json
import sys

from _plan import (
    FA3,
    FTF,
    KW,
    LE,
    LEAN_OL1B,
    NAB,
    NF,
    OBS,
    PERS,
    ROWS_DEFER,
    ROWS_DEFER_OL,
    ROWS_OL1B,
    RW,
    SNAKE,
    WG2,
    WP,
    o,
)

TK = o(PERS, FA3, KW, WP, NF, OBS, LE, RW)                # tokamax's structure (D 128 full)
S7C = o(RW, WP, NF, OBS)                                  # the > 1k D 128 causal additions
TK64 = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, LE, RW)
FB = "fwd+bwd"
plan_a = dict(anchors=True, rounds=20, sample_ms=12,
              fb_checks=[[2, 1000, 8, 2, 128, True, None, ROWS_DEFER_OL]],
              cells=[[128, True, 1024, [["lean_ol1b", LEAN_OL1B], ["rows_ol1b", ROWS_OL1B],
                                        ["rows_defer_ol", ROWS_DEFER_OL]], True, FB,
                      ["default", "tokamax", "cudnn"]]])
plan_b = dict(anchors=True, rounds=20, sample_ms=12,
              checks=[[2, 1000, 4, 2, 64, False, None, o(LE, RW, FTF)],
                      [2, 1000, 8, 2, 128, True, None, TK],
                      [2, 1000, 8, 2, 128, True, None, o(TK, SNAKE)],
                      [2, 777, 4, 2, 128, False, None, o(FTF)],
                      [2, 1000, 8, 2, 128, True, None, o(S7C, FTF)]],
              cells=[[128, True, 1024, [["s7c", S7C], ["tk", TK], ["tk_snake", o(TK, SNAKE)],
                                        ["s7c_ftf", o(S7C, FTF)]]],
                     [64, False, 1024, [["le_rw_ftf", o(LE, RW, FTF)], ["tk64", TK64],
                                        ["tk64_ftf", o(TK64, FTF)]]],
                     [128, False, 16384, [["ftf", o(FTF)]]],
                     [128, True, 2048, [["rows_defer", ROWS_DEFER], ["rows_ol1b", ROWS_OL1B]],
                      True, FB]])
for path, plan in zip(sys.argv[1:3], (plan_a, plan_b), strict=True):
    with open(path, "w") as f:
        json.dump(plan, f)

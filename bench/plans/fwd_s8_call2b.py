"""Session 8, call 2b (90 s): plan for `bench/attention.py --parts fplan --fwd-plan P` (JSON
written to the path given): the second run of D 64 full forward at 2k (two warpgroups on
tokamax's structure, tk64, against the <= 2k default; call 2: +3.1 %), then D 128 causal 1k
forward candidates cut from call 2 (64-key blocks, a 3-deep K/V ring; GPU-checked there)."""
import json
import sys

from _plan import FA3, KW, LE, NAB, NF, OBS, PERS, RW, WG2, WP, o

TK64 = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, LE, RW)
BK64, S3 = dict(block_k=64), dict(mgpu_stages=3)
plan = dict(anchors=True, rounds=20, sample_ms=12,
            cells=[[64, False, 2048, [["tk64", TK64]]],
                   [128, True, 1024, [["bk64", o(BK64)], ["s3", o(S3)],
                                      ["bk64_s3", o(BK64, S3)]]]])
with open(sys.argv[1], "w") as f:
    json.dump(plan, f)

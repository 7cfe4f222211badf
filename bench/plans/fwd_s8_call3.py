"""Session 8, call 3 (from merged main, 130 s): plan for `bench/attention.py --parts fplan
--fwd-plan P` (JSON written to the path given): the final same-process table of the defaults
this session changed or re-measured, each cell interleaved with jax.nn cuDNN and tokamax (24
rounds; the default timed twice: the A/A spread): fwd+bwd D 128 causal 1k (with kernel times) /
2k, D 64 full 16k (session 7's 0.96), D 128 full 1k; forward D 64 full 1k / 2k, D 128 causal 1k,
D 128 full 16k."""
import json
import sys

FB = "fwd+bwd"
plan = dict(anchors=True, rounds=24, sample_ms=12,
            cells=[[128, True, 1024, [], True, FB, ["default"]],
                   [128, True, 2048, [], True, FB],
                   [64, False, 16384, [], True, FB],
                   [128, False, 1024, [], True, FB],
                   [64, False, 1024, []],
                   [64, False, 2048, []],
                   [128, True, 1024, []],
                   [128, False, 16384, []]])
with open(sys.argv[1], "w") as f:
    json.dump(plan, f)

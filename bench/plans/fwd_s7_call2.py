"""Session 7, call 2: forward plan for `bench/attention.py --parts fplan --fwd-plan` (JSON on
stdout). `checks_le`: the two checks with the new tile end (own process: a hang loses only
them); `main FILE`: the other checks, then the interleaved cells (20 rounds of ~12 ms samples),
without the variants whose new options no check (in FILE or in this plan's own checks) passed.
The persistent forms (tokamax's structure) were cut from call 1 by a too-short check limit."""
import json
import sys

from _plan import FA3, KW, LE, NAB, NF, OBS, PERS, QL2, RW, SP, TF, WG2, WP, keep_checked, o, passed

TK = o(PERS, FA3, KW, WP, NF, OBS, LE, RW)                # tokamax's structure in full
TK_NOLE = o(PERS, FA3, KW, WP, NF, OBS, RW)
WG2_TK = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, LE, RW)
WG2_TK_NOLE = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, RW)
checks_le = [[2, 777, 4, 2, 128, False, None, o(TK, TF)],
             [2, 1000, 4, 2, 64, False, None, o(WG2_TK, TF)]]
checks_main = [[2, 777, 4, 2, 128, False, None, o(TK_NOLE, TF)],
               [2, 1000, 4, 2, 64, False, None, o(WG2_TK_NOLE, TF)],
               [1, 1500, 4, 2, 128, False, None, o(PERS, TF, QL2)],
               [2, 1000, 4, 2, 64, False, None, o(WG2_TK_NOLE, TF, QL2)]]
cells = [
    [128, False, 4096, [["rw_obs", o(RW, OBS)], ["pers", o(PERS)], ["pers_tf", o(PERS, TF)],
                        ["pers_fa3_kw", o(PERS, FA3, KW)], ["tk_nole", TK_NOLE],
                        ["tk", TK], ["tk_tf", o(TK, TF)], ["pers_tf_ql2", o(PERS, TF, QL2)],
                        ["tk_tf_ql2", o(TK, TF, QL2)]]],
    [64, False, 4096, [["nab_sp_rw", o(NAB, SP, RW)], ["wg2_pers", o(WG2, FA3, PERS, NAB)],
                       ["wg2_pers_tf", o(WG2, FA3, PERS, NAB, TF)], ["wg2_tk", WG2_TK],
                       ["wg2_tk_tf", o(WG2_TK, TF)], ["wg2_tk_tf_ql2", o(WG2_TK, TF, QL2)]]],
    [128, False, 16384, [["rw_obs", o(RW, OBS)], ["tk", TK], ["tk_tf", o(TK, TF)],
                         ["tk_tf_ql2", o(TK, TF, QL2)]]],
    [128, True, 16384, [["rw_wp_nf_obs", o(RW, WP, NF, OBS)]]],
    [64, False, 1024, [["le_rw", o(LE, RW)], ["tf", o(TF)], ["le_rw_tf", o(LE, RW, TF)],
                       ["le_rw_tf_ql2", o(LE, RW, TF, QL2)]]],
    [128, False, 1024, [["tf", o(TF)], ["tk", TK], ["tk_tf", o(TK, TF)],
                        ["tk_tf_ql2", o(TK, TF, QL2)]]],
]
# options never run on the GPU before this session (a variant needs a passing check with all
# of its own); session-6 options (fa3, kw, nab, persistent, wp, nf) passed there
NEW = ("mgpu_fwd_lean_end", "mgpu_fwd_read_wait", "mgpu_fwd_ob_split", "mgpu_tiles_fastest",
       "mgpu_fwd_skip_pad")     # (mgpu_fwd_q_l2, an L2 prefetch, has its own checks in `main`)
CALL1_OK = [(128, o(RW, OBS)), (64, o(NAB, SP, WP, NF, OBS, RW)), (128, o(WP, NF, OBS, RW))]


def plan(checks, cells_):
    return json.dumps(dict(anchors=True, rounds=20, sample_ms=12, checks=checks,
                           cells=cells_))


if sys.argv[1] == "checks_le":
    print(plan(checks_le, []))
else:
    ok = passed(sys.argv[2:]) + CALL1_OK + [(c[4], c[7]) for c in checks_main]
    print(plan(checks_main, keep_checked(cells, ok, NEW)))

"""Session 7, call 1: the forward plan for `bench/attention.py --parts fplan --fwd-plan` (JSON
on stdout): `checks` gives the forward-only checks of the new combinations (those with the new
tile-end protocol last: a hang loses only them), `cells FILE` the interleaved cells (10 rounds)
without the variants whose new options no check in FILE (the checks' output) passed."""
import json
import sys

from _plan import FA3, KW, LE, NAB, NF, OBS, PERS, RW, SP, WG2, WP, keep_checked, o, passed

TK = o(PERS, FA3, KW, WP, NF, OBS, LE, RW)                # tokamax's structure in full
WG2_TK = o(WG2, FA3, PERS, NAB, KW, WP, NF, OBS, LE, RW)
TK_NOLE = {k: v for k, v in TK.items() if k != "mgpu_fwd_lean_end"}
WG2_TK_NOLE = {k: v for k, v in WG2_TK.items() if k != "mgpu_fwd_lean_end"}
checks = [
    [1, 1500, 4, 2, 128, False, None, o(OBS, RW)],
    [1, 2500, 4, 2, 64, False, None, o(NAB, SP, WP, NF, OBS, RW)],
    [2, 1000, 8, 2, 128, True, None, o(WP, NF, OBS, RW)],
    [2, 1000, 8, 2, 64, True, None, o()],                # default: snake + static nf ids
    [1, 777, 4, 2, 128, False, None, TK_NOLE],
    [2, 1000, 4, 2, 64, False, None, o(WG2_TK_NOLE, dict(mgpu_stages=3))],
    [1, 777, 4, 2, 128, False, None, TK],                 # the new tile end last
    [2, 1000, 4, 2, 64, False, None, o(LE, RW)],          # default (wg2 persistent) + le
]
cells = [
    [128, False, 4096, [["obs", o(OBS)], ["rw", o(RW)], ["rw_obs", o(RW, OBS)],
                        ["wp_nf_rw_obs", o(WP, NF, RW, OBS)],
                        ["fa3_kw_rw_obs", o(FA3, KW, RW, OBS)],
                        ["pers_fa3_kw", o(PERS, FA3, KW)],
                        ["tk_nole", o(PERS, FA3, KW, WP, NF, OBS, RW)], ["tk", TK]]],
    [64, False, 4096, [["nab_sp", o(NAB, SP)], ["nab_sp_rw", o(NAB, SP, RW)],
                       ["nab_sp_rw_obs", o(NAB, SP, RW, OBS)],
                       ["nab_sp_rw_wp_nf", o(NAB, SP, RW, WP, NF)],
                       ["wg2_pers", o(WG2, FA3, PERS, NAB)], ["wg2_tk", WG2_TK],
                       ["wg2_tk_s3", o(WG2_TK, dict(mgpu_stages=3))]]],
    [128, False, 16384, [["rw", o(RW)], ["rw_obs", o(RW, OBS)], ["tk", TK]]],
    [128, True, 16384, [["rw", o(RW)], ["rw_obs", o(RW, OBS)],
                        ["rw_wp_nf_obs", o(RW, WP, NF, OBS)]]],
    [128, True, 4096, [["rw", o(RW)], ["rw_obs", o(RW, OBS)],
                       ["rw_wp_nf_obs", o(RW, WP, NF, OBS)]]],
    [64, False, 1024, [["le_rw", o(LE, RW)], ["le_rw_obs", o(LE, RW, OBS)],
                       ["le_rw_wp_nf", o(LE, RW, WP, NF)]]],
    [64, True, 1024, [["rw", o(RW)]]],
    [128, False, 1024, [["rw_obs", o(RW, OBS)], ["tk", TK]]],
]
NEW = ("mgpu_fwd_lean_end", "mgpu_fwd_warp_producer", "mgpu_fwd_named_free",
       "mgpu_fwd_persistent", "mgpu_fwd_read_wait", "mgpu_fwd_skip_pad", "mgpu_fwd_ob_split")


if sys.argv[1] == "checks":
    print(json.dumps(dict(anchors=True, rounds=10, checks=checks, cells=[])))
else:
    kept = keep_checked(cells, passed(sys.argv[2:3]), NEW)
    print(json.dumps(dict(anchors=True, rounds=10, checks=[], cells=kept)))

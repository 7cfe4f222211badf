"""What the forward call plans (`fwd_s7_call*.py`) share: the Mosaic forward's option sets, `o`
to merge them, `passed` (the checks of earlier output files that passed) and `keep_checked` (a
plan's cells without the variants whose new options no passing check covers)."""
import ast
import re
import sys

M = dict(fwd_impl="mosaic")
NAB, PERS = dict(mgpu_fwd_nab=True), dict(mgpu_fwd_persistent=-1)
FA3, KW = dict(mgpu_fwd_fa3_sched=True), dict(mgpu_fwd_early_kwait=True)
WP, NF = dict(mgpu_fwd_warp_producer=True), dict(mgpu_fwd_named_free=True)
OBS, LE = dict(mgpu_fwd_ob_split=True), dict(mgpu_fwd_lean_end=True)
SP, RW = dict(mgpu_fwd_skip_pad=True), dict(mgpu_fwd_read_wait=True)
TF, QL2 = dict(mgpu_tiles_fastest=True), dict(mgpu_fwd_q_l2=True)
FTF, SNAKE = dict(mgpu_fwd_tiles_fastest=True), dict(mgpu_fwd_snake=True)
# session 8: the D 128 causal backward's option sets (forward: the dispatch's default)
MB = dict(bwd_impl="mosaic", mgpu_bwd_producer=False)
ROWS_DEFER = dict(MB, mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True)     # the <= 1k default
ROWS_DEFER_OL = dict(ROWS_DEFER, mgpu_bwd_one_loop=True)
LEAN_OL1B = dict(MB, mgpu_bwd_p_lo=True, mgpu_bwd_one_loop=True,      # the > 1k default
                 mgpu_bwd_one_bar=True)
LEAN_OL = dict(MB, mgpu_bwd_p_lo=True, mgpu_bwd_one_loop=True)
ROWS_OL1B = dict(MB, mgpu_bwd_rows=True, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                 mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True)
ROWS_OL = dict(MB, mgpu_bwd_rows=True, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
               mgpu_bwd_one_loop=True)
WG2 = dict(block_q=64, block_k=128, mgpu_fwd_wgs=2, mgpu_fwd_regs=[232, 40],
           mgpu_ping_pong=True, mgpu_fold_scale=True, mgpu_stages=2)


def o(*parts):
    """The Mosaic forward with `parts` merged in order."""
    out = dict(M)
    for p in parts:
        out.update(p)
    return out


def passed(paths):
    """[(d, options)] of the checks in the output files that passed (o and lse close)."""
    out = []
    for path in paths:
        for line in open(path):
            if not line.startswith("check {"):
                continue
            try:
                row = ast.literal_eval(line[len("check "):].strip())
            except (ValueError, SyntaxError):              # e.g. o = nan: not passed
                continue
            m = re.match(r"plan (\{.*\}) b\d+ .* d(\d+) ", row["case"])
            if (m and "error" not in row and row.get("o", 1) < 5e-3
                    and row.get("lse_max_abs", 1) < 1e-4):
                out.append((int(m.group(2)), ast.literal_eval(m.group(1))))
    return out


def keep_checked(cells, ok, new_opts):
    """`cells` ([d, causal, n, [[name, options], ...]]) without the variants that set options of
    `new_opts` no passing check in `ok` ([(d, options)], same d) set all of."""
    kept = []
    for d, causal, n, variants in cells:
        keep = []
        for name, opts in variants:
            new = {k for k in new_opts if opts.get(k)}
            if not new or any(cd == d and new <= {k for k in new_opts if co.get(k)}
                              for cd, co in ok):
                keep.append([name, opts])
            else:
                print("dropped (no passing check):", d, causal, n, name, file=sys.stderr)
        kept.append([d, causal, n, keep])
    return kept

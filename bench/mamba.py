"""Mamba-1 selective scan on one GPU: real-lowering correctness, then times against the anchors.

    PYTHONUNBUFFERED=1 python3 bench/mamba.py --out $OUT/mamba.json [--budget 220] [--quick]
        [--variant NAME] [--sweep NAME,NAME] | [--compare-fwd NAME,.. --compare-fb NAME,..]

In one run: (1) the device-to-device copy bandwidth and the exp2 rate of the special-function
units (a Pallas kernel of independent exp2 chains), which give the floors; (2) forward, final
state and all gradients of our kernels against the f32 lax.scan recurrence on ragged, grouped,
odd-N, bf16 and f32 cases, and the decode step against the full forward; (3) forward and
forward+backward times of our kernel, the jnp reference with lax.associative_scan and with
lax.scan, bf16, B=8, N=16, Dn in {2048, 4096}, L in {2k, 8k}; (4) decode step: kernel against
the jnp step. Floors: HBM = bytes of every input read once and every output written once over
the copy bandwidth; exp = one exp per (token, channel, state) element (two for
forward+backward: the backward needs the decays again) over the exp rate; floor = the larger.
Cells past the time budget are skipped and say so.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
ss = importlib.import_module("pallas_kernels.selective_scan")
from bench._common import rel_error, timeit_ms  # noqa: E402

T0 = time.perf_counter()
SMOKE = {}   # --smoke: tiny sizes in interpret mode on CPU, to check this script itself


# Back-to-back calls for about 100 ms per repetition, median of 5.
_timeit = functools.partial(timeit_ms, min_ms=100.0, reps=5)


_rel = rel_error


class _Compiler:
    """Compiles jitted functions in a thread pool (XLA releases the GIL while Triton and ptxas
    run), so that a run waits for the longest compile rather than the sum of them. Steps are
    generators: the first `next` submits their compiles, the rest runs them (see `main`)."""

    def __init__(self, budget, threads=12):
        from concurrent.futures import ThreadPoolExecutor
        self.pool, self.futs, self.budget = ThreadPoolExecutor(threads), {}, budget
        self.seconds = {}    # compile wall time per key (threads share the CPU)

    def submit(self, key, fn, *args):
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]

        def build():
            t = time.perf_counter()
            compiled = jax.jit(fn).lower(*specs).compile()
            self.seconds[key] = (round(t - T0, 1), round(time.perf_counter() - T0, 1))
            return compiled
        self.futs[key] = self.pool.submit(build)

    def wait_all(self):
        """Blocks until every submitted compile is done or the budget is spent: timing while
        compile threads run (they hold the GIL in Python lowering) adds host-side gaps between
        back-to-back calls, which inflated the ceilings and the references timed early in
        session 3's call 2."""
        from concurrent.futures import wait
        left = self.budget - (time.perf_counter() - T0)
        wait(list(self.futs.values()), timeout=max(left, 0))

    def get(self, key):
        """The compiled function; raises TimeoutError once past the budget."""
        from concurrent.futures import wait
        left = self.budget - (time.perf_counter() - T0)
        done, _ = wait([self.futs[key]], timeout=max(left, 0))
        if not done:
            raise TimeoutError("not compiled within the budget")
        return self.futs[key].result()


def _inputs(b, length, dn, n, *, groups=None, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 9)
    bc = (b, length, n) if groups is None else (b, length, groups, n)
    nrm = lambda k, shape, s=1.0: jax.random.normal(k, shape) * s
    return dict(
        u=nrm(ks[0], (b, length, dn)).astype(dtype),
        delta=nrm(ks[1], (b, length, dn), 0.5).astype(dtype) - 2.0,
        A=-jnp.exp(nrm(ks[2], (dn, n), 0.5)),
        B=nrm(ks[3], bc).astype(dtype), C=nrm(ks[4], bc).astype(dtype),
        D=nrm(ks[5], (dn,)), z=nrm(ks[6], (b, length, dn)).astype(dtype),
        delta_bias=nrm(ks[7], (dn,), 0.5), initial_state=nrm(ks[8], (b, dn, n)))


def measure_ceilings(res):
    # 2 GiB read + 2 GiB written per call; the output buffer is the donated input, so that no
    # call allocates (session 3, call 1 read 0.24 TB/s with a fresh 2 GiB output per call).
    copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jnp.ones((512 * 1024 * 1024,), jnp.float32)
    nbytes = x.nbytes
    for _ in range(3):
        x = copy(x)
    times = []
    for _ in range(5):
        x.block_until_ready()
        t = time.perf_counter()
        for _ in range(20):
            x = copy(x)
        x.block_until_ready()
        times.append((time.perf_counter() - t) / 20 * 1e3)
    ms = sorted(times)[2]
    res["hbm_tb_s"] = 2 * nbytes / ms / 1e9
    del x
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    iters, block = 512, 4096

    def kernel(x_ref, o_ref):
        def body(_, x):   # 4 independent exp2 chains per element keep the MUFU pipe full
            return tuple(jnp.exp2(v) * -0.25 for v in x)
        x = x_ref[...]
        xs = jax.lax.fori_loop(0, iters, body, (x, x + 0.1, x + 0.2, x + 0.3))
        o_ref[...] = xs[0] + xs[1] + xs[2] + xs[3]
    n = 132 * 64 * block
    f = jax.jit(pl.pallas_call(
        kernel, grid=(n // block,), in_specs=[pl.BlockSpec((block,), lambda i: (i,))],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1)))
    xe = jax.random.uniform(jax.random.key(1), (n,), jnp.float32)
    ms = _timeit(f, xe, min_ms=50)
    res["exp2_per_s"] = 4 * n * iters / (ms * 1e-3)
    print(f"ceilings: copy {res['hbm_tb_s']:.2f} TB/s, exp2 {res['exp2_per_s'] / 1e12:.2f}e12/s")


def _loss(fn, *xs, names, use, sp, w, wh):
    d = dict(zip(names, xs, strict=True))
    kw = {k: d[k] for k in use}
    y, h = fn(d["u"], d["delta"], d["A"], d["B"], d["C"], delta_softplus=sp, **kw)
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(h * wh), (y, h)


def correctness(res, comp, cfg_kw, which=None, decode=True, tag=""):
    """tag: a VARIANTS name checked besides the main config (--check-also): its rows say so."""
    cases = [  # b, L, Dn, N, groups, dtype, options, softplus
        (2, 1000, 256, 16, None, jnp.bfloat16, ("D", "z", "delta_bias"), True),
        (2, 777, 192, 16, 3, jnp.float32, ("D", "z", "delta_bias", "initial_state"), True),
        (1, 300, 96, 5, 2, jnp.float32, ("initial_state",), False),
        # session 6: grouped with 128-channel groups (the Mosaic GPU forward takes it), f32
        (2, 777, 256, 16, 2, jnp.float32, ("D", "z", "delta_bias", "initial_state"), True),
    ]
    # (index in the list above, case): the index keys the compiles, so that --check-also's
    # subset shares each case's reference with the main run (session 9 call 2b keyed them by
    # the position in the subset: a reference of another case, a pytree TypeError)
    cases = [(i, c) for i, c in enumerate(cases) if which is None or i in which]
    if SMOKE:
        cases = [(0, (1, 19, 32, 5, 2, jnp.float32, ("D", "z", "delta_bias", "initial_state"),
                      True))]
    kern = lambda *a, **k: ss.selective_scan_pallas(*a, **k, **cfg_kw, **SMOKE)
    ref = lambda *a, **k: ss.selective_scan_reference(*a, **k, method="scan")
    plans = []
    for ci, (b, length, dn, n, groups, dtype, use, sp) in cases:
        x = _inputs(b, length, dn, n, groups=groups, dtype=dtype, seed=length)
        if not sp:   # without softplus the raw delta is the step and must be positive
            x["delta"] = jax.nn.softplus(x["delta"].astype(jnp.float32)).astype(dtype)
        names = ("u", "delta", "A", "B", "C") + use
        w = jax.random.normal(jax.random.key(5), (b, length, dn))
        wh = jax.random.normal(jax.random.key(6), (b, dn, n))
        loss = functools.partial(_loss, names=names, use=use, sp=sp, w=w, wh=wh)
        xs = tuple(x[k] for k in names)
        xs32 = tuple(v.astype(jnp.float32) for v in xs)
        argn = tuple(range(len(xs)))
        comp.submit(("corr", tag, ci, "kern"),
                    jax.value_and_grad(functools.partial(loss, kern), argn, has_aux=True), *xs)
        if not tag:   # the inference forward (the session-9 backward variants do not touch it)
            comp.submit(("corr", tag, ci, "inf"), functools.partial(loss, kern), *xs)
        if ("corr", ci, "ref") not in comp.futs:    # one reference per case for all tags
            comp.submit(("corr", ci, "ref"),
                        jax.value_and_grad(functools.partial(loss, ref), argn, has_aux=True),
                        *xs32)
        plans.append((ci, b, length, dn, n, groups, dtype, use, sp, names, xs, xs32))
    # decode: 16 steps of the step kernel against the full forward
    xd = _inputs(4, 16, 512, 16, dtype=jnp.bfloat16, seed=3)
    kw = dict(D=xd["D"], delta_bias=xd["delta_bias"], delta_softplus=True)
    step = lambda h, u, d, b, c, z: ss.selective_state_update(
        h, u, d, xd["A"], b, c, z=z, **kw, backend="interpret" if SMOKE else "pallas")
    step_args = lambda h, t: (h, *(xd[k][:, t] for k in ("u", "delta", "B", "C", "z")))
    if decode:
        comp.submit(("corr", "decode"), step, *step_args(xd["initial_state"], 0))
    yield

    rows = res.setdefault("correctness", [])
    for ci, b, length, dn, n, groups, dtype, use, sp, names, xs, xs32 in plans:
        case = (f"{tag + ': ' if tag else ''}b{b} L{length} Dn{dn} N{n} G{groups} "
                f"{jnp.dtype(dtype).name} {'+'.join(use) or 'plain'} sp={sp}")
        try:
            (_, (y, h)), g = comp.get(("corr", tag, ci, "kern"))(*xs)
            y_inf, h_inf = comp.get(("corr", tag, ci, "inf"))(*xs)[1] if not tag else (y, h)
            (_, (yr, hr)), gr = comp.get(("corr", ci, "ref"))(*xs32)
        except Exception as e:   # noqa: BLE001 (keep the other cases)
            rows.append({"case": case, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"[FAIL] {case}: {rows[-1]['error']}")
            continue
        errs = {"y": _rel(y, yr), "y_inference": _rel(y_inf, yr), "final": _rel(h, hr),
                "final_inference": _rel(h_inf, hr)}
        errs.update({f"d{k}": _rel(gk, gkr) for k, gk, gkr in zip(names, g, gr, strict=True)})
        tol = 1e-4 if dtype == jnp.float32 else 2e-2
        ok = all(e < tol for e in errs.values())   # NaN fails
        rows.append({"case": case, "ok": ok, "max_err": max(errs.values()), "errs": errs})
        print(f"[{'ok' if ok else 'FAIL'}] {case}: max rel err "
              f"{rows[-1]['max_err']:.2e} ({max(errs, key=errs.get)})")
        yield
    if not decode:
        return
    try:
        yr, hr = ss.selective_scan_reference(xd["u"], xd["delta"], xd["A"], xd["B"], xd["C"],
                                             z=xd["z"], initial_state=xd["initial_state"],
                                             method="scan", **kw)
        f = comp.get(("corr", "decode"))
        h, ys = xd["initial_state"], []
        for t in range(16):
            y, h = f(*step_args(h, t))
            ys.append(y)
        e = max(_rel(jnp.stack(ys, 1), yr), _rel(h, hr))
        rows.append({"case": "decode 16 steps vs forward", "ok": e < 2e-2, "max_err": e})
        print(f"[{'ok' if e < 2e-2 else 'FAIL'}] decode: max rel err {e:.2e}")
    except Exception as e:   # noqa: BLE001
        rows.append({"case": "decode", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})


def _floors(res, b, length, dn, n):
    bw, ex = res["hbm_tb_s"] * 1e12, res["exp2_per_s"]
    seq = b * length * dn * 2                      # one bf16 [B, L, Dn] tensor
    small = 2 * b * length * n * 2 + dn * n * 4 + 2 * dn * 4
    fwd_bytes = 3 * seq + small                    # u, delta in; y out
    fb_bytes = fwd_bytes + 5 * seq + 2 * small     # + u, delta, dy in; du, ddelta out; grads
    exps = b * length * dn * n
    return {"fwd_hbm_ms": fwd_bytes / bw * 1e3, "fwd_exp_ms": exps / ex * 1e3,
            "fb_hbm_ms": fb_bytes / bw * 1e3, "fb_exp_ms": 2 * exps / ex * 1e3}


def _variants(x, cfg_kw):
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"])

    def wrap(fn):
        def f(u, delta, A, B, C, D, bias):
            return fn(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True)[0]
        return f
    fns = {"pallas": wrap(lambda *a, **k: ss.selective_scan_pallas(*a, **k, **cfg_kw, **SMOKE)),
           "associative": wrap(functools.partial(ss.selective_scan_reference,
                                                 method="associative")),
           "lax.scan": wrap(functools.partial(ss.selective_scan_reference, method="scan"))}
    return args, fns


def _vjp(fn, dy, *args):
    return jax.vjp(fn, *args)[1](dy)


def _variant_call(x, dy, spec):
    """(function, args) of a "NAME[:fb]" item: VARIANTS[NAME]'s Pallas forward, or with ":fb"
    its forward+backward (the VJP against dy)."""
    name, _, mode = spec.partition(":")
    args, fns = _variants(x, VARIANTS[name])
    if mode == "fb":
        return functools.partial(_vjp, fns["pallas"]), (dy, *args)
    return fns["pallas"], args


def benchmark(res, comp, sizes, cfg_kw, tag="main", refs_at=((8, 2048, 2048, 16),),
              modes=("fwd", "fwd+bwd")):
    """Ours at every size; the references only at the sizes in `refs_at` (the issue's anchors
    are at 8x2048x2048; at 8k x 4096 the associative scan runs out of memory). `modes`: fwd
    and / or fwd+bwd (--bench-modes)."""
    out = res.setdefault("bench", [])
    plans = []
    for b, length, dn, n in sizes:
        x = _inputs(b, length, dn, n)
        args, fns = _variants(x, cfg_kw)
        dy = jax.random.normal(jax.random.key(9), x["u"].shape, jnp.bfloat16)
        names = [k for k in fns if k == "pallas" or (b, length, dn, n) in refs_at]
        for mode in modes:
            for name in names:
                if mode == "fwd":
                    comp.submit((tag, b, length, dn, name, mode), fns[name], *args)
                else:
                    comp.submit((tag, b, length, dn, name, mode),
                                functools.partial(_vjp, fns[name]), dy, *args)
        plans.append((b, length, dn, n, names))
        del x, args, dy
    yield

    for b, length, dn, n, names in plans:
        x = _inputs(b, length, dn, n)
        args, _ = _variants(x, cfg_kw)
        dy = jax.random.normal(jax.random.key(9), x["u"].shape, jnp.bfloat16)
        row = {"tag": tag, "cfg": cfg_kw, "B": b, "L": length, "Dn": dn, "N": n,
               **_floors(res, b, length, dn, n)}
        for mode in modes:
            for name in names:
                key = f"{name} {mode}"
                try:
                    f = comp.get((tag, b, length, dn, name, mode))
                    call_args = args if mode == "fwd" else (dy, *args)
                    slow = name != "pallas" and length * dn > 2048 * 2048
                    row[key] = _timeit(f, *call_args, reps=3 if slow else 5)
                except Exception as e:   # noqa: BLE001 (budget; OOM of the references)
                    row[key] = f"error: {type(e).__name__}: {str(e)[:120]}"
                print(f"  {tag} B{b} L{length} Dn{dn} {key}: {row[key]}  "
                      f"(t={time.perf_counter() - T0:.0f}s)")
                yield
        out.append(row)
        del x, args, dy


# Kernel variants (keyword arguments of selective_scan_pallas) for --compare: "fwd" times the
# inference forward, "fb" the training forward + backward. Each is relative to the defaults of
# its time: since session 5 those include share_dt="auto", ck_unroll="auto" (the older entries
# were measured with both off; "v4" spells that configuration out).
# the session-10 training-path options off (v10 = v9 + these; its inference options are
# spelled out where they matter: v9, v8, v7 below)
V10_OFF = dict(mgpu_bwd_warp_red=False, mgpu_bwd_pair_chunk=0, mgpu_pair_train_opts=None)
# the session-9 options (mamba_bwd) off: v8's training path (the base of the session-9 entries)
S9 = dict(mgpu_bwd_pair=False, mgpu_ck_pair=False, mgpu_ck_late=False, mgpu_bwd_keep_b=False,
          mgpu_bwd_pad_rows=False, mgpu_bwd_pair_ahead=False, mgpu_bwd_direct_out=False,
          **V10_OFF)
V3 = dict(bc_rows=False, bwd_split=1)    # what the v4 defaults changed (the old variants keep it)
VARIANTS = {
    "default": {},
    "v2.1": dict(V3, chunk=8, ahead=0, bwd_ahead=0, lane_reduce=False, fast_exp=False, split=1),
    "ahead2": dict(V3, ahead=2),
    "ahead4": dict(V3, ahead=4),
    "ahead4_c8": dict(V3, ahead=4, fwd_chunk=8),
    "v3": dict(V3, ahead=2, bwd_ahead=2, lane_reduce=True),
    "v3_c4": dict(V3, ahead=2, bwd_ahead=2, lane_reduce=True, chunk=4),
    "ahead4_ftz": dict(V3, ahead=4, fast_exp=True),
    "ahead2_ftz": dict(V3, ahead=2, fast_exp=True),
    "v3_ftz": dict(V3, ahead=2, bwd_ahead=2, lane_reduce=True, fast_exp=True),
    "split2_ftz": dict(V3, split=2, ahead=4, fast_exp=True),
    "split4_ftz": dict(V3, split=4, ahead=4, fast_exp=True),
    "v3_split2_ftz": dict(V3, split=2, ahead=2, bwd_ahead=2, lane_reduce=True, fast_exp=True),
    "v3_c4_ftz": dict(V3, ahead=2, bwd_ahead=2, lane_reduce=True, fast_exp=True, chunk=4),
    "v3_c4_a1_ftz": dict(V3, ahead=1, bwd_ahead=1, lane_reduce=True, fast_exp=True, chunk=4),
    "fast_only": dict(V3, chunk=8, ahead=0, bwd_ahead=0, lane_reduce=False, fast_exp=True,
                      split=1),
    # full configurations (inference forward, training forward and backward) for call 3;
    # s2a4_c4b1 is v3, the default from session 2 to session 3's call 2
    "s2a4_c4b1": dict(V3, split=2, ahead=4, fast_exp=True, chunk=4, bwd_ahead=1,
                      lane_reduce=True),
    "s2a4_c8b1": dict(V3, split=2, ahead=4, fast_exp=True, chunk=8, bwd_ahead=1,
                      lane_reduce=True),
    "s1a2_c8b1": dict(V3, split=1, ahead=2, fast_exp=True, chunk=8, bwd_ahead=1,
                      lane_reduce=True),
    # session 3: the backward split over two lanes per channel, with and without keeping the
    # recompute's decays in registers (one exp per element in the backward instead of two)
    "bs2": dict(V3, bwd_split=2, keep_decay=True),
    "bs2_nokd": dict(V3, bwd_split=2, keep_decay=False),
    "s4": dict(V3, split=4),
    # forward: B/C as one lane row per step, loaded a chunk ahead, shuffled out per state
    "bcr": dict(bc_rows=True, bwd_split=1),
    "bcr_s4": dict(bc_rows=True, bwd_split=1, split=4),
    "bcr_bs2": dict(bc_rows=True, bwd_split=2),             # v4, the default since call 2
    "bcr_bs2_c8": dict(bc_rows=True, bwd_split=2, chunk=8),
    # backward: states permuted per lane, dB/dC butterfly without selects
    "bcr_bs2_x": dict(bc_rows=True, bwd_split=2, xor_reduce=True),
    "bcr_x": dict(bc_rows=True, bwd_split=1, xor_reduce=True),
    "bcr_s4_bs2_x": dict(bc_rows=True, bwd_split=2, xor_reduce=True, split=4),
    "cand": dict(bc_rows=True, xor_reduce=True, bwd_split=0),
    # forward: 2 / 4 of a lane's 8 states take exp2 as an FMA-pipe polynomial
    "bcr_p2": dict(bc_rows=True, poly_exp=2),
    "bcr_p4": dict(bc_rows=True, poly_exp=4),
    # forward: delta (bias + softplus) computed once per channel-step and shuffled to the parts
    "sh": dict(share_dt=True),
    "s4_sh": dict(share_dt=True, split=4),
    # candidate v5: forward split 4 while it fits one wave (else 2) with the shared delta,
    # backward with the select-free butterfly
    "v5c": dict(split=0, share_dt=True, xor_reduce=True),
    # session 4: the backward over four lanes per channel (K = 4 states per lane: fewer
    # registers, four warps per scheduler at 8x2048x2048), with 4- and 8-step chunks
    "bs4": dict(bwd_split=4),
    "bs4_c8": dict(bwd_split=4, chunk=8),
    "bs4_x": dict(bwd_split=4, xor_reduce=True),
    "sh_bs4": dict(share_dt=True, bwd_split=4),
    "sh_bs4_x": dict(share_dt=True, bwd_split=4, xor_reduce=True),
    # the dB/dC partials in bf16 (B, C bf16): half their bytes
    "bs4_x16": dict(bwd_split=4, xor_reduce=True, dbc_bf16=True),
    "bs2_16": dict(dbc_bf16=True),
    # the backward's per-channel work once per channel-step (delta shuffled from the part that
    # computed it, the step's end reduce-scattered over the parts)
    "bs4_sh": dict(bwd_split=4, bwd_share=True),
    "bs4_x_sh": dict(bwd_split=4, xor_reduce=True, bwd_share=True),
    "bs2_sh": dict(bwd_share=True),
    # the training forward unrolled over 16 steps like the inference forward (checkpoints
    # still every 4): its chunk-ahead loads come 16 steps ahead instead of 4
    "cku": dict(ck_unroll=True),
    "cku_sdt": dict(ck_unroll=True, share_dt=True),
    "cku_bsh": dict(ck_unroll=True, bwd_share=True),
    "cku_16": dict(ck_unroll=True, dbc_bf16=True),
    # diagnostics of the training forward's cost: the inference forward at the training
    # forward's 4-step chunks (no checkpoint stores), and checkpoints stored from copies
    "fc4": dict(fwd_chunk=4),
    "ckc": dict(ck_copy=True),
    "ckc_sdt": dict(ck_copy=True, share_dt=True),
    # session 5: the forward with one lane per channel holding all 16 states as an [N, 32]
    # tile, B/C rows broadcast to the lanes (vector loads of one address), the rows loaded
    # `ahead` steps early; the backward is v4's
    "tile": dict(state_tile=True, ahead=2),
    "tile4": dict(state_tile=True, ahead=4),
    "tile1": dict(state_tile=True, ahead=1),
    "tile_c8": dict(state_tile=True, ahead=2, fwd_chunk=8),
    "tile_cku": dict(state_tile=True, ahead=2, ck_unroll=True),   # 16-step training forward
    "tile_ckr": dict(state_tile=True, ahead=2, ck_copy=True),     # checkpoints row by row
    # the backward in the tile layout too (one lane per channel, dB/dC by a butterfly over
    # tiles), the reverse pass taking its decays again (_k: keeping the recompute's)
    "tile_bt": dict(state_tile=True, ahead=2, bwd_tile=True),
    "tile_bt_k": dict(state_tile=True, ahead=2, bwd_tile=True, keep_decay=True),
    # the lane-row forward with one lane per channel (all 16 states in the lane, 32 shuffles
    # per step for B/C): half the warps of v4's, no per-channel work done twice
    "s1": dict(split=1),
    # candidate default: share_dt in the inference forward, and the 16-step training forward
    # with share_dt while its grid fits one wave (cku_sdt at 8x2048x2048, v4 past one wave)
    "auto5": dict(share_dt="auto", ck_unroll="auto"),
    # the training forward over 8-step chunks (checkpoints every 4), with the shared delta
    "cku8_sdt": dict(share_dt="auto", ck_unroll=8),
    # session 6: the forward through Mosaic GPU (selective_scan_mgpu: one channel per thread
    # of a warpgroup, B/C chunks by TMA into shared memory); mgpu=True the training forward
    # too (its checkpoints feed the Triton backward), "fwd" the inference forward only
    "mg": dict(mgpu=True),
    "mg_c32": dict(mgpu=True, mgpu_chunk=32),
    "mg_s3": dict(mgpu=True, mgpu_stages=3),
    "mg_c32s3": dict(mgpu=True, mgpu_chunk=32, mgpu_stages=3),
    "mg_c8": dict(mgpu=True, mgpu_chunk=8, mgpu_stages=4),
    # the backward through Mosaic GPU too (one channel per thread, dB/dC summed over the 128
    # channels through shared memory; N <= 16)
    "mgb": dict(mgpu=True, mgpu_bwd=True),
    "mgb_c8": dict(mgpu=True, mgpu_bwd=True, mgpu_chunk=8),
    "mgb_nk": dict(mgpu=True, mgpu_bwd=True, mgpu_keep=False),   # decays taken again
    # the Mosaic GPU inference forward with two threads per channel (8 states each, 64
    # channels per program: two warps per scheduler at 8x2048x2048)
    "mg2": dict(mgpu=True, mgpu_split=2),
    "mgb2": dict(mgpu=True, mgpu_bwd=True, mgpu_split=2),
    # ... and the Mosaic backward with two threads per channel too (8-step chunks: two
    # programs per SM fit in shared memory)
    "mgb22": dict(mgpu=True, mgpu_bwd=True, mgpu_split=2, mgpu_bwd_split=2),
    # session 6 call 2 (no automatic barriers, B/C by vector loads): B/C by scalar reads
    "mgb_sc": dict(mgpu=True, mgpu_bwd=True, mgpu_vec=False),
    # the v6 default spelled out (Mosaic: inference forward one thread per channel, training
    # forward and backward two), and with the training forward at one thread per channel
    "v6": dict(mgpu=True, mgpu_bwd=True, mgpu_split=1, mgpu_bwd_split=2, mgpu_ck_unsplit=False),
    "v6_ck1": dict(mgpu=True, mgpu_bwd=True, mgpu_split=1, mgpu_bwd_split=2,
                   mgpu_ck_unsplit=True),
    # session 7: the Mosaic forward's chunk as a loop over groups of 2 / 4 / 8 unrolled steps
    # (the 16-step chunk unrolled is ~29 KB of SASS: does the instruction cache hold it?),
    # y_t in 4 partial sums, 32-step chunks as a loop of 4; 3 slots in flight; the backward's
    # 4-step sub-chunks as a loop (bl), with the training forward's 4-step loop (bl_u4)
    "mg_u2": dict(mgpu_unroll=2),
    "mg_u4": dict(mgpu_unroll=4),
    "mg_u8": dict(mgpu_unroll=8),
    "mg_y4": dict(mgpu_yacc=4),
    "mg_c32u4": dict(mgpu_chunk=32, mgpu_unroll=4),
    "s3": dict(mgpu_stages=3),
    "mg_p2": dict(mgpu_poly=2),     # 2 of 16 decays per step by the FMA-pipe polynomial
    "mg_u4s": dict(mgpu_unroll=4, mgpu_skew=True),   # + the next group's first step prepared
    "mg_u8s": dict(mgpu_unroll=8, mgpu_skew=True),
    "mg_u4p2": dict(mgpu_unroll=4, mgpu_poly=2),
    "bl": dict(mgpu_bwd_loop=True),
    "bl_u4": dict(mgpu_bwd_loop=True, mgpu_unroll=4),
    "bl1": dict(mgpu_bwd_loop=True, mgpu_bwd_split=1),   # the one-thread backward, looped
    # session 7 call 2: bl1 with the decays taken again (fewer registers), with 2 sub-chunks
    # per loop iteration; 3 / 4 slots in flight in the forward, with the 8-step loop
    "bl1nk": dict(mgpu_bwd_loop=True, mgpu_bwd_split=1, mgpu_keep=False),
    "bl1u2": dict(mgpu_bwd_loop=2, mgpu_bwd_split=1),
    # the inference forward with two lanes per channel in one warp (two warps per scheduler at
    # 8x2048x2048; softplus once per lane and step pair, partner values by shfl.xor 16)
    "mgp": dict(mgpu_pair=True),
    "mgp_s3": dict(mgpu_pair=True, mgpu_stages=3),
    "mgp_c32": dict(mgpu_pair=True, mgpu_chunk=32),
    # the pair forward as the training forward too (checkpoints in the one-thread layout, read
    # by the default two-thread backward)
    "mgpt": dict(mgpu_pair="train"),
    # both candidates: the pair inference forward and the looped one-thread backward; and
    # with the pair training forward
    "cand7": dict(mgpu_pair=True, mgpu_bwd_loop=True, mgpu_bwd_split=1),
    "cand7t": dict(mgpu_pair="train", mgpu_bwd_loop=True, mgpu_bwd_split=1),
    "mg_s4": dict(mgpu_stages=4),
    "mg_u8s3": dict(mgpu_unroll=8, mgpu_stages=3),
    # the backward's recompute of the next sub-chunk between this one's two barriers (next
    # to its dB/dC sums): two threads per channel (ba), one thread looped (ba1l)
    "ba": dict(mgpu_bwd_ahead=True),
    "ba1l": dict(mgpu_bwd_ahead=True, mgpu_bwd_split=1, mgpu_bwd_loop=True),
    # every session-7 option at once (the real-lowering check of all their code paths)
    "all7": dict(mgpu_unroll=4, mgpu_skew=True, mgpu_poly=2, mgpu_bwd_loop=True,
                 mgpu_bwd_ahead=True),
    # session 8: the inference forward with four lanes per channel (mgq: 512 programs, four
    # warps per scheduler at 8x2048x2048); the backward with two lanes per channel in one warp
    # (pb: after the pair training forward; pbnl: its sub-chunks unrolled); both (cand8)
    "mgq": dict(mgpu_pair_parts=4),
    "mgq_c16": dict(mgpu_pair_parts=4, mgpu_pair_chunk=16),
    "pb": dict(mgpu_bwd_pair=True),
    "pbnl": dict(mgpu_bwd_pair=True, mgpu_bwd_loop=False),
    # four lanes per channel in the training forward too (qt, the one-thread backward reads
    # its checkpoints) and in the backward (qb: 512 programs, four warps per scheduler)
    "qt": dict(mgpu_pair_train_parts=4),
    "qb": dict(mgpu_pair_train_parts=4, mgpu_bwd_pair=4),
    "cand8": dict(mgpu_pair_parts=4, mgpu_pair_train_parts=4, mgpu_bwd_pair=4),
    # call 2: the dB/dC row sums in registers (bank-conflict-free, one [128, 4] round trip and
    # its barrier less per sub-chunk) in the default one-thread backward (r), pb and qb
    "r": dict(mgpu_bwd_rowsum=True),     # (since v8: forces it in the two-thread backward too)
    "pbr": dict(mgpu_bwd_pair=True, mgpu_bwd_rowsum=True),
    "qbr": dict(mgpu_pair_train_parts=4, mgpu_bwd_pair=4, mgpu_bwd_rowsum=True),
    # the pair training forward in 32-step chunks (its checkpoints read by the 16-step
    # backward), alone and with r; the pair inference forward in 64-step chunks
    "pt32": dict(mgpu_pair_train_chunk=32),
    "r_pt32": dict(mgpu_bwd_rowsum=True, mgpu_pair_train_chunk=32),
    "mgp_c64": dict(mgpu_pair_chunk=64),
    "mgp_y2": dict(mgpu_yacc=2),    # the pair forwards' y_t in two interleaved partial sums
    # session 9 (mamba_fwd): the pair inference forward's body _fwd_pair_inf_body with its
    # opt-in schedules (mgpu_pair_inf): p9 none (the v8 schedule), a1 / a2 the next one / two
    # step pairs' inputs, softplus and decays ahead of this pair's updates, p1 / p2 that many
    # of a lane's 16 decays per step pair by the FMA-pipe polynomial, i delta / delta u by
    # shfl.idx, y3 three y slots and one warpgroup barrier per chunk
    # (predictions and results: docs/kernels/selective_scan.md, "Session 9: forward")
    "p9": dict(mgpu_pair_inf={}),
    "p9a1": dict(mgpu_pair_inf=dict(ahead=1)),
    "p9a2": dict(mgpu_pair_inf=dict(ahead=2)),
    "p9p1": dict(mgpu_pair_inf=dict(poly=1)),
    "p9p2": dict(mgpu_pair_inf=dict(poly=2)),
    "p9i": dict(mgpu_pair_inf=dict(idx=True)),
    "p9y3": dict(mgpu_pair_inf=dict(ybuf=3)),
    "p9a1y3": dict(mgpu_pair_inf=dict(ahead=1, ybuf=3)),
    # x: the next chunk's first step pair(s) prepared at the end of a chunk (cross)
    "p9a1x": dict(mgpu_pair_inf=dict(ahead=1, cross=True)),
    "p9a1xy3": dict(mgpu_pair_inf=dict(ahead=1, cross=True, ybuf=3)),
    # s: softplus with one MUFU op (ex2 and a log1p polynomial) instead of two
    "p9s": dict(mgpu_pair_inf=dict(sp1=True)),
    "p9a1s": dict(mgpu_pair_inf=dict(ahead=1, sp1=True)),
    "p9sp1": dict(mgpu_pair_inf=dict(sp1=True, poly=1)),
    "p9sp2": dict(mgpu_pair_inf=dict(sp1=True, poly=2)),
    "cand9": dict(mgpu_pair_inf=dict(ahead=1, poly=1, idx=True, ybuf=3, cross=True,
                                     sp1=True)),   # every option (the real-lowering check)
    # after call 1 (its SASS: the y store of each step pair keeps ptxas from hoisting the next
    # pair's B/C loads above it): d / d8 the y rows of the whole chunk / of 8 step pairs held
    # in registers and stored together (ydefer), alone and with the call-1 options
    "p9d": dict(mgpu_pair_inf=dict(ydefer=16)),
    "p9d8": dict(mgpu_pair_inf=dict(ydefer=8)),
    "p9sd": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True)),
    "p9p1d": dict(mgpu_pair_inf=dict(ydefer=16, poly=1)),
    "p9a1d": dict(mgpu_pair_inf=dict(ydefer=16, ahead=1)),
    "p9y3d": dict(mgpu_pair_inf=dict(ydefer=16, ybuf=3)),
    "p9a1xd": dict(mgpu_pair_inf=dict(ydefer=16, ahead=1, cross=True)),
    "cand9d": dict(mgpu_pair_inf=dict(ahead=1, poly=1, idx=True, ybuf=3, cross=True,
                                      sp1=True, ydefer=16)),
    # after call 2 (p9sd, -5.6 % / -6.0 %, the default since then): sp1 with y held for 8
    # step pairs, and either with one barrier per chunk (3 y slots)
    "p9sd8": dict(mgpu_pair_inf=dict(ydefer=8, sp1=True)),
    "p9syd": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, ybuf=3)),
    "p9syd8": dict(mgpu_pair_inf=dict(ydefer=8, sp1=True, ybuf=3)),
    "p9sp1d": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, poly=1)),
    "p9sdi": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, idx=True)),
    # r: A, D, bias passed as they are and laid out in the kernel (no XLA kernels before it)
    "p9sdr": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True)),
    "p9sydr": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True, ybuf=3)),
    # b (session 9, mamba_bcin): B / C read by TMA as they are ([B, L, G, N] bf16: no XLA
    # convert / concatenate / transpose kernel before the kernel), converted to f32 rows per
    # chunk inside it (the next chunk's, before commit_smem's barrier)
    "p9sdb": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, bcin=True)),
    "p9sydb": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, ybuf=3, bcin=True)),
    "p9sydrb": dict(mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True, ybuf=3, bcin=True)),
    # t (session 9, mamba_bcin): the pair TRAINING forward with y held in registers per
    # chunk (d) / per 8 step pairs (d8) and the one-MUFU softplus (s), as v9's inference
    # forward (compare with --compare-fb: the backward is v9's)
    "t9d": dict(mgpu_pair_train_opts=dict(ydefer=16)),
    "t9d8": dict(mgpu_pair_train_opts=dict(ydefer=8)),
    "t9sd": dict(mgpu_pair_train_opts=dict(ydefer=16, sp1=True)),
    "t9sd8": dict(mgpu_pair_train_opts=dict(ydefer=8, sp1=True)),
    # v7 spelled out (the default at the end of session 7: pair forwards where the one-thread
    # grid fits one program per SM, the looped one-thread backward there; v6.1 elsewhere)
    "v7": dict(mgpu_pair="auto", mgpu_pair_parts=2, mgpu_pair_train_parts=2,
               mgpu_pair_chunk=32, mgpu_pair_train_chunk=0,
               mgpu_bwd_split=0, mgpu_bwd_loop="auto", mgpu_bwd_rowsum=False, mgpu_yacc=1,
               **S9),
    # v8 spelled out (session 8: v7 + the pair training forward in 32-step chunks and the
    # one-thread backward's dB/dC rows summed in registers)
    "v8": dict(mgpu_pair="auto", mgpu_pair_parts=2, mgpu_pair_train_parts=2,
               mgpu_pair_chunk=32, mgpu_pair_train_chunk=32,
               mgpu_bwd_split=0, mgpu_bwd_loop="auto", mgpu_bwd_rowsum="auto", mgpu_yacc=1,
               **S9),
    # session 9 (mamba_bwd), each spelled out on v8 (S9 below: v8 with the six session-9
    # options off; v9 turns them on): the pair backward's shared-memory excess removed step
    # by step. pbc: pbr + the checkpoints in the ck2 layout [B, L / 4, N / 2, Dp, 2] (the
    # pair training forward stores and the pair backward reads a conflict-free row per state
    # pair); c2: v8 (one-thread backward, one 8-byte load per state pair) on ck2
    "pbc": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair=True),
    "c2": dict(S9, mgpu_ck_pair=True),
    # c2d: c2 with the checkpoints stored straight from registers (st.global, a warp's 128
    # contiguous bytes; no shared-memory slots, TMA stores or waits for them)
    "c2d": dict(S9, mgpu_ck_pair="direct"),
    # pbk: pbc with the recompute's B_t kept in registers for the reverse steps
    "pbk": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair=True, mgpu_bwd_keep_b=True),
    # the pair training forward's checkpoint stores emitted after the step group that follows
    # (h[k] not held by the store: session 8's training forward had short scoreboard 0.61 and
    # long scoreboard 0.44 cycles per issue against the inference forward's 0.23 / 0.07):
    # cl on the v8 layout, c2l on ck2, c2dl on ck2 by st.global
    "cl": dict(S9, mgpu_ck_late=True),
    "c2l": dict(S9, mgpu_ck_pair=True, mgpu_ck_late=True),
    "c2dl": dict(S9, mgpu_ck_pair="direct", mgpu_ck_late=True),
    # pbkr: pbk with the input step rows as 5 tiles (the lane parts' rows in other banks)
    "pbkr": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair=True, mgpu_bwd_keep_b=True,
                 mgpu_bwd_pad_rows=True),
    # pbka / pbkra: the recompute one sub-chunk ahead in the pair backward (in the previous
    # sub-chunk's row-sum phase: MUFU work next to the shared-memory loads; call 1's ncu put
    # ~24 % of the one-thread backward's stall samples in the row sums)
    "pbka": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair=True, mgpu_bwd_keep_b=True,
                 mgpu_bwd_pair_ahead=True),
    "pbkra": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair=True, mgpu_bwd_keep_b=True,
                  mgpu_bwd_pad_rows=True, mgpu_bwd_pair_ahead=True),
    # pbkrad: pbkra with the checkpoints stored from registers after the next step group (= v9)
    "pbkrad": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair="direct", mgpu_ck_late=True,
                   mgpu_bwd_keep_b=True, mgpu_bwd_pad_rows=True, mgpu_bwd_pair_ahead=True),
    # r4 / pbkrad4: the row sums in 4 independent partial sums (shorter FADD chains; call 1's
    # source counters: the one-thread backward's row sums ~24 % of its stall samples)
    "r4": dict(S9, mgpu_bwd_rowsum=4),
    "pbkrad4": dict(S9, mgpu_bwd_pair=True, mgpu_bwd_rowsum=4, mgpu_ck_pair="direct",
                    mgpu_ck_late=True, mgpu_bwd_keep_b=True, mgpu_bwd_pad_rows=True,
                    mgpu_bwd_pair_ahead=True),
    "pbkd": dict(S9, mgpu_bwd_pair=True, mgpu_ck_pair="direct", mgpu_bwd_keep_b=True),
    # after call 2b (v9 the default): v9 with du / ddelta stored from registers (o), and with
    # the row sums in 4 partial sums too (o4)
    "v9o": dict(mgpu_bwd_direct_out=True),
    "v9o4": dict(mgpu_bwd_direct_out=True, mgpu_bwd_rowsum=4),
    # session 9b (mamba_red): v9 with dB/dC summed over each half-warp's 16 channels by
    # shuffles, one row per warp and step through a double-buffered `red` (w); its 2 KB
    # buffers let the backward keep 16-step chunks (v9: 8), so w8 keeps v9's chunk of 8
    "v9w": dict(mgpu_bwd_warp_red=True),
    "v9w8": dict(mgpu_bwd_warp_red=True, mgpu_chunk=8),
    # (since session 10 the entries above that set only a few options are relative to v10)
    # session 10: the winners of call 2 together (v9w8 -2.1 %, t9d8 -2.8 %, t9sd -2.5 % fb at
    # 8x2048x2048), with the inference forward p9sydr (-3.4 % / -0.9 % at 2k / 8k in call 1)
    "v10a": dict(mgpu_bwd_warp_red=True, mgpu_chunk=8, mgpu_pair_train_opts=dict(ydefer=8),
                 mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True, ybuf=3)),
    "v10b": dict(mgpu_bwd_warp_red=True, mgpu_chunk=8,
                 mgpu_pair_train_opts=dict(ydefer=16, sp1=True),
                 mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True, ybuf=3)),
    "v10c": dict(mgpu_bwd_warp_red=True, mgpu_chunk=8,
                 mgpu_pair_train_opts=dict(ydefer=8, sp1=True),
                 mgpu_pair_inf=dict(ydefer=16, sp1=True, rawp=True, ybuf=3)),
    # session 10, after call 3: v10 with du / ddelta stored from registers (o, session 9's
    # v9o), and with 4-step pair-backward chunks (c4: one sub-chunk per chunk)
    "v10o": dict(mgpu_bwd_direct_out=True),
    "v10c4": dict(mgpu_bwd_pair_chunk=4),
    # session 11: the pair kernels past one program per SM (Dn 4096 at B 8, where "auto" takes
    # v6.1's one-thread forward and two-thread backward): p4k both pair forwards and the pair
    # backward (ck2), p4kb the one-thread forwards and the pair backward
    "p4k": dict(mgpu_pair="train", mgpu_bwd_split=1),
    "p4kb": dict(mgpu_bwd_split=1),     # the default since (v11)
    "v10_4k": dict(mgpu_bwd_split=2),   # v10 at Dn 4096 only (v6.1's two-thread backward)
    # session 11: three chunks in flight (shared-memory slots) in every Mosaic kernel (2 since
    # session 6, never varied)
    "st3": dict(mgpu_stages=3),
    # session 11: the pair inference forward's chunk (32 since session 7, chosen before v9 / v10
    # changed its step): 64 and 16 steps per TMA chunk
    "pc64": dict(mgpu_pair_chunk=64),
    "pc16": dict(mgpu_pair_chunk=16),
    # session 12: the pair backward's dB/dC block rows summed in the kernel by TMA reduce-add
    # into one [B, G, Lp, 32] f32 buffer (no XLA reduce of the [B, Dp / 64, Lp, 32] rows): the
    # default since (v12); v11 the fixed-order XLA sum (bitwise reproducible)
    "dba": dict(mgpu_bwd_dbc_add=True),
    "v11": dict(mgpu_bwd_dbc_add=False),
    # + A, D, bias as they are in the training forward and the backward (rawp: the kernels lay
    # them out; no XLA layout kernels: the A transpose and the D / bias broadcasts)
    "dbar": dict(mgpu_bwd_dbc_add=True, mgpu_bwd_rawp=True,
                 mgpu_pair_train_opts=dict(ydefer=8, rawp=True)),
    # session 13: the pair backward's state slots permuted by lane bits 2-3 so that the dB/dC
    # butterfly's xor-8 and xor-4 levels need no selects (6 instead of 30 per step and thread)
    "perm": dict(mgpu_bwd_perm=True),      # the default since (v13)
    "v12": dict(mgpu_bwd_perm=False),
    # + lane bit 1 too (three select-free levels), B / C rows with a pair-swapped copy
    "perm3": dict(mgpu_bwd_perm=3),
    # v13 with 16-step pair-backward chunks (8 since v10), with du / ddelta from registers
    "p16": dict(mgpu_bwd_pair_chunk=16),
    # v13 whose butterfly stops after the select-free levels (4 partial sums per lane to `red`)
    "re": dict(mgpu_bwd_red_early=True),
    "pdo": dict(mgpu_bwd_direct_out=True),
    # v13 without the recompute ahead / without B kept in registers (both v9 options, chosen
    # before warp_red and perm changed the backward's registers)
    "pna": dict(mgpu_bwd_pair_ahead=False),
    "pnk": dict(mgpu_bwd_keep_b=False),
    # v9 spelled out (session 9: v8 + the pair backward with B kept, 5-tile rows and the
    # recompute ahead, on ck2 checkpoints stored from registers after the next step group)
    "v9": dict(mgpu_pair="auto", mgpu_pair_parts=2, mgpu_pair_train_parts=2,
               mgpu_pair_chunk=32, mgpu_pair_train_chunk=32, mgpu_bwd_pair=True,
               mgpu_bwd_split=0, mgpu_bwd_loop="auto", mgpu_bwd_rowsum="auto", mgpu_yacc=1,
               mgpu_ck_pair="direct", mgpu_ck_late=True, mgpu_bwd_keep_b=True,
               mgpu_bwd_pad_rows=True, mgpu_bwd_pair_ahead=True, **V10_OFF,
               mgpu_bwd_dbc_add=False, mgpu_pair_inf=dict(sp1=True, ydefer=16)),
    # v6.1 spelled out (the default at the end of session 6: one-thread inference and training
    # forwards, the two-thread backward reading the one-thread checkpoints)
    "v61": dict(mgpu_pair=False, mgpu_split=1, mgpu_bwd=True, mgpu_bwd_split=2,
                mgpu_bwd_loop=False, mgpu_ck_unsplit=True),
    # v5 spelled out (the default of session 5: v4 + share_dt / ck_unroll "auto", Triton)
    "v5": dict(split=2, bwd_split=2, bc_rows=True, chunk=4, fwd_chunk=16, share_dt="auto",
               ck_unroll="auto", state_tile=False, bwd_tile=False, mgpu=False),
    # v4 spelled out (the default of sessions 3-4), whatever the default is now
    "v4": dict(split=2, bwd_split=2, bc_rows=True, chunk=4, fwd_chunk=16, share_dt=False,
               ck_unroll=False, state_tile=False, bwd_tile=False, mgpu=False),
}
# session 9: v8 and v7 spelled out keep v8's pair inference body (the default is sp1 + ydefer)
for _name in ("v8", "v7"):
    VARIANTS[_name] = {**VARIANTS[_name], "mgpu_pair_inf": None}


def compare(res, comp, fwd_names, fb_names, size, repeat=1, refs=True):
    """VARIANTS at one size: each checked against the associative-scan reference (the output,
    and for forward+backward every gradient), then timed; the references are timed too."""
    b, length, dn, n = size
    x = _inputs(b, length, dn, n)
    args, fns = _variants(x, {})
    dy = jax.random.normal(jax.random.key(9), x["u"].shape, jnp.bfloat16)
    fb_args = (dy, *args)
    jobs = [("associative", "fwd", fns["associative"])]
    jobs += [(k, "fwd", _variants(x, VARIANTS[k])[1]["pallas"]) for k in fwd_names]
    jobs += [("associative", "fb", fns["associative"])]
    jobs += [(k, "fb", _variants(x, VARIANTS[k])[1]["pallas"]) for k in fb_names]
    if refs:    # lax.scan timed too (the associative scan is the check of every variant)
        jobs += [("lax.scan", "fwd", fns["lax.scan"]), ("lax.scan", "fb", fns["lax.scan"])]
    for name, mode, fn in jobs:          # submitted in order of priority
        if mode == "fwd":
            comp.submit(("cmp", name, mode, size), fn, *args)
        else:
            comp.submit(("cmp", name, mode, size), functools.partial(_vjp, fn), *fb_args)
    yield

    rows = res.setdefault("compare", [])
    refs, timed = {}, []
    order = sorted(jobs, key=lambda j: (j[0] != "associative", j[0] == "lax.scan"))
    for name, mode, _ in order:
        row = {"variant": name, "mode": mode, "cfg": VARIANTS.get(name), "size": size}
        try:
            f = comp.get(("cmp", name, mode, size))
            row["compile_start_end_s"] = comp.seconds.get(("cmp", name, mode, size))
            call_args = args if mode == "fwd" else fb_args
            out = f(*call_args)
            if name == "associative":
                refs[mode] = out
            elif name != "lax.scan":
                outs, ref_outs = (out, refs[mode]) if mode == "fb" else ((out,), (refs[mode],))
                row["errs"] = [_rel(o, r) for o, r in zip(outs, ref_outs, strict=True)]
                row["max_err"] = max(row["errs"])
                row["ok"] = bool(row["max_err"] < 2e-2)   # NaN fails
            del out
            row["ms"] = _timeit(f, *call_args, reps=3 if name == "lax.scan" else 5)
            row["ms_runs"] = [row["ms"]]
            if name != "lax.scan":
                timed.append((row, f, call_args))
        except Exception as e:   # noqa: BLE001 (keep the other variants)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"  {name} {mode}: {row.get('ms')} ms, max err {row.get('max_err')} "
              f"{row.get('error', '')} (t={time.perf_counter() - T0:.0f}s)", flush=True)
        yield
    for _ in range(repeat - 1):   # more passes in turn: a transient slows one pass, not all
        for row, f, call_args in timed:
            row["ms_runs"].append(_timeit(f, *call_args))
            row["ms"] = sorted(row["ms_runs"])[(len(row["ms_runs"]) - 1) // 2]   # median
            print(f"  {row['variant']} {row['mode']}: pass {len(row['ms_runs'])} "
                  f"{row['ms_runs'][-1]:.4f} ms (t={time.perf_counter() - T0:.0f}s)", flush=True)
        yield


def timeline(items, sizes, default_size, runs=5, out=None, budget=200.0):
    """Every GPU kernel of one call of each VARIANT[:fb] at `size`, from a profiler trace
    (CUPTI) of `runs` back-to-back calls after a warm-up: per kernel name its device time and
    launches per call; per call the wall time (host clock over the loop), the kernels' busy
    time and the idle gaps between them on the stream (wall - busy: launch gaps and dispatch);
    and the last call's kernels in order (start offset, duration, gap before each). What a
    call spends outside its scan kernels is then named (XLA fusions) or a gap. An item
    VARIANT[:fb]@I runs at sizes[I]."""
    import glob
    import tempfile
    result, comp, plans, xs = {}, _Compiler(budget), [], {}
    for item in items:     # compiled in parallel
        spec, _, at = item.partition("@")
        size = sizes[int(at)] if at else default_size
        if size not in xs:
            x = _inputs(*size)
            xs[size] = (x, jax.random.normal(jax.random.key(9), x["u"].shape, jnp.bfloat16))
        x, dy = xs[size]
        f, args = _variant_call(x, dy, spec)
        comp.submit(item, f, *args)
        plans.append((item, args, size))
    comp.wait_all()
    for item, args, (b, length, dn, _) in plans:
        try:
            f = comp.get(item)
        except Exception as e:   # noqa: BLE001 (keep the others)
            print(f"timeline {item}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        for _ in range(3):
            jax.block_until_ready(f(*args))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                for _ in range(runs):
                    o = f(*args)
                jax.block_until_ready(o)
                wall_us = (time.perf_counter() - t0) / runs * 1e6
            path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
            data = jax.profiler.ProfileData.from_file(path)
            evs = []
            for plane in data.planes:
                if "gpu" not in plane.name.lower():
                    continue
                for line in plane.lines:   # the stream lines hold the kernels
                    if "xla" in line.name.lower() or not line.events:
                        continue
                    evs += [(ev.start_ns, ev.duration_ns, ev.name[:90], line.name)
                            for ev in line.events]
        evs.sort()
        per = {}
        for _, dur, nm, _ in evs:
            t, c = per.get(nm, (0, 0))
            per[nm] = (t + dur, c + 1)
        busy = sum(e[1] for e in evs) / runs / 1e3
        span = (evs[-1][0] + evs[-1][1] - evs[0][0]) / runs / 1e3 if evs else 0.0
        k = len(evs) // runs
        last, prev_end, order = evs[-k:] if k else [], None, []
        for st, dur, nm, ln in last:
            gap = 0.0 if prev_end is None else (st - prev_end) / 1e3
            order.append([nm, round((st - last[0][0]) / 1e3, 2), round(dur / 1e3, 2),
                          round(gap, 2), ln])
            prev_end = st + dur
        row = {"wall_us": round(wall_us, 1), "busy_us": round(busy, 1),
               "span_us": round(span, 1), "kernels_per_call": len(evs) / runs,
               "per_kernel_us": {nm: [round(t / runs / 1e3, 2), c / runs]
                                 for nm, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0])},
               "last_call": order}
        result[item] = row
        print(f"timeline {item} {b}x{length}x{dn}: wall {wall_us:.1f} us/call, kernels busy "
              f"{busy:.1f}, span {span:.1f}, {len(evs) / runs:g} kernels/call", flush=True)
        for nm, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            print(f"    {t / runs / 1e3:9.2f} us  x{c / runs:g}  {nm}")
        print("  last call in order (offset us, dur us, gap before us):")
        for nm, off, dur, gap, _ in order:
            print(f"    {off:9.2f} {dur:9.2f} {gap:7.2f}  {nm}")
        if out:
            with open(out, "w") as fh:
                json.dump(result, fh, indent=1)
    return result


def _decode_loop(backend, inputs, kw, h):
    """32 decode steps in one jit: launch overhead is part of decoding too."""
    def body(_, h):
        u, d, a, b, c, z = inputs
        return ss.selective_state_update(h, u, d, a, b, c, z=z, **kw, backend=backend)[1]
    return jax.lax.fori_loop(0, 32, body, h)


def decode_bench(res, comp, batches=(8, 64)):
    plans = []
    for b, dn, n in ((2, 64, 16),) if SMOKE else tuple((b, 4096, 16) for b in batches):
        x = _inputs(b, 1, dn, n)
        kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
        u, d, bb, cc, z = (x[k][:, 0] for k in ("u", "delta", "B", "C", "z"))
        for backend in ("interpret" if SMOKE else "pallas", "reference"):
            comp.submit(("decode", b, dn, backend),
                        functools.partial(_decode_loop, backend, (u, d, x["A"], bb, cc, z), kw),
                        x["initial_state"])
        plans.append((b, dn, n, x))
    yield

    rows = res.setdefault("decode", [])
    for b, dn, n, x in plans:
        row = {"B": b, "Dn": dn, "N": n,
               "state_floor_us": 2 * b * dn * n * 4 / (res["hbm_tb_s"] * 1e12) * 1e6}
        try:
            for backend in ("interpret" if SMOKE else "pallas", "reference"):
                key = "reference_us" if backend == "reference" else "pallas_us"
                row[key] = _timeit(comp.get(("decode", b, dn, backend)),
                                   x["initial_state"]) / 32 * 1e3
        except Exception as e:   # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"  decode B{b} Dn{dn}: kernel {row.get('pallas_us')} us, jnp "
              f"{row.get('reference_us')} us, floor {row['state_floor_us']:.1f} us")
        yield


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ratio(v, ours):
    return f"{v / ours:.1f}x" if isinstance(v, float) and isinstance(ours, float) else "-"


def report(res):
    print("\n| B×L×Dn | mode | Pallas ms | floor ms (HBM / exp) | ×floor | assoc ms | assoc/ours "
          "| lax.scan ms | scan/ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = list(res.get("bench", []))
    cmp = {(r["variant"], r["mode"]): r.get("ms", r.get("error")) for r in res.get("compare", [])}
    if cmp and "hbm_tb_s" in res:   # the anchor row of the main table from the comparison
        b, length, dn, n = res["compare"][0]["size"]
        row = {"tag": "main", "B": b, "L": length, "Dn": dn, "N": n,
               **_floors(res, b, length, dn, n)}
        for name, key in ((res.get("variant"), "pallas"), ("associative", "associative"),
                          ("lax.scan", "lax.scan")):
            row[f"{key} fwd"] = cmp.get((name, "fwd"))
            row[f"{key} fwd+bwd"] = cmp.get((name, "fb"))
        rows.insert(0, row)
    for r in rows:
        if r["tag"] != "main":
            continue
        for mode, pre in (("fwd", "fwd"), ("fwd+bwd", "fb")):
            ours = r.get(f"pallas {mode}")
            hbm, exp = r[f"{pre}_hbm_ms"], r[f"{pre}_exp_ms"]
            floor = max(hbm, exp)
            a, s = r.get(f"associative {mode}"), r.get(f"lax.scan {mode}")
            print(f"| {r['B']}×{r['L']}×{r['Dn']} | {mode} | {_fmt(ours)} | {floor:.3f} "
                  f"({hbm:.3f} / {exp:.3f}) | "
                  f"{(ours / floor if isinstance(ours, float) else float('nan')):.2f} | "
                  f"{_fmt(a)} | {_ratio(a, ours)} | {_fmt(s)} | {_ratio(s, ours)} |")
    for r in res.get("bench", []):
        if r["tag"] != "main":
            print(f"{r['tag']} {r['cfg']} L{r['L']} Dn{r['Dn']}: fwd {r.get('pallas fwd')} "
                  f"fwd+bwd {r.get('pallas fwd+bwd')}")
    for r in res.get("compare", []):
        print(f"compare {r['variant']} {r['mode']} {r['size']}: {_fmt(r.get('ms'))} ms, max err "
              f"{r.get('max_err')}, compiled (start, end) {r.get('compile_start_end_s')} s "
              f"{r.get('error', '')}")
    for r in res.get("correctness", []):
        print(f"[{'ok' if r.get('ok') else 'FAIL'}] {r['case']}: {r.get('max_err')} "
              f"{r.get('error', '')}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="mamba.json")
    p.add_argument("--budget", type=float, default=220.0)
    p.add_argument("--sweep", default="", help="VARIANTS names to time at the anchor size too")
    p.add_argument("--variant", default="default", help="VARIANTS name of the main kernel config")
    p.add_argument("--quick", action="store_true", help="the anchor size only, no correctness")
    p.add_argument("--report", default=None, help="print the table of a results file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode, on CPU")
    p.add_argument("--profile", default="", help="VARIANT[:fb]: run it twice at the anchor size "
                   "and exit (for ncu)")
    p.add_argument("--compare-fwd", default="", help="variants (VARIANTS) to compare, forward")
    p.add_argument("--compare-fb", default="", help="variants to compare, forward+backward")
    p.add_argument("--skip-decode", action="store_true", help="no decode step (check, timing)")
    p.add_argument("--cases", default="", help="correctness cases to run (indices, or none), "
                   "default all")
    p.add_argument("--check-also", default="", help="VARIANTS also checked against the f32 "
                   "recurrence (with real lowering), at --check-also-cases")
    p.add_argument("--check-also-cases", default="0,3", help="their cases (indices)")
    p.add_argument("--profile-runs", type=int, default=2, help="runs per --profile item")
    p.add_argument("--sizes", default="", help="bench sizes to run (indices, or none), default all")
    p.add_argument("--repeat", type=int, default=1, help="timing passes over the compared "
                   "kernels (median reported)")
    p.add_argument("--decode-batches", default="8,64", help="batch sizes of the decode timing")
    p.add_argument("--bench-also", default="", help="VARIANTS also timed at the bench sizes")
    p.add_argument("--bench-also-sizes", default="", help="their sizes (indices), default the "
                   "bench sizes")
    p.add_argument("--bench-modes", default="fwd,fwd+bwd", help="modes timed at the bench "
                   "sizes (fwd, fwd+bwd)")
    p.add_argument("--compare-size", default="0", help="index of the size of the "
                   "comparison (0: the anchor 8x2048x2048, with the references); a list "
                   "(0,2): one comparison per size in the same process, in that order")
    p.add_argument("--timeline", default="", help="VARIANT[:fb][@SIZE],..: every GPU kernel "
                   "of one call at --compare-size (or size index SIZE) from a profiler "
                   "trace (time outside the scan kernels: XLA kernels and gaps), then exit")
    p.add_argument("--timeline-runs", type=int, default=5, help="calls in the trace")
    a = p.parse_args()
    if a.smoke:
        SMOKE["interpret"] = True
    if a.report:
        report(json.load(open(a.report)))
        return
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "variant": a.variant, "argv": sys.argv[1:]}
    sizes = [(8, 2048, 2048, 16), (8, 2048, 4096, 16), (8, 8192, 2048, 16), (8, 8192, 4096, 16)]
    if a.smoke:
        res.update(hbm_tb_s=1.0, exp2_per_s=1e12)
        sizes = [(1, 40, 32, 4), (1, 24, 64, 4)]
    if a.quick:
        sizes = sizes[:1]
    cfg = VARIANTS[a.variant]
    cmp_sizes = [int(i) for i in a.compare_size.split(",")]
    if a.timeline:
        timeline([k for k in a.timeline.split(",") if k], sizes, sizes[cmp_sizes[0]],
                 a.timeline_runs, a.out, a.budget)
        sys.stdout.flush()
        os._exit(0)
    if a.profile:    # VARIANT[:fb],VARIANT[:fb],..: compiled in parallel, then each run twice
        x = _inputs(*((1, 40, 64, 4) if a.smoke else sizes[0]))
        dy = jax.random.normal(jax.random.key(9), x["u"].shape, jnp.bfloat16)
        comp, runs = _Compiler(a.budget), []
        for item in a.profile.split(","):
            f, args = _variant_call(x, dy, item)
            comp.submit(item, f, *args)
            runs.append((item, args))
        for item, args in runs:
            try:    # a variant that fails to compile must not cost the others' profiles
                f = comp.get(item)
                for _ in range(a.profile_runs):
                    jax.block_until_ready(f(*args))
            except Exception as e:   # noqa: BLE001
                print(f"profile {item}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"profile {item}: ran {a.profile_runs}x at {time.perf_counter() - T0:.0f}s",
                  flush=True)
        sys.stdout.flush()
        os._exit(0)

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    def ceilings():
        if not a.smoke:
            measure_ceilings(res)

    names = lambda v: [k for k in v.split(",") if k]
    comp = _Compiler(a.budget)
    steps, bench_sizes = [], sizes
    if a.compare_fwd or a.compare_fb:     # the variants and the references at the anchor size
        for ci in cmp_sizes:
            steps.append(("compare", compare(res, comp, names(a.compare_fwd),
                                             names(a.compare_fb), sizes[ci], a.repeat,
                                             refs=ci == 0)))
        bench_sizes = [s for i, s in enumerate(sizes) if i not in cmp_sizes]
    if not a.quick and a.cases != "none":
        which = [int(i) for i in a.cases.split(",")] if a.cases else None
        steps.append(("correctness", correctness(res, comp, cfg, which, not a.skip_decode)))
        also = [int(i) for i in a.check_also_cases.split(",")]
        for c in names(a.check_also):
            steps.append(("correctness " + c, correctness(res, comp, VARIANTS[c], also, False,
                                                          tag=c)))
    if a.sizes:
        bench_sizes = [] if a.sizes == "none" else [sizes[int(i)] for i in a.sizes.split(",")]
    modes = tuple(names(a.bench_modes))
    if bench_sizes:
        refs_at = () if a.compare_fwd or a.compare_fb else sizes[:1]
        steps.append(("bench", benchmark(res, comp, bench_sizes, cfg, refs_at=refs_at,
                                         modes=modes)))
    also_sizes = ([sizes[int(i)] for i in a.bench_also_sizes.split(",")] if a.bench_also_sizes
                  else bench_sizes)
    for c in names(a.bench_also):
        steps.append(("bench " + c, benchmark(res, comp, also_sizes, VARIANTS[c],
                                              tag=f"also {c}", refs_at=(), modes=modes)))
    for c in names(a.sweep):
        steps.append(("sweep", benchmark(res, comp, sizes[:1], VARIANTS[c], tag=f"sweep {c}",
                                         refs_at=())))
    if not a.skip_decode:
        steps.append(("decode", decode_bench(
            res, comp, tuple(int(b) for b in a.decode_batches.split(",")))))
    ready = []
    for name, gen in steps:          # submit every compile before anything runs
        try:
            next(gen)
            ready.append((name, gen))
        except Exception:   # noqa: BLE001
            res.setdefault("errors", []).append(f"{name}: {traceback.format_exc()[-2000:]}")
            print(f"{name} failed:\n{traceback.format_exc()[-2000:]}")
    comp.wait_all()
    print(f"-- compiles done (or budget spent) at {time.perf_counter() - T0:.0f}s", flush=True)
    for name, step in [("ceilings", ceilings)] + [(n, lambda g=g: [save() for _ in g])
                                                  for n, g in ready]:
        try:
            step()
        except Exception:   # noqa: BLE001 (keep what was measured)
            res.setdefault("errors", []).append(f"{name}: {traceback.format_exc()[-2000:]}")
            print(f"{name} failed:\n{traceback.format_exc()[-2000:]}")
        save()
        print(f"-- {name} done at {time.perf_counter() - T0:.0f}s")
    report(res)
    sys.stdout.flush()
    os._exit(0)   # compile threads still running past the budget must not keep the process


if __name__ == "__main__":
    main()

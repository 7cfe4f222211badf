"""Flash attention on one GPU: real-lowering correctness, then TFLOP/s against the anchors.

    PYTHONUNBUFFERED=1 python3 bench/attention.py --out $OUT/attention.json [--quick] [--budget 240]

In one run: (1) forward and gradients of our kernel against the f32 reference on ragged, GQA,
segment and window cases; the decode kernel against the reference; (2) forward and
forward+backward TFLOP/s of ours, jax.nn.dot_product_attention (cudnn, xla), JAX's bundled Triton
`mha` and (fp16, forward) `attention_mgpu`, bf16, H=16, batch x length = 16k tokens; (3) memory
versus length and one fwd+bwd at 128k; (4) decode latency against the HBM floor, cuDNN and XLA.
FLOPs: forward 4*B*H*N^2*D (halved when causal), forward+backward 3.5x that. Cells past the
time budget are skipped (and say so). `python bench/attention.py --report results.json` prints
the table and writes the PNG chart from a results file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._common import kernel_times, rel_error, timeit_ms  # noqa: E402
from pallas_kernels import attention as attn  # noqa: E402

H, TOKENS = 16, 16384


def _timeit(fn, *args, iters=None, reps=5, warm_ms=150.0):
    """timeit_ms after a warm-up of at least `warm_ms` of back-to-back calls (the GPU clock
    ramps up after the idle compile time: session 4 saw the same 1 ms kernel time at 205 and
    264 TFLOP/s in one cell), then 5 repetitions of about 40 ms each (`iters` fixes the count
    instead)."""
    out = jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warm_ms:
        out = fn(*args)
        jax.block_until_ready(out)
    if iters is not None:
        return timeit_ms(fn, *args, iters=iters, reps=reps)
    return timeit_ms(fn, *args, reps=reps, min_ms=40.0)


_rel = rel_error


def _inputs(shape_q, shape_kv, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], shape_q, dtype)
    k = jax.random.normal(ks[1], shape_kv, dtype)
    v = jax.random.normal(ks[2], shape_kv, dtype)
    do = jax.random.normal(ks[3], shape_q, dtype)
    return q, k, v, do


def _fwd_bwd(fn):

    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)
    return jax.jit(run)


def _timed(row, deadline, flops, tag, rows, fn, *args):
    """One timing row of the sweeps: ms and TFLOP/s of `fn(*args)` into `row` (or why not: the
    time budget is spent, or the error), printed under `tag` and appended to `rows`."""
    if time.time() > deadline:
        row["skipped"] = "time budget"
    else:
        try:
            ms = _timeit(fn, *args)
            row.update(ms=ms, tflops=flops / ms / 1e9)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(tag, row, flush=True)
    rows.append(row)


def _check_against_reference(rows, row, kernel, qkvdo, kw, impl_kw=None, err_chars=400):
    """Forward and q/k/v gradients of `kernel(q, k, v, **kw, **impl_kw)` against the f32
    reference with the same `kw`: relative errors into `row`, or the error; printed and
    appended to `rows`."""
    try:
        t = time.time()
        run = _fwd_bwd(lambda q, k, v: kernel(q, k, v, **kw, **(impl_kw or {})))
        run = run.lower(*qkvdo).compile()
        row["compile_s"] = round(time.time() - t, 2)
        print("compiled", row, flush=True)             # a stall after this line is a kernel's
        o, g = jax.block_until_ready(run(*qkvdo))
        f32 = [x.astype(jnp.float32) for x in qkvdo]
        o_ref, g_ref = _fwd_bwd(lambda q, k, v: attn.attention_reference(q, k, v, **kw))(*f32)
        row.update(o=_rel(o, o_ref), dq=_rel(g[0], g_ref[0]), dk=_rel(g[1], g_ref[1]),
                   dv=_rel(g[2], g_ref[2]))
    except Exception as e:  # noqa: BLE001 - a failing case is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:err_chars]}"
        traceback.print_exc(limit=4)
    print("check", row, flush=True)
    rows.append(row)


def _check_fwd_variants(results, checks, tag, seed, deadline, fa3_only):
    """Real-lowering checks of forward variants: `checks` rows (b, n, hq, hkv, d, causal,
    window, FlashConfig options); only the rows whose FA3 named-barrier flag is `fa3_only` (that
    schedule runs in its own process: a barrier protocol can hang)."""
    rows = results.setdefault("correctness", [])
    for i, (b, n_, hq, hkv, d, causal, window, extra) in enumerate(checks):
        if time.time() > deadline:
            break
        if bool(extra.get("mgpu_fwd_fa3_sched")) != fa3_only:
            continue
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=seed + i)
        row = dict(case=f"{tag} {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do),
                                 dict(causal=causal, window=window), extra, err_chars=600)


def correctness(results, max_cases=99):
    cases = [  # b, lq, lk, hq, hkv, d, causal, window, segments, dtype
        (2, 1000, 1000, 8, 2, 128, True, None, False, jnp.bfloat16),
        (1, 1000, 1000, 8, 8, 64, False, None, True, jnp.bfloat16),
        (1, 777, 1500, 4, 4, 128, True, None, False, jnp.float32),
        (1, 2048, 2048, 4, 2, 256, True, None, False, jnp.bfloat16),
        (2, 1024, 1024, 4, 2, 80, True, 100, True, jnp.bfloat16),
    ]
    # Session 4: this case stalled in two runs (and passed in one): it runs last, after the
    # decode checks, so that a stall costs only itself (see hang_probe).
    late = (1, 4097, 4097, 8, 1, 64, True, 512, False, jnp.bfloat16)
    rows = []
    results["correctness"] = rows

    def check(i, b, lq, lk, hq, hkv, d, causal, window, segs, dtype):
        q, k, v, do = _inputs((b, lq, hq, d), (b, lk, hkv, d), dtype, seed=i)
        seg = (jnp.sort(jax.random.randint(jax.random.key(99), (b, lq), 0, 4), axis=1)
               if segs else None)
        kw = dict(causal=causal, window=window, segment_ids=seg)
        row = dict(case=f"b{b} lq{lq} lk{lk} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window} seg={segs} {jnp.dtype(dtype).name}")
        _check_against_reference(rows, row, attn.flash_attention, (q, k, v, do), kw,
                                 dict(backend="pallas"))
    for i, case in enumerate(cases[:max_cases]):
        check(i, *case)
    mosaic_checks(rows, max_cases)
    decode_checks(rows)
    check(2, *late)                                   # seed 2: its seed in sessions 3-4


def mosaic_checks(rows, max_cases):
    """The Mosaic GPU forward forced (the backward per the dispatch) on the default tiles."""
    for i, (b, n, hq, hkv, d, causal, window) in enumerate(
            [(2, 1000, 8, 2, 128, True, None), (1, 2048, 4, 4, 128, False, None),
             (2, 1000, 4, 2, 64, False, None)][:max_cases]):
        q, k, v, do = _inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16, seed=50 + i)
        kw = dict(causal=causal, window=window)
        row = dict(case=f"mosaic fwd b{b} n{n} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 dict(fwd_impl="mosaic"))


def decode_checks(rows):
    """The split-KV decode kernel against the reference (ragged lengths, GQA, window)."""
    for t, hq, hkv, s, window in [(1, 32, 8, 5000, None), (4, 16, 2, 3000, 700)]:
        b, d = 3, 128
        q, k, v, _ = _inputs((b, t, hq, d), (b, s, hkv, d), jnp.bfloat16, seed=s)
        lengths = jnp.array([t, s // 2 + 3, s])
        row = dict(case=f"decode b{b} t{t} hq{hq} hkv{hkv} s{s} window={window}")
        try:
            o = attn.decode_attention(q, k, v, lengths, window=window, backend="pallas")
            ref = attn.decode_attention_reference(q, k, v, lengths, window=window)
            row["o"] = _rel(o, ref)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc(limit=3)
        print("check", row, flush=True)
        rows.append(row)


def correctness_variants(results):
    """Real-lowering checks of the call-2 variants: dq fused by atomics, the default dispatch."""
    rows = results.setdefault("correctness", [])
    cases = [  # b, n, hq, hkv, d, causal, window, segments, extra kwargs
        (2, 1000, 8, 2, 128, True, None, False, dict(bwd_impl="atomic")),
        (1, 1000, 8, 8, 64, False, None, True, dict(bwd_impl="atomic")),
        (1, 4097, 8, 1, 64, True, 512, False, dict(bwd_impl="atomic", block_k_dkv=128,
                                                   num_warps_bwd=8)),
        (2, 1000, 8, 2, 128, True, None, False, dict()),     # default dispatch (Mosaic fwd)
        (1, 2048, 4, 2, 128, True, 300, False, dict()),
    ]
    for i, (b, n, hq, hkv, d, causal, window, segs, extra) in enumerate(cases):
        q, k, v, do = _inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16, seed=70 + i)
        seg = (jnp.sort(jax.random.randint(jax.random.key(99), (b, n), 0, 4), axis=1)
               if segs else None)
        kw = dict(causal=causal, window=window, segment_ids=seg)
        row = dict(case=f"{extra or 'default'} b{b} n{n} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window} seg={segs}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 extra)
    row = dict(capability=attn._cuda_capability(),
               d128=attn.choose_fwd_impl(128, jnp.bfloat16, False, attn._cuda_capability()))
    print("dispatch", row, flush=True)
    results["dispatch"] = row


def mosaic_bwd(results, deadline, n=4096, lengths=()):
    """The Mosaic GPU backward (dq fused by TMA reduce-add): real-lowering checks, then fwd+bwd
    TFLOP/s at N=4k against the default (Triton) backward in the same process. The causal GQA
    and window checks run last, so that a hang on the first real lowering costs only them."""
    def check(cases):
        rows = results.setdefault("correctness", [])
        for i, (b, n_, hq, hkv, d, causal, window) in enumerate(cases):
            if time.time() > deadline:
                break
            q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=90 + i)
            kw = dict(causal=causal, window=window)
            row = dict(case=f"mosaic bwd b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                            f"window={window}")
            _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do),
                                     kw, dict(bwd_impl="mosaic"), err_chars=600)

    check([(1, 1024, 4, 4, 64, False, None), (1, 777, 4, 2, 128, False, None),
           (1, 1000, 4, 4, 128, True, None)])
    rows = results.setdefault("bwd_sweep", [])
    b = TOKENS // n
    for d in (128, 64):
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        for causal in (False, True):
            flops = 4 * b * H * n * n * d / (2 if causal else 1) * 3.5
            for cfg in (dict(bwd_impl="mosaic"), dict(bwd_impl="mosaic", mgpu_bwd_dq="own"),
                        dict(bwd_impl="split")):
                row = dict(d=d, causal=causal, n=n, cfg=cfg)
                kernel = functools.partial(attn.flash_attention_kernel, causal=causal, **cfg)
                _timed(row, deadline, flops, "bsweep", rows, _fwd_bwd(kernel), q, k, v, do)
    check([(2, 1000, 8, 2, 128, True, None), (1, 2048, 8, 1, 64, True, 300)])
    mbwd = [r for r in rows if r["cfg"].get("bwd_impl") == "mosaic" and "tflops" in r]
    if mbwd and lengths:
        score = {}
        for r in mbwd:
            mode = r["cfg"].get("mgpu_bwd_dq", "halves")
            score[mode] = score.get(mode, 0.0) + r["tflops"]
        best = max(score, key=score.get)
        results["chosen_mbwd"] = best
        print("mosaic backward dq mode:", best, score, flush=True)
        throughput(results, lengths, (128, 64), deadline, ["ours_mbwd"],
                   mbwd_cfg=dict(mgpu_bwd_dq=best), modes=("fwd+bwd",))


MBWD2_VARIANTS = [  # (name, flash_attention_kernel kwargs), most important first
    ("split", dict(bwd_impl="split")),
    ("mosaic", dict(bwd_impl="mosaic")),
    ("mosaic_overlap", dict(bwd_impl="mosaic", mgpu_bwd_overlap=True)),
    ("mosaic_defer", dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True)),
    ("mosaic_defer_tf", dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True, mgpu_tiles_fastest=True)),
    ("mosaic_overlap_tf", dict(bwd_impl="mosaic", mgpu_bwd_overlap=True,
                               mgpu_tiles_fastest=True)),
    ("mosaic_defer_r240", dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True,
                               mgpu_bwd_regs=(240, 24))),
    ("mosaic_overlap_r240", dict(bwd_impl="mosaic", mgpu_bwd_overlap=True,
                                 mgpu_bwd_regs=(240, 24))),
]


def mosaic_bwd2(results, deadline, n=4096, dims=(128, 64), which="all"):
    """Session 3: the Mosaic backward's FA3-order variant (S^T and dP^T issued together, dS^T
    while dV runs), dq deferred by one step, the 240/24 register split. Real-lowering checks
    against the f32 reference first, then fwd+bwd TFLOP/s at N=4k with jax.nn cuDNN in the same
    process. `which`: "all", "defer" (the deferred-dq variants plus the Mosaic baseline) or
    "nodefer" (the rest), so that a hang of one variant family costs only its own process."""
    def wanted(name):
        if which == "defer":    # session 4: the tiles-fastest and 240/24 copies are settled
            return name in ("cudnn", "mosaic", "mosaic_defer", "defer_check")
        return which == "all" or name in ("cudnn", "mosaic") or "defer" not in name
    rows = results.setdefault("correctness", [])
    for i, (b, n_, hq, hkv, d, causal, window, extra) in enumerate([
            (1, 2048, 8, 1, 64, True, 300, dict(mgpu_bwd_defer_dq=True)),
            (2, 1000, 4, 2, 64, False, None, dict(mgpu_bwd_defer_dq=True)),
            (2, 1000, 8, 2, 128, True, None, dict(mgpu_bwd_defer_dq=True)),
            (2, 1000, 8, 2, 128, True, None, dict(mgpu_bwd_overlap=True)),
            (1, 2048, 8, 1, 64, True, 300, dict(mgpu_bwd_overlap=True, mgpu_bwd_regs=(240, 24))),
            (1, 777, 4, 2, 128, False, None, dict(mgpu_bwd_overlap=True,
                                                  mgpu_bwd_regs=(240, 24)))]):
        if not wanted("defer_check" if "mgpu_bwd_defer_dq" in extra else "x"):
            continue
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=110 + i)
        kw = dict(causal=causal, window=window)
        row = dict(case=f"mosaic bwd {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 dict(bwd_impl="mosaic", **extra), err_chars=600)
    out = results.setdefault("bwd_sweep2", [])
    b = TOKENS // n
    for d in dims:
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        for causal in (False, True):
            flops = 4 * b * H * n * n * d / (2 if causal else 1) * 3.5
            fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                q, k, v, is_causal=c, implementation="cudnn"))]
            fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
                q, k, v, causal=c, **cfg)) for name, cfg in MBWD2_VARIANTS]
            for name, fn in fns:
                if not wanted(name):
                    continue
                row = dict(d=d, causal=causal, n=n, impl=name)
                _timed(row, deadline, flops, "bsweep2", out, _fwd_bwd(fn), q, k, v, do)


MBWD3_VARIANTS = [  # session 3, call 3: after the register report (D=128 spills ~740 bytes)
    ("split", dict(bwd_impl="split")),
    ("mosaic", dict(bwd_impl="mosaic")),                     # 240/24 registers (new default)
    ("mosaic_plo", dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True)),
    ("mosaic_tf", dict(bwd_impl="mosaic", mgpu_tiles_fastest=True)),
    ("mosaic_plo_tf", dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True, mgpu_tiles_fastest=True)),
    ("mosaic_defer", dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True)),
    ("mosaic_plo_bq128", dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True, block_q_dkv=128)),
]


def mosaic_bwd3(results, deadline, n=4096):
    """Session 3, call 3: GPU checks of the dS-from-bf16-P and tiles-fastest variants, then
    fwd+bwd TFLOP/s at N=4k (D 128 full, causal, D 64 full) with cuDNN in the same process."""
    rows = results.setdefault("correctness", [])
    for i, (b, n_, hq, hkv, d, causal, window, extra) in enumerate([
            (2, 1000, 8, 2, 128, True, None, dict(mgpu_bwd_p_lo=True, mgpu_tiles_fastest=True)),
            (1, 2048, 8, 1, 64, True, 300, dict(mgpu_bwd_p_lo=True, mgpu_tiles_fastest=True)),
            (2, 1000, 8, 2, 128, True, None, dict(mgpu_bwd_defer_dq=True))]):
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=150 + i)
        kw = dict(causal=causal, window=window)
        row = dict(case=f"mosaic bwd {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 dict(bwd_impl="mosaic", **extra), err_chars=600)
    out = results.setdefault("bwd_sweep3", [])
    b = TOKENS // n
    for d, causal in ((128, False), (128, True), (64, False)):
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        flops = 4 * b * H * n * n * d / (2 if causal else 1) * 3.5
        fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"))]
        fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
            q, k, v, causal=c, **cfg)) for name, cfg in MBWD3_VARIANTS
            if d == 64 or "bq128" not in name]                # 128-query steps: D 64 only
        for name, fn in fns:
            row = dict(d=d, causal=causal, n=n, impl=name)
            _timed(row, deadline, flops, "bsweep3", out, _fwd_bwd(fn), q, k, v, do)


def _variant_checks_and_times(results, deadline, name, checks, cells, variants, n=4096,
                              mode="fwd+bwd", seed=0):
    """Real-lowering checks, then TFLOP/s at N=n with jax.nn cuDNN in the same process.

    `checks`: (b, n, hq, hkv, d, causal, window, flash_attention_kernel kwargs) against the f32
    reference (into results["correctness"]); `cells`: (d, causal) pairs; `variants`: (name,
    kwargs[, head dims it runs at]) timed after cuDNN in each cell (into results[name], printed
    with tag `name`)."""
    rows = results.setdefault("correctness", [])
    for i, (b, n_, hq, hkv, d, causal, window, extra) in enumerate(checks):
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=seed + i)
        kw = dict(causal=causal, window=window)
        row = dict(case=f"{name} {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 extra, err_chars=600)
    out = results.setdefault(name, [])
    b = TOKENS // n
    for d, causal in cells:
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        flops = 4 * b * H * n * n * d / (2 if causal else 1) * (3.5 if mode != "fwd" else 1)
        fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"))]
        fns += [(var[0], lambda q, k, v, cfg=var[1], c=causal: attn.flash_attention_kernel(
            q, k, v, causal=c, **cfg)) for var in variants if len(var) < 3 or d in var[2]]
        for v_name, fn in fns:
            row = dict(d=d, causal=causal, n=n, mode=mode, impl=v_name)
            if mode == "fwd":
                _timed(row, deadline, flops, name, out, jax.jit(fn), q, k, v)
            else:
                _timed(row, deadline, flops, name, out, _fwd_bwd(fn), q, k, v, do)


def hang_probe(results, deadline, seeds=12, **impl):
    """Session 4: the D 64 causal window-512 MQA 4097 check did not finish in two runs (session 3
    call 3, session 4 call 1) and passed in one. One jitted fwd+bwd with `impl` (fwd_impl /
    bwd_impl), run on fresh random inputs per seed with a progress line before and after each
    run: a hang shows as a "start" line without its "done" line."""
    rows = results.setdefault("hang_probe", [])
    b, n, hq, hkv, d = 1, 4097, 8, 1, 64
    kw = dict(causal=True, window=512)
    fn = _fwd_bwd(lambda q, k, v: attn.flash_attention_kernel(q, k, v, **kw, **impl))
    ref = _fwd_bwd(lambda q, k, v: attn.attention_reference(q, k, v, **kw))
    for seed in range(seeds):
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16, seed=300 + seed)
        row = dict(impl=str(impl), seed=seed)
        print("hang start", row, flush=True)
        t = time.time()
        try:
            o, g = jax.block_until_ready(fn(q, k, v, do))
            row["s"] = time.time() - t
            t = time.time()
            o_ref, g_ref = jax.block_until_ready(ref(*[x.astype(jnp.float32)
                                                        for x in (q, k, v, do)]))
            row["ref_s"] = time.time() - t
            row.update(o=_rel(o, o_ref), dq=_rel(g[0], g_ref[0]), dk=_rel(g[1], g_ref[1]),
                       dv=_rel(g[2], g_ref[2]))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("hang done", row, flush=True)
        rows.append(row)


def mosaic_bwd4(results, deadline):
    """Session 4: the backward with query rows (mgpu_bwd_rows: row lse/delta, P and dS through
    SMEM), checked and timed against the default dispatch and cuDNN (N 4k)."""
    rows_cfg = dict(bwd_impl="mosaic", mgpu_bwd_rows=True)
    defer_cfg = dict(rows_cfg, mgpu_bwd_defer_dq=True)
    _variant_checks_and_times(
        results, deadline, "bwd_sweep4",
        checks=[(2, 1000, 8, 2, 128, True, None, rows_cfg),
                (1, 777, 4, 2, 128, False, None, rows_cfg),
                (1, 2048, 8, 1, 64, True, 300, defer_cfg)],
        cells=[(128, False), (128, True), (64, False), (64, True)],
        variants=[("default", {}), ("mosaic_rows", rows_cfg), ("mosaic_rows_defer", defer_cfg),
                  ("mosaic_rows_bq128", dict(rows_cfg, block_q_dkv=128), (64,))], seed=170)


WG3 = dict(fwd_impl="mosaic", block_q=64, block_k=128, mgpu_stages=2, mgpu_fwd_wgs=3,
           mgpu_fwd_regs=(160, 24))


def mosaic_fwd4(results, deadline, n=4096):
    """Session 4: the D=64 forward with 3 consumer warpgroups of 64 rows (mgpu_fwd_wgs=3, FA3's
    D=64 tile, no spills expected at 160 registers), checked, then forward TFLOP/s at N=4k
    against the default tiles and cuDNN."""
    _variant_checks_and_times(
        results, deadline, "fwd_sweep4",
        checks=[(2, 1000, 8, 2, 64, True, None, dict(WG3, mgpu_fold_scale=True)),
                (1, 1000, 4, 4, 64, False, None, dict(WG3, mgpu_stages=3))],
        cells=[(64, False), (64, True)], mode="fwd", seed=190,
        variants=[("default", {}), ("wg3_fold", dict(WG3, mgpu_fold_scale=True)),
                  ("wg3", WG3), ("wg3_s3_fold", dict(WG3, mgpu_stages=3, mgpu_fold_scale=True)),
                  ("wg3_s3", dict(WG3, mgpu_stages=3)),
                  ("wg3_fold_noping", dict(WG3, mgpu_fold_scale=True, mgpu_ping_pong=False))])


def mosaic_bwd5(results, deadline):
    """Session 4, call 2: the deferred dq at D 64 (plain and in the rows layout): GPU checks,
    then fwd+bwd at N 4k and 16k, full and causal, against the default and cuDNN."""
    defer = dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True)
    rows_defer = dict(defer, mgpu_bwd_rows=True)
    variants = [("default", {}), ("mosaic_defer", defer), ("mosaic_rows_defer", rows_defer)]
    cells = [(64, False), (64, True)]
    _variant_checks_and_times(
        results, deadline, "bwd_sweep5",
        checks=[(2, 1000, 4, 2, 64, False, None, defer),
                (1, 2048, 8, 1, 64, True, 300, defer),
                (2, 1000, 4, 2, 64, False, None, rows_defer)],
        cells=cells, variants=variants, seed=210)
    _variant_checks_and_times(results, deadline, "bwd_sweep5", checks=[], cells=cells,
                              variants=variants, n=16384)


def bwd_short(results, deadline):
    """Session 4, call 2: which backward at short lengths (1k, 2k): the Triton split kernels
    against the Mosaic backward (default options per cell) and the deferred dq, fwd+bwd; and
    D 128 causal at 16k (Triton split vs the lean Mosaic backward)."""
    variants = [("default", {}), ("split", dict(bwd_impl="split")),
                ("mosaic", dict(bwd_impl="mosaic")),
                ("mosaic_plo", dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True), (128,)),
                ("mosaic_defer", dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True), (64,))]
    cells = [(128, False), (128, True), (64, False), (64, True)]
    _variant_checks_and_times(results, deadline, "bwd_short", checks=[], n=1024, cells=cells,
                              variants=variants)
    # D 128 causal keeps the Triton backward (a tie at 4k); the lean Mosaic one at 16k:
    _variant_checks_and_times(results, deadline, "bwd_short", checks=[], n=16384,
                              cells=[(128, True)], variants=variants[1:4])
    _variant_checks_and_times(results, deadline, "bwd_short", checks=[], n=2048, cells=cells,
                              variants=variants)


def mosaic_fwd5(results, deadline):
    """Session 4, call 2: forward orderings at N 4k: FA3's intra-warpgroup overlap (64-row
    warpgroups; D 128 also with 64-key blocks), the optimization barrier before the ping-pong
    arrive, 3 consumer warpgroups without ping-pong (D 64), against cuDNN."""
    ob = dict(fwd_impl="mosaic", mgpu_fwd_opt_barrier=True)
    wg3 = dict(WG3, mgpu_ping_pong=False)
    ov = dict(fwd_impl="mosaic", mgpu_fwd_overlap=True, block_q=64,   # 64 rows per warpgroup
              mgpu_fwd_wgs=2, mgpu_fwd_regs=(232, 40), mgpu_ping_pong=True)
    _variant_checks_and_times(
        results, deadline, "fwd_sweep5",
        checks=[(1, 2048, 8, 1, 64, True, 300, ov), (1, 777, 4, 2, 128, False, None, ov),
                (2, 1000, 8, 2, 64, True, None, ob), (1, 1000, 4, 2, 64, False, None, wg3)],
        cells=[(64, False), (64, True), (128, False)], mode="fwd", seed=230,
        variants=[("default", {}), ("overlap", ov),
                  ("overlap_bk64", dict(ov, block_k=64), (128,)),
                  ("opt_barrier", ob),
                  ("wg3_noping", dict(wg3, mgpu_fold_scale=True), (64,))])


def f32_and_anchor_checks(results):
    """Session 5: the f32 case of `correctness` (Triton forward with session 1's f32 tiles,
    D 128, Lq 777 / Lk 1500, causal) and tokamax's forward and gradients against the f32
    reference (the anchor must compute the same function)."""
    rows = results.setdefault("correctness", [])
    b, lq, lk, hq, hkv, d, causal = 1, 777, 1500, 4, 4, 128, True
    q, k, v, do = _inputs((b, lq, hq, d), (b, lk, hkv, d), jnp.float32, seed=2)
    row = dict(case=f"b{b} lq{lq} lk{lk} hq{hq} hkv{hkv} d{d} causal={causal} window=None "
                    "seg=False float32")
    _check_against_reference(rows, row, attn.flash_attention, (q, k, v, do),
                              dict(causal=causal, window=None, segment_ids=None),
                              dict(backend="pallas"))
    for i, (n, hq, hkv, d, causal) in enumerate([(1000, 8, 2, 128, True),
                                                 (2048, 4, 4, 64, False)]):
        tk = _tokamax_fn(causal)
        if tk is None:
            break
        q, k, v, do = _inputs((2, n, hq, d), (2, n, hkv, d), jnp.bfloat16, seed=300 + i)
        row = dict(case=f"tokamax b2 n{n} hq{hq} hkv{hkv} d{d} causal={causal}")
        _check_against_reference(rows, row, lambda q, k, v, tk=tk, **kw: tk(q, k, v),
                                 (q, k, v, do), dict(causal=causal, window=None,
                                                     segment_ids=None))


def mosaic_fwd6(results, deadline, n=4096, fa3_only=False):
    """Session 5: forward variants at N 4k (then 1k) against cuDNN and tokamax in the same process:
    compiled without automatic barriers and reduction scratch (`mgpu_fwd_nab`, which frees the
    2 KB that kept a 3-deep ring out of SMEM at D 128), the query tiles walked last-first
    (`mgpu_fwd_reverse`, causal: longest tiles first), persistent CTAs (`mgpu_fwd_persistent`,
    one per SM: one K/V ring across tiles, the next Q loaded during the epilogue), FA3's
    ping-pong on two named barriers (`mgpu_fwd_fa3_sched`).
    Real-lowering checks first. `fa3_only`: the fa3 checks and cells alone (own process: a
    named-barrier protocol could hang), else everything but them."""
    sms = -1                                               # one persistent CTA per SM
    nab = dict(fwd_impl="mosaic", mgpu_fwd_nab=True)
    rev = dict(fwd_impl="mosaic", mgpu_fwd_reverse=True)
    pers = dict(fwd_impl="mosaic", mgpu_fwd_persistent=sms)
    s3 = dict(nab, mgpu_stages=3)
    fa3 = dict(fwd_impl="mosaic", mgpu_fwd_fa3_sched=True)
    fa3_64 = dict(fa3, block_q=64, mgpu_fwd_wgs=2, mgpu_fwd_regs=(232, 40), mgpu_ping_pong=True)
    checks = [(2, 1000, 8, 2, 128, True, None, dict(fa3, mgpu_fwd_reverse=True)),
              (1, 2048, 8, 1, 64, True, 300, fa3),
              (1, 777, 4, 2, 128, False, None, dict(fa3, mgpu_fwd_persistent=sms)),
              (2, 1000, 8, 2, 128, True, None, dict(nab, mgpu_fwd_reverse=True)),
              (1, 2048, 8, 1, 64, True, 300, dict(pers, mgpu_fwd_reverse=True)),
              (1, 777, 4, 2, 128, False, None, dict(pers, mgpu_fwd_nab=True)),
              (2, 1000, 4, 4, 64, False, None, pers),
              (1, 1500, 4, 2, 128, False, None, s3),
              (2, 1000, 4, 2, 64, False, None, dict(pers, mgpu_fwd_skip_pad=True)),
              (2, 1000, 8, 2, 128, True, None, dict(nab, block_k=192))]
    _check_fwd_variants(results, checks, "fwd6", 310, deadline, fa3_only)
    out = results.setdefault("fwd_sweep6", [])
    cells = [(128, False, n), (128, True, n), (64, False, n), (64, True, n),
             (64, False, 1024), (128, False, 1024), (64, True, 1024), (128, True, 1024)]
    for d, causal, n in cells:
        b = TOKENS // n
        q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        flops = 4 * b * H * n * n * d / (2 if causal else 1)
        fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")), ("tokamax", _tokamax_fn(causal))]
        if causal:
            variants = [("default", {}), ("rev", rev), ("fa3", fa3),
                        ("fa3_rev", dict(fa3, mgpu_fwd_reverse=True)), ("nab", nab),
                        ("pers_rev", dict(pers, mgpu_fwd_reverse=True))]
            variants += [("nab_bk192", dict(nab, block_k=192))] if d == 128 else []
        else:
            variants = [("default", {}), ("pers", pers), ("fa3", fa3 if d == 128 else fa3_64),
                        ("pers_fa3", dict(pers, **(fa3 if d == 128 else fa3_64))),
                        ("nab", nab), ("pers_nab", dict(pers, mgpu_fwd_nab=True))]
            variants += [("nab_s3", s3), ("nab_bk192", dict(nab, block_k=192))] if d == 128 \
                else [
                ("skip_pad", dict(fwd_impl="mosaic", mgpu_fwd_skip_pad=True)),
                ("pers_skip_pad", dict(pers, mgpu_fwd_skip_pad=True))]
        if fa3_only:
            fns = fns[:1] + [("default", None)]
            fns[1] = (fns[1][0], lambda q, k, v, c=causal: attn.flash_attention_kernel(
                q, k, v, causal=c))
        variants = [(name, cfg) for name, cfg in variants
                    if bool(cfg.get("mgpu_fwd_fa3_sched")) == fa3_only]
        fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
            q, k, v, causal=c, **cfg)) for name, cfg in variants]
        for v_name, fn in fns:
            if fn is None:
                continue
            row = dict(d=d, causal=causal, n=n, mode="fwd", impl=v_name)
            _timed(row, deadline, flops, "fwd_sweep6", out, jax.jit(fn), q, k, v)


WG2_64 = dict(block_q=64, block_k=128, mgpu_fwd_wgs=2, mgpu_fwd_regs=(232, 40),
              mgpu_ping_pong=True, mgpu_fold_scale=True, mgpu_stages=2)


def mosaic_fwd7(results, deadline, fa3_only=False):
    """Session 5, call 2: candidate forward defaults per (D, causal) cell at 4k, 16k and 1k,
    against cuDNN and tokamax in the same process (the default timed again at the end of the
    4k cells: the run-to-run spread). `fa3_only`: the named-barrier (FA3) candidates alone, in
    their own process."""
    nab = dict(fwd_impl="mosaic", mgpu_fwd_nab=True)
    pers = dict(nab, mgpu_fwd_persistent=-1)
    rev = dict(nab, mgpu_fwd_reverse=True)
    fa3 = dict(mgpu_fwd_fa3_sched=True)
    cells = {
        (64, True): [("nab_rev", rev), ("fa3_nab_rev", dict(rev, **fa3)),
                     ("tk_like", dict(rev, **fa3, mgpu_fold_scale=True, mgpu_stages=2)),
                     ("nab_rev_kw", dict(rev, mgpu_fwd_early_kwait=True))],
        (128, True): [("nab_rev", rev), ("fa3_nab_rev", dict(rev, **fa3)),
                      ("nab_rev_kw", dict(rev, mgpu_fwd_early_kwait=True))],
        (64, False): [("pers_nab_sp", dict(pers, mgpu_fwd_skip_pad=True)),
                      ("wg2_pers_nab", dict(pers, **WG2_64)),
                      ("wg2_fa3_pers_nab", dict(pers, **WG2_64, **fa3))],
        (128, False): [("pers_nab", pers), ("fa3_pers_nab", dict(pers, **fa3))],
    }
    checks = [(2, 1000, 4, 2, 64, False, None, dict(pers, **WG2_64)),
              (1, 2048, 8, 1, 64, True, 300, rev),
              (2, 1000, 8, 2, 128, True, None, dict(rev, **fa3)),
              (1, 2048, 8, 1, 64, True, 300, dict(rev, **fa3, mgpu_fold_scale=True,
                                                  mgpu_stages=2)),
              (2, 1000, 4, 2, 64, False, None, dict(pers, **WG2_64, **fa3)),
              (1, 777, 4, 2, 128, False, None, dict(pers, **fa3))]
    _check_fwd_variants(results, checks, "fwd7", 330, deadline, fa3_only)
    out = results.setdefault("fwd_sweep7", [])
    for (d, causal), variants in cells.items():
        variants = [(nm, cfg) for nm, cfg in variants
                    if bool(cfg.get("mgpu_fwd_fa3_sched")) == fa3_only]
        for n in (4096, 16384, 1024):
            b = TOKENS // n
            q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
            flops = 4 * b * H * n * n * d / (2 if causal else 1)
            fns = [] if fa3_only else [
                ("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                    q, k, v, is_causal=c, implementation="cudnn")),
                ("tokamax", _tokamax_fn(causal))]
            fns += [(nm, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
                q, k, v, causal=c, **cfg)) for nm, cfg in [("default", {})] + variants]
            if n == 4096 and not fa3_only:
                fns.append(("default_again", fns[2][1]))
            for v_name, fn in fns:
                if fn is None:
                    continue
                row = dict(d=d, causal=causal, n=n, mode="fwd", impl=v_name)
                _timed(row, deadline, flops, "fwd_sweep7", out, jax.jit(fn), q, k, v)


def _forward_with_lse(q, k, v, **kw):
    """o and lse (base 2, [B, Hq, Lq_pad]) of flash_attention_kernel's forward for `kw`: the
    FlashConfig the dispatch builds is captured from one call (attn._flash swapped for the
    capture), then the forward alone is jitted."""
    seen = []
    orig = attn._flash
    attn._flash = lambda q_, k_, v_, s_, cfg: seen.append((q_, k_, v_, cfg)) or q_
    try:
        attn.flash_attention_kernel(q, k, v, **kw)
    finally:
        attn._flash = orig
    q_, k_, v_, cfg = seen[0]
    return jax.jit(lambda a, b, c: attn._flash_forward(a, b, c, None, cfg))(q_, k_, v_)


def _reference_lse2(q, k, causal, window):
    """Base-2 log-sum-exp of the scaled scores per (batch, query head, row), f32, [B, Hq, Lq]."""
    hkv, d = k.shape[2], q.shape[3]
    rep = q.shape[2] // hkv
    kf = jnp.repeat(k.astype(jnp.float32), rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf) * d ** -0.5
    mask = attn.attention_mask(q.shape[1], k.shape[1], causal=causal, window=window)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1) / jnp.log(2.0)


def _check_fwd_lse(rows, tag, case, seed):
    """Forward-only real-lowering check of one variant: o against the f32 reference and the
    saved base-2 lse against the reference log-sum-exp (max abs error; the backward reads it)."""
    b, n_, hq, hkv, d, causal, window, extra = case
    q, k, v, _ = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=seed)
    row = dict(case=f"{tag} {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                    f"window={window}")
    try:
        t = time.time()
        o, lse = jax.block_until_ready(_forward_with_lse(q, k, v, causal=causal, window=window,
                                                         **extra))
        row["compile_s"] = round(time.time() - t, 2)
        # jitted: the eager reference compiles every op on its own (~8 s per check)
        o_ref = jax.jit(functools.partial(attn.attention_reference, causal=causal,
                                          window=window))(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        lse_ref = jax.jit(functools.partial(_reference_lse2, causal=causal, window=window))(q, k)
        row.update(o=_rel(o, o_ref),
                   lse_max_abs=float(jnp.max(jnp.abs(lse[:, :, :n_] - lse_ref))))
    except Exception as e:  # noqa: BLE001 - a failing case is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc(limit=4)
    print("check", row, flush=True)
    rows.append(row)


def mosaic_fwd8(results, deadline):
    """Session 6: forward candidates per cell against jax.nn cuDNN, tokamax and the current
    default in the same process, cells in priority order (the default timed again at the end of
    each cell: the run-to-run spread). Forward-only real-lowering checks (o and lse against the
    f32 reference) of the timed combinations first. Candidates: two 64-row ping-pong warpgroups
    with FA3's named barriers on persistent CTAs at D 64 full (tokamax's structure); FA3's
    barriers, persistent CTAs and the early K wait (`mgpu_fwd_early_kwait`) at D 128 full; FA3
    + reversed + early K wait at causal; everywhere the K/V "slot consumed" signal on hardware
    named barriers (`mgpu_fwd_named_free`) instead of 128-thread mbarrier arrivals; causal 1k:
    persistent CTAs over snake rounds (`mgpu_fwd_snake`)."""
    nab = dict(fwd_impl="mosaic", mgpu_fwd_nab=True)
    pers = dict(nab, mgpu_fwd_persistent=-1)
    rev = dict(nab, mgpu_fwd_reverse=True)
    fa3 = dict(mgpu_fwd_fa3_sched=True)
    kw = dict(mgpu_fwd_early_kwait=True)
    nf = dict(mgpu_fwd_named_free=True)
    wg2 = dict(pers, **WG2_64, **fa3)
    snake = dict(mgpu_fwd_persistent=-1, mgpu_fwd_snake=True)
    d64c = dict(attn.MOSAIC_FWD_BLOCKS[64, True], fwd_impl="mosaic")
    cand = {   # (d, causal): [(name, options, lengths it runs at or None)]
        (64, False): [("default_nf", dict(fwd_impl="mosaic", **nf), (2048, 4096, 16384)),
                      ("wg2_fa3_pers_nab", wg2, None),
                      ("wg2_fa3_pers_nab_kw", dict(wg2, **kw), None),
                      ("wg2_fa3_pers_nab_kw_nf", dict(wg2, **kw, **nf), None)],
        (128, False): [("nab", nab, None), ("nab_nf", dict(nab, **nf), None),
                       ("fa3_pers_nab", dict(pers, **fa3), None),
                       ("fa3_pers_nab_kw", dict(pers, **fa3, **kw), None),
                       ("fa3_pers_nab_kw_nf", dict(pers, **fa3, **kw, **nf), None),
                       ("fa3_nab_kw_nf", dict(nab, **fa3, **kw, **nf), (4096, 16384))],
        (128, True): [("nab_rev_nf", dict(rev, **nf), None),
                      ("pers_snake_nab_rev", dict(rev, **snake), (1024,)),
                      ("fa3_nab_rev", dict(rev, **fa3), None),
                      ("fa3_nab_rev_kw", dict(rev, **fa3, **kw), None),
                      ("fa3_nab_rev_kw_nf", dict(rev, **fa3, **kw, **nf), None)],
        (64, True): [("default_kw", dict(d64c, **kw), None), ("default_nf", dict(d64c, **nf), None),
                     ("default_kw_nf", dict(d64c, **kw, **nf), None),
                     ("pers_snake_nf", dict(d64c, **snake, **nf), (1024,))],
    }
    order = [(64, False, 1024), (128, False, 4096), (64, False, 2048), (64, False, 4096),
             (128, True, 4096), (64, True, 1024), (128, True, 1024), (128, True, 16384),
             (128, False, 1024), (128, False, 16384), (64, False, 16384), (64, True, 4096)]
    checks = [(2, 1000, 4, 2, 64, False, None, dict(wg2, **kw, **nf)),
              (1, 2048, 4, 4, 64, False, None, dict(wg2, **kw)),
              (1, 2048, 4, 2, 64, False, None, dict(fwd_impl="mosaic", **nf)),
              (1, 777, 4, 2, 128, False, None, dict(pers, **fa3, **kw, **nf)),
              (1, 777, 4, 2, 128, False, None, dict(pers, **fa3, **kw)),
              (1, 1500, 4, 2, 128, False, None, dict(nab, **nf)),
              (1, 1500, 4, 2, 128, False, None, dict(nab, **fa3, **kw, **nf)),
              (2, 1000, 8, 2, 128, True, None, dict(rev, **fa3, **kw, **nf)),
              (2, 1000, 8, 2, 128, True, None, dict(rev, **nf)),
              (2, 1000, 8, 2, 128, True, None, dict(rev, **fa3, **kw)),
              (1, 2048, 8, 1, 64, True, 300, dict(d64c, **kw, **nf)),
              (2, 1000, 8, 2, 64, True, None, dict(d64c, **kw)),
              (2, 1000, 8, 2, 64, True, None, dict(d64c, **snake, **nf)),
              (2, 1000, 8, 2, 128, True, None, dict(rev, **snake))]
    rows = results.setdefault("correctness", [])
    for i, case in enumerate(checks):
        if time.time() > deadline:
            break
        _check_fwd_lse(rows, "fwd8", case, 400 + i)
    out = results.setdefault("fwd_sweep8", [])
    for d, causal, n in order:
        variants = [(nm, cfg) for nm, cfg, ns in cand[d, causal] if not ns or n in ns]
        _time_cell(out, "fwd_sweep8", deadline, d, causal, n, variants)


def _cell_fns(causal, variants, anchors=True, again=True):
    """[(name, fn(q, k, v))] of one forward cell: jax.nn cuDNN and tokamax (`anchors`; tokamax
    only where it imports), our default, `variants` ([(name, flash_attention_kernel keywords)])
    and (`again`) the default a second time."""
    default = functools.partial(attn.flash_attention_kernel, causal=causal)
    fns = [] if not anchors else [
        ("cudnn", functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                    implementation="cudnn")), ("tokamax", _tokamax_fn(causal))]
    fns.append(("default", default))
    fns += [(nm, functools.partial(attn.flash_attention_kernel, causal=causal, **cfg))
            for nm, cfg in variants]
    if again:
        fns.append(("default_again", default))
    return [(nm, fn) for nm, fn in fns if fn is not None]


def _interleaved(out, tag, deadline, cell, fns, args, flops, rounds, sample_ms=25.0,
                 warm_s=1.0, mode="fwd", ktimes=()):
    """Times `fns` ([(name, fn)]) interleaved in this process: each is compiled and given a
    call count of about `sample_ms`, then `rounds` rounds time one sample of each, the order
    alternating (A B C, C B A, ...) so that a clock drift hits all alike. Rows (`cell` +
    impl): the median ms / TFLOP/s over the rounds, the range (min / max TFLOP/s), the spread
    (max - min) / median, and per-round ratios (same round, so drifts cancel): `vs_default`
    (default ms / this ms) and `vs_best` (best anchor ms / this ms), medians and ranges. A name
    repeated (`default_again`) reuses the compiled function: its row is an A/A measure.
    `ktimes` (names): after the rounds, each of those gets `kernels`, the device time per call
    of its GPU kernels from a profiler trace of 3 calls (`kernel_times`; XLA op lines left
    out)."""
    runs, rows = {}, {}
    for name, fn in fns:
        row = rows[name] = dict(cell, mode=mode, impl=name)
        if time.time() > deadline:
            row["skipped"] = "time budget"
            continue
        try:
            t = time.time()
            f = runs.get("default") if name == "default_again" else None
            if f is None:
                f = jax.jit(fn)
                jax.block_until_ready(f(*args))
                row["compile_s"] = round(time.time() - t, 2)
            t = time.perf_counter()
            for _ in range(3):
                jax.block_until_ready(f(*args))
            one = (time.perf_counter() - t) / 3 * 1e3
            runs[name] = f
            row["iters"] = int(max(1, min(200, sample_ms / max(one, 1e-3))))
        except Exception as e:  # noqa: BLE001 - a failing variant is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    names = list(runs)
    t0 = time.perf_counter()      # clocks settle (session 7, call 1: the first round ~5 % high)
    while names and time.perf_counter() - t0 < warm_s:
        jax.block_until_ready(runs[names[0]](*args))
    samples = {nm: [] for nm in names}
    for r in range(rounds):
        if time.time() > deadline:
            break
        for nm in (names if r % 2 == 0 else names[::-1]):
            f, iters = runs[nm], rows[nm]["iters"]
            t = time.perf_counter()
            for _ in range(iters):
                o = f(*args)
            jax.block_until_ready(o)
            samples[nm].append((time.perf_counter() - t) / iters * 1e3)
    n_done = min((len(x) for x in samples.values()), default=0)
    anchors = [nm for nm in ("cudnn", "tokamax") if nm in samples]

    def ratios(num):                                       # per round: num ms / this ms
        return {nm: [num[r] / samples[nm][r] for r in range(n_done)] for nm in names}
    per_round = {}
    if "default" in samples:
        per_round["vs_default"] = ratios(samples["default"])
    if anchors:
        per_round["vs_best"] = ratios([min(samples[a][r] for a in anchors)
                                       for r in range(n_done)])
    for nm in names:
        ms = np.array(samples[nm][:n_done])
        row = rows[nm]
        if not n_done:
            row["skipped"] = "time budget"
            continue
        tf = flops / ms / 1e9
        row.update(rounds=n_done, ms=float(np.median(ms)), tflops=float(np.median(tf)),
                   tflops_min=float(tf.min()), tflops_max=float(tf.max()),
                   spread=float((tf.max() - tf.min()) / np.median(tf)),
                   samples_ms=[round(float(x), 4) for x in ms])
        for key, vals in per_round.items():
            x = np.array(vals[nm])
            row[key] = float(np.median(x))
            row[key + "_range"] = [float(x.min()), float(x.max())]
    for nm in ktimes:
        if nm not in runs or time.time() > deadline:
            continue
        try:
            kt = kernel_times(runs[nm], args, runs=3, top=8)
            rows[nm]["kernels"] = {ln: ev for ln, ev in kt.items() if "XLA" not in ln}
        except Exception as e:  # noqa: BLE001
            rows[nm]["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for nm, _ in fns:
        row = rows[nm]
        print(tag, {k: v for k, v in row.items() if k != "samples_ms"}, flush=True)
        out.append(row)


def _time_cell(out, tag, deadline, d, causal, n, variants, anchors=True, again=True,
               rounds=0, sample_ms=25.0, mode="fwd", ktimes=()):
    """One cell (H heads, batch x n = TOKENS, bf16) of `_cell_fns`, forward or (`mode`
    "fwd+bwd") forward + backward: timed one after the other (`rounds` 0: `_timeit` per
    function) or interleaved (`_interleaved`, with the per-kernel times of `ktimes`)."""
    b = TOKENS // n
    q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    fb = mode != "fwd"
    flops = 4 * b * H * n * n * d / (2 if causal else 1) * (3.5 if fb else 1)
    fns = [(nm, _fwd_bwd(fn) if fb else fn) for nm, fn in
           _cell_fns(causal, variants, anchors, again)]
    args = (q, k, v, do) if fb else (q, k, v)
    if rounds:
        _interleaved(out, tag, deadline, dict(d=d, causal=causal, n=n), fns, args, flops,
                     rounds, sample_ms, mode=mode, ktimes=ktimes)
        return
    for v_name, fn in fns:
        row = dict(d=d, causal=causal, n=n, mode=mode, impl=v_name)
        _timed(row, deadline, flops, tag, out, jax.jit(fn), *args)


def mosaic_fwd_plan(results, deadline, path, save=None):
    """Checks and timings from a JSON plan file: {"checks": [[b, n, hq, hkv, d, causal,
    window, options], ...], "fb_checks": [same], "cells": [[d, causal, n, [[name, options],
    ...], again, mode, ktimes], ...], "anchors": true, "rounds": 0, "sample_ms": 25}. "checks" are
    forward-only (o and the base-2 lse against the f32 reference), "fb_checks" (session 8)
    forward + backward (o, dq, dk, dv). Each cell times cuDNN and tokamax (when "anchors"),
    the default, the named option sets (flash_attention_kernel keywords; lists become tuples)
    and the default again (unless `again`, the optional fifth element, is false), forward
    (`mode`, the optional sixth element, "fwd") or forward + backward ("fwd+bwd"); with
    "rounds" > 0 interleaved (`_interleaved`: medians, ranges and per-round ratios; the
    optional seventh element names the functions whose GPU kernels are then timed from a
    profiler trace), else one after the other."""
    with open(path) as f:
        plan = json.load(f)

    def opts(o):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in o.items()}
    rows = results.setdefault("correctness", [])
    for i, case in enumerate(plan.get("checks", [])):
        if time.time() > deadline:
            break
        _check_fwd_lse(rows, "plan", (*case[:7], opts(case[7])), 500 + i)
    for i, (b, n_, hq, hkv, d, causal, window, extra) in enumerate(plan.get("fb_checks", [])):
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=600 + i)
        row = dict(case=f"plan_fb {extra} b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do),
                                 dict(causal=causal, window=window), opts(extra), err_chars=600)
        if save:
            save()
    rounds = plan.get("rounds", 0)
    out = results.setdefault("fwd_ab" if rounds else "fwd_plan", [])
    for d, causal, n, variants, *rest in plan.get("cells", []):
        again, mode, ktimes = (rest + [True, "fwd", []][len(rest):])[:3]
        _time_cell(out, "fwd_ab" if rounds else "fwd_plan", deadline, d, causal, n,
                   [(nm, opts(o)) for nm, o in variants], plan.get("anchors", True),
                   again, rounds, plan.get("sample_ms", 25.0), mode, ktimes)
        if save:
            save()


FWD_PROFILE_VARIANTS = {   # at D 128 full: tokamax's structure (persistent, FA3 barriers)
    "fa3_pers_nab_kw": dict(fwd_impl="mosaic", mgpu_fwd_nab=True, mgpu_fwd_persistent=-1,
                            mgpu_fwd_fa3_sched=True, mgpu_fwd_early_kwait=True),
    "nab": dict(fwd_impl="mosaic", mgpu_fwd_nab=True),
    # session 7: tokamax's structure in full (+ one producer warp, named slot release, its
    # optimization barriers and tile end, the last stores awaited until read)
    "tk": dict(fwd_impl="mosaic", mgpu_fwd_nab=True, mgpu_fwd_persistent=-1,
               mgpu_fwd_fa3_sched=True, mgpu_fwd_early_kwait=True, mgpu_fwd_warp_producer=True,
               mgpu_fwd_named_free=True, mgpu_fwd_ob_split=True, mgpu_fwd_lean_end=True,
               mgpu_fwd_read_wait=True),
    "rw_obs": dict(fwd_impl="mosaic", mgpu_fwd_read_wait=True, mgpu_fwd_ob_split=True),
}


def forward_profile_runs(results, deadline, d=128, causal=False, n=4096,
                         variants=("fa3_pers_nab_kw", "tokamax", "default")):
    """One call each of our forward (the default and `FWD_PROFILE_VARIANTS`) and tokamax's at one
    shape, for a kernel profiler (ncu) wrapped around the process: per-kernel stall reasons and
    issue statistics of the same work."""
    b = TOKENS // n
    q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    rows = results.setdefault("profile_runs", [])
    for name in variants:
        if time.time() > deadline:
            break
        if name == "tokamax":
            fn = _tokamax_fn(causal)
        else:
            fn = functools.partial(attn.flash_attention_kernel, causal=causal,
                                   **FWD_PROFILE_VARIANTS.get(name, {}))
        if fn is None:
            continue
        t = time.time()
        jax.block_until_ready(jax.jit(fn)(q, k, v))
        rows.append(dict(name=name, d=d, causal=causal, n=n, s=round(time.time() - t, 2)))
        print("profiled", rows[-1], flush=True)


def mosaic_fwd2(results, deadline, n=4096, dims=(64, 128)):
    """Session 3: the Mosaic forward with the softmax scale folded into exp2's argument
    (mgpu_fold_scale): real-lowering checks, then forward TFLOP/s at N=4k against the default
    Mosaic forward and jax.nn cuDNN in the same process."""
    rows = results.setdefault("correctness", [])
    for i, (b, n_, hq, hkv, d, causal, window) in enumerate([
            (2, 1000, 8, 2, 64, True, None), (1, 2048, 4, 4, 128, True, 300)]):
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((b, n_, hq, d), (b, n_, hkv, d), jnp.bfloat16, seed=130 + i)
        kw = dict(causal=causal, window=window)
        row = dict(case=f"mosaic fwd fold b{b} n{n_} hq{hq} hkv{hkv} d{d} causal={causal} "
                        f"window={window}")
        _check_against_reference(rows, row, attn.flash_attention_kernel, (q, k, v, do), kw,
                                 dict(fwd_impl="mosaic", mgpu_fold_scale=True), err_chars=600)
    out = results.setdefault("fwd_sweep2", [])
    b = TOKENS // n
    for d in dims:
        q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        for causal in (False, True):
            flops = 4 * b * H * n * n * d / (2 if causal else 1)
            fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                q, k, v, is_causal=c, implementation="cudnn"))]
            fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
                q, k, v, causal=c, **cfg)) for name, cfg in
                [("mosaic", dict()), ("mosaic_fold", dict(mgpu_fold_scale=True))]]
            for name, fn in fns:
                row = dict(d=d, causal=causal, n=n, impl=name)
                _timed(row, deadline, flops, "fsweep2", out, jax.jit(fn), q, k, v)


def mosaic_grid_order(results, deadline, n=16384):
    """Grid order of the Mosaic kernels at N=16k (B=1): heads fastest (default) against query /
    KV tiles fastest (`mgpu_tiles_fastest`: the CTAs in flight share one head's K/V in L2),
    forward TFLOP/s with jax.nn cuDNN in the same process, then fwd+bwd at D 64 (Mosaic bwd)."""
    out = results.setdefault("grid_sweep", [])
    b = max(1, TOKENS // n)
    cells = [(128, False, "fwd"), (128, True, "fwd"), (64, False, "fwd"), (64, False, "fwd+bwd"),
             (128, False, "fwd+bwd")]
    for d, causal, mode in cells:
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        flops = 4 * b * H * n * n * d / (2 if causal else 1) * (3.5 if mode != "fwd" else 1)
        fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"))]
        cfgs = [("mosaic", dict()), ("mosaic_tf", dict(mgpu_tiles_fastest=True))]
        fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
            q, k, v, causal=c, **cfg)) for name, cfg in cfgs]
        for name, fn in fns:
            row = dict(d=d, causal=causal, n=n, mode=mode, impl=name)
            timed, args = ((jax.jit(fn), (q, k, v)) if mode == "fwd"
                           else (_fwd_bwd(fn), (q, k, v, do)))
            _timed(row, deadline, flops, "gsweep", out, timed, *args)


def mosaic_fwd3(results, deadline, n=4096):
    """Session 3, call 3: the Mosaic forward with 240/24 registers (the D 64 full 128 x 128 tiles
    spill 124-156 bytes at 232/40), N=4k, with jax.nn cuDNN in the same process."""
    out = results.setdefault("fwd_sweep3", [])
    b = TOKENS // n
    for d, causal in ((64, False), (128, False), (64, True)):
        q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        flops = 4 * b * H * n * n * d / (2 if causal else 1)
        fns = [("cudnn", lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"))]
        fns += [(name, lambda q, k, v, cfg=cfg, c=causal: attn.flash_attention_kernel(
            q, k, v, causal=c, **cfg)) for name, cfg in
            [("mosaic", dict()), ("mosaic_r240", dict(mgpu_fwd_regs=(240, 24)))]]
        for name, fn in fns:
            row = dict(d=d, causal=causal, n=n, impl=name)
            _timed(row, deadline, flops, "fsweep3", out, jax.jit(fn), q, k, v)


def mosaic_compile_report(results, deadline, cases=None):
    """Compile (and run once, small shapes) the Mosaic kernels whose ptxas report and SASS
    the request dumps (MOSAIC_GPU_DUMP_PTXAS / _SASS set by the caller). Kernel names say the
    variant."""
    rows = results.setdefault("compiled", [])
    cases = cases or [
        ("bwd_d128_base", 128, True, dict(bwd_impl="mosaic")),
        ("bwd_d128_plo", 128, True, dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True)),
        ("bwd_d128_r232", 128, True, dict(bwd_impl="mosaic", mgpu_bwd_regs=(232, 40))),
        ("fwd_d64_fold", 64, False, "fold"),
        ("fwd_d64_r240", 64, False, "r240"),
        ("bwd_d128_defer", 128, True, dict(bwd_impl="mosaic", mgpu_bwd_defer_dq=True))]
    for name, d, causal, cfg in cases:
        if time.time() > deadline:
            break
        q, k, v, do = _inputs((1, 512, 4, d), (1, 512, 4, d), jnp.bfloat16)
        row = dict(name=name, d=d, causal=causal, cfg=cfg)
        t = time.time()
        try:
            if cfg in (None, "fold", "r240"):               # the Hopper default forward
                extra = dict(mgpu_fwd_regs=(240, 24)) if cfg == "r240" else {}
                jax.block_until_ready(jax.jit(lambda q, k, v, c=causal, e=extra:
                                              attn.flash_attention_kernel(
                                                  q, k, v, causal=c, **e))(q, k, v))
            else:
                jax.block_until_ready(_fwd_bwd(lambda q, k, v, cfg=cfg, c=causal:
                                               attn.flash_attention_kernel(q, k, v, causal=c,
                                                                           **cfg))(q, k, v, do))
            row["compile_and_run_s"] = time.time() - t
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("compiled", row, flush=True)
        rows.append(row)


def _tokamax_fn(causal):
    """tokamax's Mosaic GPU attention (PyPI `tokamax`; its heuristic config, no autotuning),
    fn(q, k, v) in our [B, L, H, D] layout (tokamax's is the same: [*B, T, N, H]), default scale
    1/sqrt(D); None if tokamax does not import (the GPU host has it in /tmp/site)."""
    try:
        import tokamax
    except Exception:  # noqa: BLE001
        return None
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation="mosaic")


def _impls(d, causal, ours_cfg, mgpu_cfg=None, mbwd_cfg=None):
    """name -> (fwd fn(q, k, v), dtype override or None, supports backward)."""
    mgpu_cfg = {k: v for k, v in (mgpu_cfg or {}).items() if k != "fwd_impl"}
    impls = {
        "ours": (lambda q, k, v: attn.flash_attention_kernel(q, k, v, causal=causal, **ours_cfg),
                 None, True),
        "ours_mbwd": (lambda q, k, v: attn.flash_attention_kernel(
            q, k, v, causal=causal, **{**ours_cfg, "bwd_impl": "mosaic", **(mbwd_cfg or {})}),
            None, True),
        "ours_triton": (lambda q, k, v: attn.flash_attention_kernel(
            q, k, v, causal=causal, **{**ours_cfg, "fwd_impl": "triton"}), None, True),
        "ours_mgpu": (lambda q, k, v: attn.flash_attention_kernel(
            q, k, v, causal=causal, fwd_impl="mosaic", **mgpu_cfg), None, True),
        "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"), None, True),
        "xla": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"), None, True),
    }
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as jax_mha
        impls["jax_mha"] = (lambda q, k, v: jax_mha.mha(q, k, v, None, sm_scale=d ** -0.5,
                                                        causal=causal), None, True)
    except Exception:  # noqa: BLE001
        pass
    tk = _tokamax_fn(causal)
    if tk is not None:
        impls["tokamax"] = (tk, None, True)
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
        cfg = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
        impls["jax_mgpu_fp16"] = (lambda q, k, v: mgpu.attention(q, k, v, cfg), jnp.float16,
                                  False)
    except Exception:  # noqa: BLE001
        pass
    return impls


def throughput(results, lengths, dims, deadline, impl_filter=None, ours_cfg=None,
               xla_max_n=1 << 30, mgpu_cfg=None, mbwd_cfg=None, modes=("fwd", "fwd+bwd"),
               rounds=0, save=None):
    """The TFLOP/s table: per (d, causal, n) cell each implementation of `_impls` (filtered)
    and mode, one after the other; with `rounds` > 0 each mode's row of a cell interleaved
    (`_interleaved`: ours is the "default" there, so its rows carry `vs_best`, the per-round
    ratio to max(cuDNN, tokamax))."""
    rows = results.setdefault("throughput", [])
    for d in dims:
        for causal in (False, True):
            for n in lengths:
                b = max(1, TOKENS // n)
                flops = 4 * b * H * n * n * d / (2 if causal else 1)
                cfg = (ours_cfg or {}) if d == 128 else {}
                mcfg = (mgpu_cfg or {}) if d == 128 else {}
                if rounds:
                    q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
                    for mode in modes:
                        fb = mode != "fwd"
                        fns = [("default" if nm == "ours" else nm, _fwd_bwd(fn) if fb else fn)
                               for nm, (fn, dt, has_bwd) in
                               _impls(d, causal, cfg, mcfg, mbwd_cfg).items()
                               if (not impl_filter or nm in impl_filter) and dt is None
                               and not (nm == "xla" and n > xla_max_n)
                               and (has_bwd or not fb)]
                        cell = []
                        _interleaved(cell, "tput", deadline, dict(d=d, causal=causal, n=n, b=b),
                                     fns, (q, k, v, do) if fb else (q, k, v),
                                     flops * (3.5 if fb else 1), rounds, mode=mode)
                        rows += [dict(r, impl="ours" if r["impl"] == "default" else r["impl"])
                                 for r in cell]
                        if save:
                            save()
                    continue
                for name, (fn, dt, has_bwd) in _impls(d, causal, cfg, mcfg, mbwd_cfg).items():
                    if impl_filter and name not in impl_filter:
                        continue
                    if name == "xla" and n > xla_max_n:
                        continue
                    for mode in modes:
                        row = dict(impl=name, d=d, causal=causal, n=n, b=b, mode=mode)
                        if mode == "fwd+bwd" and not has_bwd:
                            continue
                        if name == "xla" and n * n * b * H * 4 * (3 if mode != "fwd" else 1) \
                                > 60e9:
                            row["skipped"] = "O(N^2) scores do not fit"
                        elif time.time() > deadline:
                            row["skipped"] = "time budget"
                        else:
                            try:
                                q, k, v, do = _inputs((b, n, H, d), (b, n, H, d),
                                                      dt or jnp.bfloat16)
                                if mode == "fwd":
                                    ms = _timeit(jax.jit(fn), q, k, v)
                                else:
                                    ms = _timeit(_fwd_bwd(fn), q, k, v, do)
                                row["ms"] = ms
                                row["tflops"] = flops * (3.5 if mode != "fwd" else 1) / ms / 1e9
                            except Exception as e:  # noqa: BLE001
                                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print("tput", row, flush=True)
                        rows.append(row)


def sweep(results, deadline):
    """Block sizes / warps / stages of our kernel at D=128, N=4k, full attention.

    Returns the best forward and backward settings; the throughput table uses them at D=128.
    Call 1 of 2026-11-28 swept forward (128|64, 64|128) x warps 4|8 x stages 2|3 and backward
    (64..128 blocks) x warps 4|8 (docs/kernels/flash_attention.md); this set explores around
    its winners (forward 3 stages, backward 4 warps).
    """
    n, d, b = 4096, 128, TOKENS // 4096
    q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    fwd_cfgs = [dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
                dict(block_q=128, block_k=64, num_warps=8, num_stages=4),
                dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
                dict(block_q=64, block_k=128, num_warps=4, num_stages=3)]
    bwd_cfgs = [dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
                     num_warps_bwd=4, num_stages_bwd=2),
                dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
                     num_warps_bwd=4, num_stages_bwd=3),
                dict(block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
                     num_warps_bwd=4, num_stages_bwd=2),
                dict(block_q_dq=64, block_k_dq=64, block_q_dkv=32, block_k_dkv=64,
                     num_warps_bwd=4, num_stages_bwd=2)]
    rows = results.setdefault("sweep", [])
    best = {"fwd": (0.0, {}), "fwd+bwd": (0.0, {})}
    flops = 4 * b * H * n * n * d
    for mode, cfgs in (("fwd", fwd_cfgs), ("fwd+bwd", bwd_cfgs)):
        for cfg in cfgs:
            row = dict(mode=mode, causal=False, cfg=cfg)
            if time.time() > deadline:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            try:
                full = {**best["fwd"][1], **cfg}

                def fn(q, k, v, full=full):
                    return attn.flash_attention_kernel(q, k, v, **full)
                if mode == "fwd":
                    ms = _timeit(jax.jit(fn), q, k, v)
                else:
                    ms = _timeit(_fwd_bwd(fn), q, k, v, do)
                row["tflops"] = flops * (3.5 if mode != "fwd" else 1) / ms / 1e9
                if row["tflops"] > best[mode][0]:
                    best[mode] = (row["tflops"], cfg)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print("sweep", row, flush=True)
            rows.append(row)
    chosen = {**best["fwd"][1], **best["fwd+bwd"][1]}
    results["chosen_d128"] = chosen
    print("chosen for D=128:", chosen, flush=True)
    return chosen


def mosaic_sweep(results, deadline):
    """Forward settings of the experimental Mosaic GPU kernel at D=128, N=4k, full attention."""
    n, d, b = 4096, 128, TOKENS // 4096
    q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    rows = results.setdefault("mosaic_sweep", [])
    best = (0.0, {})
    for cfg in [dict(block_k=128, mgpu_stages=2), dict(block_k=128, mgpu_stages=3),
                dict(block_k=64, mgpu_stages=3), dict(block_k=64, mgpu_stages=4)]:
        row = dict(mode="fwd", causal=False, cfg=cfg)
        if time.time() > deadline:
            row["skipped"] = "time budget"
        else:
            try:
                ms = _timeit(jax.jit(lambda q, k, v, cfg=cfg: attn.flash_attention_kernel(
                    q, k, v, fwd_impl="mosaic", **cfg)), q, k, v)
                row["tflops"] = 4 * b * H * n * n * d / ms / 1e9
                best = max(best, (row["tflops"], cfg), key=lambda x: x[0])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("msweep", row, flush=True)
        rows.append(row)
    results["chosen_mgpu_d128"] = best[1]
    return best[1]


def bwd_sweep(results, deadline, dims=(128, 64), n=4096):
    """Backward variants at N=4k (fwd+bwd TFLOP/s, default forward): the split dq kernel
    against dq fused into the dk/dv kernel by f32 atomic adds, and dk/dv tile sizes."""
    rows = results.setdefault("bwd_sweep", [])
    split = dict(bwd_impl="split")
    variants = [split,
                dict(bwd_impl="atomic", block_q_dkv=64, block_k_dkv=64, num_warps_bwd=4),
                dict(bwd_impl="atomic", block_q_dkv=64, block_k_dkv=128, num_warps_bwd=8),
                dict(bwd_impl="atomic", block_q_dkv=64, block_k_dkv=128, num_warps_bwd=4)]
    b = TOKENS // n
    for d in dims:
        q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
        for causal in (False, True):
            flops = 4 * b * H * n * n * d / (2 if causal else 1) * 3.5
            for cfg in variants:
                row = dict(d=d, causal=causal, n=n, cfg=cfg)
                kernel = functools.partial(attn.flash_attention_kernel, causal=causal, **cfg)
                _timed(row, deadline, flops, "bsweep", rows, _fwd_bwd(kernel), q, k, v, do)


def mosaic_sweep_d(results, deadline, d=64, n=4096):
    """Mosaic GPU forward tiles at head_dim d, N=4k, full and causal (forward TFLOP/s), with
    the Triton forward as the baseline in the same run."""
    b = TOKENS // n
    q, k, v, _ = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    rows = results.setdefault("mosaic_sweep", [])
    cfgs = [dict(fwd_impl="triton"),
            dict(block_q=64, block_k=64, mgpu_stages=2),
            dict(block_q=64, block_k=64, mgpu_stages=3),
            dict(block_q=64, block_k=64, mgpu_stages=4),
            dict(block_q=64, block_k=128, mgpu_stages=2),
            dict(block_q=64, block_k=128, mgpu_stages=3),
            dict(block_q=128, block_k=64, mgpu_stages=2),
            dict(block_q=128, block_k=64, mgpu_stages=3),
            dict(block_q=128, block_k=128, mgpu_stages=2),
            dict(block_q=64, block_k=64, mgpu_stages=3, mgpu_ping_pong=False)]
    if d == 128:
        cfgs = [dict(fwd_impl="triton"), dict(block_q=64, block_k=128, mgpu_stages=2),
                dict(block_q=64, block_k=64, mgpu_stages=4),
                dict(block_q=128, block_k=64, mgpu_stages=2)]
    for causal in (False, True):
        for cfg in cfgs:
            full = cfg if "fwd_impl" in cfg else {"fwd_impl": "mosaic", **cfg}
            row = dict(mode="fwd", d=d, n=n, causal=causal, cfg=full)
            if time.time() > deadline:
                row["skipped"] = "time budget"
            else:
                try:
                    ms = _timeit(jax.jit(lambda q, k, v, f=full, c=causal:
                                         attn.flash_attention_kernel(q, k, v, causal=c, **f)),
                                 q, k, v)
                    row.update(ms=ms, tflops=4 * b * H * n * n * d / (2 if causal else 1)
                               / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("msweep", row, flush=True)
            rows.append(row)


def decode_sweep(results, deadline, contexts=(8192, 32768)):
    """Split count / tile / pipeline variants of the split-KV decode kernel (B=8, Hq=32,
    Hkv=8, D=128) against cuDNN and the HBM floor."""
    b, hq, hkv, d = 8, 32, 8, 128
    rows = results.setdefault("decode_sweep", [])
    bw = results.get("copy_tb_s") or 4.05
    variants = [dict(), dict(num_splits=8), dict(num_splits=16), dict(num_splits=33),
                dict(block_k=64, num_splits=16), dict(block_k=64, num_splits=16, num_stages=3),
                dict(block_k=64, num_splits=32, num_stages=3), dict(num_splits=16, num_stages=3),
                dict(num_splits=16, num_warps=8)]
    for s in contexts:
        q, k, v, _ = _inputs((b, 1, hq, d), (b, s, hkv, d), jnp.bfloat16, seed=s)
        lengths = jnp.full((b,), s, jnp.int32)
        ref = attn.decode_attention_reference(q, k, v, lengths)
        base = dict(context=s, floor_ms=2 * k.nbytes / (bw * 1e9))
        try:
            base["cudnn_ms"] = _timeit(jax.jit(lambda q, k, v, l: jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=l, implementation="cudnn")), q, k, v, lengths,
                iters=20)
        except Exception as e:  # noqa: BLE001
            base["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for cfg in variants:
            row = dict(base, cfg=cfg)
            if time.time() > deadline:
                row["skipped"] = "time budget"
            else:
                try:
                    fn = jax.jit(lambda q, k, v, l, cfg=cfg: attn._decode_forward(
                        q, k, v, l, sm_scale=d ** -0.5, window=None, interpret=False, **cfg))
                    row["err"] = _rel(fn(q, k, v, lengths), ref)
                    row["ms"] = _timeit(fn, q, k, v, lengths, iters=20)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("dsweep", row, flush=True)
            rows.append(row)


def packed(results, deadline, n=8192, d=128, b=2, doc=1024):
    """Packed documents (segment ids): 8 documents of 1k in an 8k row vs one 8k causal row."""
    q, k, v, do = _inputs((b, n, H, d), (b, n, H, d), jnp.bfloat16)
    seg = jnp.broadcast_to(jnp.arange(n) // doc, (b, n))
    rows = results.setdefault("packed", [])
    for name, sid in ((f"one {n} document", None), (f"{n // doc} documents of {doc}", seg)):
        for mode in ("fwd", "fwd+bwd"):
            row = dict(case=name, mode=mode, b=b, n=n, d=d)
            if time.time() > deadline:
                row["skipped"] = "time budget"
            else:
                def fn(q, k, v, sid=sid):
                    return attn.flash_attention(q, k, v, causal=True, segment_ids=sid,
                                                backend="pallas")
                try:
                    row["ms"] = (_timeit(jax.jit(fn), q, k, v) if mode == "fwd"
                                 else _timeit(_fwd_bwd(fn), q, k, v, do))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("packed", row, flush=True)
            rows.append(row)


def memory(results, lengths, deadline):
    """Compiled temp + argument bytes of fwd+bwd (causal, D=128, B=1, H=16) versus length."""
    rows = results.setdefault("memory", [])
    for n in lengths:
        if time.time() > deadline:
            break
        q = jax.ShapeDtypeStruct((1, n, H, 128), jnp.bfloat16)
        row = dict(n=n)
        for name, fn in (("ours", lambda q, k, v: attn.flash_attention(q, k, v, causal=True,
                                                                        backend="pallas")),
                         ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
                             q, k, v, is_causal=True, implementation="cudnn"))):
            try:
                mem = _fwd_bwd(fn).lower(q, q, q, q).compile().memory_analysis()
                row[name + "_gb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes) / 1e9
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("mem", row, flush=True)
        rows.append(row)
    if time.time() < deadline:
        n = 131072
        q, k, v, do = _inputs((1, n, H, 128), (1, n, H, 128), jnp.bfloat16)
        f = _fwd_bwd(lambda q, k, v: attn.flash_attention(q, k, v, causal=True,
                                                          backend="pallas"))
        try:
            ms = _timeit(f, q, k, v, do, iters=1, reps=2)
            flops = 4 * H * n * n * 128 / 2 * 3.5
            stats = jax.devices()[0].memory_stats() or {}
            row = dict(n=n, ms=ms, tflops=flops / ms / 1e9,
                       peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9)
        except Exception as e:  # noqa: BLE001
            row = dict(n=n, error=f"{type(e).__name__}: {str(e)[:300]}")
        print("128k", row, flush=True)
        results["fwd_bwd_128k"] = row


def decode(results, contexts, deadline, copy_elems=1 << 28):
    b, hq, hkv, d = 8, 32, 8, 128
    rows = results.setdefault("decode", [])
    x = jnp.ones((copy_elems,), jnp.float32)               # 1 GiB copy: the bandwidth ceiling
    copy_ms = _timeit(jax.jit(lambda x: x * 1.0), x, iters=20)
    bw = 2 * x.nbytes / copy_ms / 1e9                      # bytes read + written, TB/s
    results["copy_tb_s"] = bw
    for s in contexts:
        if time.time() > deadline:
            break
        q, k, v, _ = _inputs((b, 1, hq, d), (b, s, hkv, d), jnp.bfloat16, seed=s)
        lengths = jnp.full((b,), s, jnp.int32)
        floor_ms = 2 * k.nbytes / (bw * 1e9)
        row = dict(context=s, b=b, hq=hq, hkv=hkv, d=d, floor_ms=floor_ms)
        fns = {"ours": lambda q, k, v, l: attn.decode_attention(q, k, v, l, backend="pallas"),
               "cudnn": lambda q, k, v, l: jax.nn.dot_product_attention(
                   q, k, v, key_value_seq_lengths=l, implementation="cudnn"),
               "xla": lambda q, k, v, l: jax.nn.dot_product_attention(
                   q, k, v, key_value_seq_lengths=l, implementation="xla")}
        for name, fn in fns.items():
            try:
                row[name + "_ms"] = _timeit(jax.jit(fn), q, k, v, lengths, iters=20)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("decode", row, flush=True)
        rows.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_results.json")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before cells are skipped")
    ap.add_argument("--quick", action="store_true", help="lengths 1k/4k/16k only")
    ap.add_argument("--parts",
                    default="check:0.1,decode:0.15,sweep:0.25,msweep:0.3,tput:0.9,mem:1",
                    help="part:fraction of the budget by which the part must stop starting cells")
    ap.add_argument("--impls", default="", help="comma list to restrict the throughput table")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--xla-max-n", type=int, default=1 << 30)
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="throughput passes (comma list)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="tput: time each cell's impls interleaved, R rounds per mode")
    ap.add_argument("--dims", default="128,64", help="throughput head dims (comma list)")
    ap.add_argument("--fwd-plan", default="",
                    help="JSON plan(s) of the fplan part (comma list: run in order)")
    ap.add_argument("--checks", type=int, default=99, help="how many correctness cases")
    ap.add_argument("--prof", default="", help="fprof: comma list of FWD_PROFILE_VARIANTS names, "
                    "'default' or 'tokamax'")
    ap.add_argument("--traceback-after", type=float, default=0.0,
                    help="seconds after which every thread's Python stack is printed (stalls)")
    ap.add_argument("--report", default="",
                    help="results JSON(s), comma-separated -> table + PNG chart, no GPU")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    if args.traceback_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.traceback_after, repeat=True)
    t0 = time.time()
    results = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
                   device=str(jax.devices()[0].device_kind))
    parts = args.parts.split(",")
    lengths = [1024, 4096, 16384] if args.quick else [int(x) for x in args.lengths.split(",")]
    chosen, chosen_mgpu = {}, {}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    steps = {"check": lambda dl: correctness(results, args.checks),
             "check2": lambda dl: correctness_variants(results),
             "sweep": lambda dl: chosen.update(sweep(results, dl)),
             "tput": lambda dl: throughput(results, lengths,
                                           tuple(int(x) for x in args.dims.split(",")), dl,
                                           [s for s in args.impls.split(",") if s], chosen,
                                           args.xla_max_n, chosen_mgpu,
                                           modes=tuple(args.modes.split(",")),
                                           rounds=args.rounds, save=save),
             "f32chk": lambda dl: f32_and_anchor_checks(results),
             "mfwd6": lambda dl: mosaic_fwd6(results, dl),
             "mfwd6fa3": lambda dl: mosaic_fwd6(results, dl, fa3_only=True),
             "mfwd7": lambda dl: mosaic_fwd7(results, dl),
             "mfwd7fa3": lambda dl: mosaic_fwd7(results, dl, fa3_only=True),
             "mfwd8": lambda dl: mosaic_fwd8(results, dl),
             "fprof": lambda dl: forward_profile_runs(
                 results, dl, **(dict(variants=tuple(args.prof.split(","))) if args.prof
                                 else {})),
             "fplan": lambda dl: [mosaic_fwd_plan(results, dl, path, save)
                                  for path in args.fwd_plan.split(",")],
             "msweep": lambda dl: chosen_mgpu.update(mosaic_sweep(results, dl)),
             "msweep64": lambda dl: mosaic_sweep_d(results, dl, 64),
             "msweep128": lambda dl: mosaic_sweep_d(results, dl, 128),
             "bsweep": lambda dl: bwd_sweep(results, dl),
             "mbwd": lambda dl: mosaic_bwd(results, dl, lengths=lengths),
             "mbwd2": lambda dl: mosaic_bwd2(results, dl),
             "mbwd2a": lambda dl: mosaic_bwd2(results, dl, which="nodefer"),
             "mbwd2b": lambda dl: mosaic_bwd2(results, dl, dims=(64, 128), which="defer"),
             "mregs": lambda dl: mosaic_compile_report(results, dl),
             "mfwd2": lambda dl: mosaic_fwd2(results, dl),
             "mgrid": lambda dl: mosaic_grid_order(results, dl),
             "mbwd3": lambda dl: mosaic_bwd3(results, dl),
             "mfwd3": lambda dl: mosaic_fwd3(results, dl),
             "mbwd4": lambda dl: mosaic_bwd4(results, dl),
             "mfwd4": lambda dl: mosaic_fwd4(results, dl),
             "mbwd5": lambda dl: mosaic_bwd5(results, dl),
             "mfwd5": lambda dl: mosaic_fwd5(results, dl),
             "bshort": lambda dl: bwd_short(results, dl),
             # session 4: SASS of the D 128 full lean backward (216 bytes of spills: where?)
             "msass": lambda dl: mosaic_compile_report(results, dl, cases=[
                 ("bwd_d128_full_plo", 128, False, dict(bwd_impl="mosaic", mgpu_bwd_p_lo=True))]),
             "hangf": lambda dl: hang_probe(results, dl, fwd_impl="mosaic", bwd_impl="split"),
             "hangb": lambda dl: hang_probe(results, dl, fwd_impl="triton", bwd_impl="mosaic"),
             "hangfb": lambda dl: hang_probe(results, dl),
             "dsweep": lambda dl: decode_sweep(results, dl),
             "packed": lambda dl: packed(results, dl),
             "mem": lambda dl: memory(results, [4096, 16384, 65536], dl),
             "decode": lambda dl: decode(results, [8192, 32768, 131072], dl)}
    for part in parts:
        p, frac = part.split(":")
        steps[p](t0 + args.budget * float(frac))
        results.setdefault("elapsed", {})[p] = time.time() - t0
        save()
    summary(results)


def summary(results):
    ab = [r for r in results.get("fwd_ab", []) + results.get("throughput", [])
          if "tflops" in r and "rounds" in r]
    if ab:
        print("\ninterleaved: d causal n impl | TFLOP/s median [min max] | vs default, vs best "
              "anchor (per-round medians [ranges])")
    for r in ab:
        rel = " ".join(f"{k} {r[k]:.3f} [{r[k + '_range'][0]:.3f} {r[k + '_range'][1]:.3f}]"
                       for k in ("vs_default", "vs_best") if k in r)
        print(r["d"], r["causal"], r["n"], f"{r['impl']:<14}", f"{r['tflops']:6.1f} "
              f"[{r['tflops_min']:6.1f} {r['tflops_max']:6.1f}] x{r['rounds']}", rel)
    rows = [r for r in results.get("throughput", []) if "tflops" in r]
    cells = {}
    for r in rows:
        cells.setdefault((r["d"], r["causal"], r["mode"], r["n"]), {})[r["impl"]] = r["tflops"]
    print("\nd causal mode n | " + " ".join(f"{i:>8}" for i in
                                            ("ours", "ours_mg", "cudnn", "tokamax", "xla",
                                             "jax_mha", "mgpu16")))
    for key, v in sorted(cells.items()):
        vals = [v.get(i) for i in ("ours", "ours_mgpu", "cudnn", "tokamax", "xla", "jax_mha",
                                   "jax_mgpu_fp16")]
        best = max([v[a] for a in ("cudnn", "tokamax") if a in v], default=None)
        print(*key, "|", " ".join(f"{x:8.1f}" if x else "       -" for x in vals),
              f" ours/cudnn={v['ours'] / v['cudnn']:.2f}" if "ours" in v and "cudnn" in v else "",
              f" ours/best={v['ours'] / best:.2f}" if "ours" in v and best else "")


def report(paths):
    """Print the table and write a PNG chart (TFLOP/s against length) next to the first file.

    `paths` is a comma list of results files from runs on the same GPU: the first is the main run;
    later ones add only the cells the main run lacks, drawn dashed and labelled with the last
    "_" part of their file name (e.g. "(call1)").
    """
    paths = paths.split(",")
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    results = runs[0]
    summary(results)
    rows = [r for r in results.get("throughput", []) if "tflops" in r]
    have = {(r["impl"], r["d"], r["causal"], r["mode"], r["n"]) for r in rows}
    for path, extra in zip(paths[1:], runs[1:], strict=True):
        tag = os.path.splitext(os.path.basename(path))[0].split("_")[-1]
        for r in extra.get("throughput", []):
            key = (r["impl"], r["d"], r["causal"], r["mode"], r["n"])
            if "tflops" in r and key not in have:
                rows.append({**r, "impl": f"{r['impl']} ({tag})"})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    base = ["ours", "cudnn", "xla", "jax_mha", "jax_mgpu_fp16", "ours_mgpu", "tokamax"]
    color = {b: f"C{i}" for i, b in enumerate(base)}
    fig, axes = plt.subplots(2, 4, figsize=(20, 9), sharex=True)
    for col, (d, mode) in enumerate([(128, "fwd"), (128, "fwd+bwd"), (64, "fwd"),
                                     (64, "fwd+bwd")]):
        for row_i, causal in enumerate((False, True)):
            ax = axes[row_i, col]
            for impl in impls:
                pts = sorted((r["n"], r["tflops"]) for r in rows if r["impl"] == impl
                             and r["d"] == d and r["mode"] == mode and r["causal"] == causal)
                if pts:
                    name = impl.split(" ")[0]
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl,
                            color=color.get(name), linestyle="--" if "(" in impl else "-")
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={d} {mode} {'causal' if causal else 'full'}")
            ax.set_ylabel("TFLOP/s")
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']}, jax {results['jax']}, {results['date']}, bf16, H={H}, "
                 f"B*N={TOKENS}")
    fig.tight_layout()
    png = os.path.splitext(paths[0])[0] + ".png"
    fig.savefig(png, dpi=70)
    print("wrote", png)


if __name__ == "__main__":
    main()

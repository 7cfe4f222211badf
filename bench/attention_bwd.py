"""Backward variants of the flash attention kernels on one GPU (issue 4, session 5).

    PYTHONUNBUFFERED=1 python3 bench/attention_bwd.py --out $RES/bwd.json --budget 300 \
        --parts check:0.3,tput:1.0 --variants default,split,rows_early --cells 128f,128c

Real-lowering checks of the named Mosaic backward variants against the f32 reference, then
forward+backward TFLOP/s (forward counts 4*B*H*N^2*D, halved when causal; fwd+bwd 3.5x that;
H=16, batch x length = 16k tokens, bf16) of the variants next to jax.nn cuDNN in the same
process, and (part `ktimes`) the device time of each GPU kernel of one fwd+bwd call from a
profiler trace (the backward kernel alone, ours against cuDNN's). Part `compile` only compiles
the variants at a small shape (for MOSAIC_GPU_DUMP_TO / _PTXAS dumps set by the caller).
The main table and the forward live in bench/attention.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import attention as battn  # noqa: E402
from bench._common import kernel_times  # noqa: E402
from pallas_kernels import attention as attn  # noqa: E402

MOSAIC = dict(bwd_impl="mosaic")
ROWS = dict(MOSAIC, mgpu_bwd_rows=True)
VARIANTS = {
    "default": {},                                         # choose_bwd_impl's pick
    "split": dict(bwd_impl="split"),                       # Triton dq + dk/dv kernels
    "mosaic": MOSAIC,                                      # Mosaic, S^T layout, no lean step
    "plo": dict(MOSAIC, mgpu_bwd_p_lo=True),               # the D 128 full default
    "rows": ROWS,
    "rows_early": dict(ROWS, mgpu_bwd_ds_early=True),
    "rows_early_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dq="own"),
    # no producer warpgroup: 2 x 128 threads with 255 registers each (not 240)
    "plo_np": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_producer=False),
    "mosaic_np": dict(MOSAIC, mgpu_bwd_producer=False),
    "rows_early_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_producer=False),
    "overlap_np": dict(MOSAIC, mgpu_bwd_overlap=True, mgpu_bwd_producer=False),   # FA3 order, S^T
    "overlap_dqf_np": dict(MOSAIC, mgpu_bwd_overlap=True, mgpu_bwd_dq_fused=True,
                           mgpu_bwd_producer=False),
    # and dV issued before the dP wait (dS computed while dV runs)
    "rows_dv": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True),
    "rows_dv_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                       mgpu_bwd_producer=False),
    "rows_dqf_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                        mgpu_bwd_dq_fused=True, mgpu_bwd_producer=False),
    "rows_dqf_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                         mgpu_bwd_dq_fused=True, mgpu_bwd_dq="own"),
    # dq "own": each warpgroup reduces dS_w K_w over the full head dim (no per-step barrier)
    "rows_dv_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                        mgpu_bwd_dq="own"),
    "plo_own": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_dq="own"),
    # dq "own" without the producer: each warpgroup arrives on the slot's free barrier,
    # warpgroup 0 waits for both and refills (no per-step dS barrier)
    "plo_own_np": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_dq="own", mgpu_bwd_producer=False),
    "mosaic_own_np": dict(MOSAIC, mgpu_bwd_dq="own", mgpu_bwd_producer=False),
    "rows_dv_own_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                           mgpu_bwd_dq="own", mgpu_bwd_producer=False),
}
VARIANTS.update({
    # the dispatch's Mosaic options of the cell, forced at any length (MOSAIC_BWD_MIN_LK off)
    "mosaic_opts": lambda d, c: dict(bwd_impl="mosaic", **attn.MOSAIC_BWD_OPTS.get((d, c), {})),
    "default_einsum": dict(bwd_delta="einsum"),            # sessions 1-4's delta fusion
    "default_barrier": dict(bwd_delta="rowsum_barrier"),
})


def _cfg(name, d, causal):
    cfg = VARIANTS[name]
    return cfg(d, causal) if callable(cfg) else cfg


def _attn_fn(name, d, causal, **extra):
    """fn(q, k, v) of jax.nn cuDNN ("cudnn") or of our kernel with the named variant."""
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    cfg = {**_cfg(name, d, causal), **extra}
    return lambda q, k, v: attn.flash_attention_kernel(q, k, v, causal=causal, **cfg)


_SAVE = [lambda: None]     # main() puts the results writer here (results survive a timeout)
CELLS = {"128f": (128, False), "128c": (128, True), "64f": (64, False), "64c": (64, True)}


def checks(results, deadline, names, order=None):
    """Each variant on two cases (D 128 causal GQA ragged, D 128 full GQA; the first variant also
    D 64 and D 128 causal window MQA and D 128 full at 2048) against the f32 reference."""
    rows = results.setdefault("correctness", [])
    cases = [(2, 1000, 8, 2, 128, True, None), (1, 777, 4, 2, 128, False, None),
             (1, 2048, 8, 1, 64, True, 300), (1, 2048, 8, 1, 128, True, 300),
             (2, 2048, 4, 4, 128, False, None), (1, 4096, 8, 1, 128, True, 300)]
    order = order or list(range(len(cases)))
    for j, name in enumerate(names):
        for i in order:
            b, n, hq, hkv, d, causal, window = cases[i]
            if time.time() > deadline or (i >= 2 and j > 0):
                continue
            q, k, v, do = battn._inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16,
                                        seed=500 + 10 * j + i)
            kw = dict(causal=causal, window=window)
            row = dict(case=f"{name} b{b} n{n} hq{hq} hkv{hkv} d{d} causal={causal} "
                            f"window={window}", variant=name)
            battn._check_against_reference(rows, row, attn.flash_attention_kernel,
                                           (q, k, v, do), kw, _cfg(name, d, causal),
                                           err_chars=600)
            _SAVE[0]()


def throughput(results, deadline, names, cells, lengths):
    out = results.setdefault("bwd_tput", [])
    for n, cell in [(n, c) for n in lengths for c in cells]:
        b = battn.TOKENS // n
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
        flops = 4 * b * battn.H * n * n * d / (2 if causal else 1) * 3.5
        for name in ["cudnn"] + names:
            fn = _attn_fn(name, d, causal)
            row = dict(d=d, causal=causal, n=n, mode="fwd+bwd", impl=name)
            battn._timed(row, deadline, flops, "bwd", out, battn._fwd_bwd(fn), q, k, v, do)
            _SAVE[0]()


def ktimes(results, deadline, names, cells, n):
    """Device time (us per call) of each GPU kernel of one fwd+bwd call."""
    out = results.setdefault("kernel_times", [])
    b = battn.TOKENS // n
    for cell in cells:
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
        for name in ["cudnn"] + names:
            if time.time() > deadline:
                return
            fn = _attn_fn(name, d, causal)
            row = dict(d=d, causal=causal, n=n, impl=name)
            try:
                kt = kernel_times(battn._fwd_bwd(fn), (q, k, v, do), runs=5, top=8)
                row["kernels"] = {line: ev for line, ev in kt.items() if "XLA" not in line}
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("ktimes", json.dumps(row), flush=True)
            out.append(row)
            _SAVE[0]()


def compile_only(results, deadline, names, cells):
    rows = results.setdefault("compiled", [])
    for cell in cells:
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((1, 512, 4, d), (1, 512, 4, d), jnp.bfloat16)
        for name in names:
            if time.time() > deadline:
                return
            row = dict(variant=name, d=d, causal=causal)
            t = time.time()
            try:
                fn = battn._fwd_bwd(_attn_fn(name, d, causal, fwd_impl="triton"))
                jax.block_until_ready(fn(q, k, v, do))
                row["s"] = round(time.time() - t, 2)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("compiled", row, flush=True)
            rows.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_bwd.json")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--parts", default="check:0.3,tput:1.0")
    ap.add_argument("--variants", default="default,split,rows_early")
    ap.add_argument("--check-variants", default="")
    ap.add_argument("--kvariants", default="", help="variants of part ktimes (default: the "
                    "first three of --variants)")
    ap.add_argument("--check-cases", default="", help="indices into checks()'s cases, in order")
    ap.add_argument("--cells", default="128f,128c")
    ap.add_argument("--n", default="4096", help="comma-separated lengths (tput); ktimes: first")
    args = ap.parse_args()
    t0 = time.time()
    results = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__,
                   device=str(jax.devices()[0].device_kind), argv=sys.argv[1:])
    names = [s for s in args.variants.split(",") if s]
    check_names = [s for s in args.check_variants.split(",") if s] or names
    cells = [s for s in args.cells.split(",") if s]
    lengths = [int(x) for x in args.n.split(",")]
    order = [int(x) for x in args.check_cases.split(",") if x]
    steps = {"check": lambda dl: checks(results, dl, check_names, order),
             "tput": lambda dl: throughput(results, dl, names, cells, lengths),
             "ktimes": lambda dl: ktimes(results, dl, [s for s in args.kvariants.split(",") if s]
                                         or names[:3], cells, lengths[0]),
             "compile": lambda dl: compile_only(results, dl, names, cells)}
    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    _SAVE[0] = save
    for part in args.parts.split(","):
        p, frac = part.split(":")
        steps[p](t0 + args.budget * float(frac))
        results.setdefault("elapsed", {})[p] = round(time.time() - t0, 1)
        save()


if __name__ == "__main__":
    main()

"""Gated linear attention on one GPU: real-lowering correctness, then times against the anchors.

    PYTHONUNBUFFERED=1 python3 bench/gla.py --out $OUT/gla.json [--budget 200] [--no-fla]

In one run: (1) forward, final state and all gradients of our Pallas kernels against the f32
step-by-step recurrence (f32 and bf16, ragged length, initial state, Dk != Dv, strong decay);
(2) forward and forward+backward times, bf16, B=8, H=16, head dims 64 and 128, T = 2k/8k/32k,
of ours (default sequential schedule; column cp: the chunk-parallel schedule), of our jnp
chunked reference under jit (T <= 8k: its [C, C, Dk] decay tensor does not
fit at 32k) and of fla's `chunk_gla` (PyTorch + Triton, from the fla-core wheel); tokens/s and
ratios. fla autotunes every kernel over 24-96 configs on first use (minutes); `--fla-configs N`
keeps the first N configs with num_warps=4, num_stages=2 per kernel, which the table then says.
Cells past the time budget are skipped and say so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
gla_mod = importlib.import_module("pallas_kernels.gla")
from bench._common import rel_error, timeit_ms  # noqa: E402

B, H = 8, 16
T0 = time.perf_counter()


def _elapsed():
    return time.perf_counter() - T0


_timeit = timeit_ms
_rel = rel_error


def _inputs(b, t, h, dk, dv, dtype, seed=0, log_g_min=-1.0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    g = jax.random.uniform(ks[3], (b, t, h, dk), jnp.float32, log_g_min, 0.0).astype(dtype)
    s0 = jax.random.normal(ks[4], (b, h, dk, dv), jnp.float32)
    do = jax.random.normal(ks[5], (b, t, h, dv), dtype)
    return q, k, v, g, s0, do


def _fwd(backend, blocks=None):
    if backend == "pallas" and blocks is not None:
        return jax.jit(lambda q, k, v, g: gla_mod.gla_pallas(q, k, v, g, blocks=blocks)[0])
    return jax.jit(lambda q, k, v, g: gla_mod.gla(q, k, v, g, backend=backend))


def _fwd_bwd(backend, blocks=None):
    fwd = _fwd(backend, blocks)

    def f(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)  # o returned: otherwise XLA drops the forward kernel
    return jax.jit(f)


def check_correctness(results, n_cases):
    """Ours (real lowering) against the f32 recurrence: outputs, final state, all gradients."""
    cases = [("bf16 T=300 Dk=Dv=128 log_g>=-5", 2, 300, 4, 128, 128, jnp.bfloat16, -5.0, 2e-2),
             ("f32 T=300 Dk=64 Dv=128 log_g>=-5", 2, 300, 2, 64, 128, jnp.float32, -5.0, 1e-3),
             ("bf16 T=1000 Dk=Dv=128 log_g>=-5", 2, 1000, 4, 128, 128, jnp.bfloat16, -5.0, 2e-2),
             ("bf16 T=777 Dk=Dv=64 log_g>=-0.1", 2, 777, 4, 64, 64, jnp.bfloat16, -0.1, 2e-2)]
    for case in cases[:n_cases]:
        results["correctness"].append(_check_case(*case))


def _check_case(name, b, t, h, dk, dv, dtype, gmin, tol):
    q, k, v, g, s0, do = _inputs(b, t, h, dk, dv, dtype, seed=t, log_g_min=gmin)
    up = lambda x: x.astype(jnp.float32)
    w = jax.random.normal(jax.random.key(1), (b, h, dk, dv))

    def loss(fn, q, k, v, g, s0):
        o, st = fn(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32) * up(do)) + jnp.sum(st * w), (o, st)

    ours = lambda q, k, v, g, s0: gla_mod.gla(q, k, v, g, initial_state=s0, return_state=True,
                                              backend="pallas")

    def ref(q, k, v, g, s0):
        with jax.default_matmul_precision("highest"):  # no tf32 in the f32 reference
            return gla_mod.gla_recurrent_reference(up(q), up(k), up(v), up(g), initial_state=s0)

    grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), (0, 1, 2, 3, 4), has_aux=True))
    (g_o, (o, st)), (g_r, (o_r, st_r)) = grad(ours)(q, k, v, g, s0), grad(ref)(q, k, v, g, s0)
    errs = {"o": _rel(o, o_r), "state": _rel(st, st_r)}
    errs.update({n: _rel(a, r) for n, a, r in
                 zip(("dq", "dk", "dv", "dlog_g", "ds0"), g_o, g_r, strict=True)})
    # bf16 dlog_g: a reverse cumsum (inside a chunk) of differences of bf16-matmul terms.
    dg_tol = 3 * tol if dtype == jnp.bfloat16 else tol
    ok = all(e <= (dg_tol if n == "dlog_g" else tol) for n, e in errs.items())
    print(f"[check] {name}: {'OK' if ok else 'FAIL'} "
          + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
    return {"case": name, "ok": ok, "tol": tol, **errs}


def _fla_setup(n_configs):
    """Import fla with each autotuned kernel cut to `n_configs` configs (0 = full autotune)."""
    if n_configs:
        from triton.runtime import autotuner
        init = autotuner.Autotuner.__init__

        def pruned_init(self, fn, arg_names, configs, *args, **kwargs):
            keep = [c for c in configs if c.num_warps == 4 and c.num_stages == 2] or configs
            init(self, fn, arg_names, keep[:n_configs], *args, **kwargs)
        autotuner.Autotuner.__init__ = pruned_init
    from fla.ops.gla import chunk_gla
    return chunk_gla


def _fla_times(chunk_gla, d, t):
    import torch
    import triton
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v, do = mk(B, t, H, d), mk(B, t, H, d), mk(B, t, H, d), mk(B, t, H, d)
    g = -torch.rand(B, t, H, d, device="cuda", generator=gen).to(torch.bfloat16)
    for x in (q, k, v, g):
        x.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return chunk_gla(q, k, v, g)[0]

    def fwd_bwd():
        o = chunk_gla(q, k, v, g)[0]
        return torch.autograd.grad(o, (q, k, v, g), do)

    fwd_bwd()  # autotunes (once per head dim) and compiles
    out = {"fwd": triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median"),
           "fwd_bwd": triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")}
    return out


def run_timings(results, dims, lengths, budget, fla_configs, with_fla, ref_max_t,
                chunk_parallel):
    rows = results["timings"]
    for d in dims:
        for t in lengths:
            row = {"d": d, "t": t}
            rows.append(row)
            if _elapsed() > budget:
                row["skipped"] = "time budget"
                continue
            q, k, v, g, _, do = _inputs(B, t, H, d, d, jnp.bfloat16, seed=t + d)
            candidates = [("ours", "pallas", None), ("ref", "reference", None)]
            if chunk_parallel:
                candidates.insert(1, ("cp", "pallas",
                                      gla_mod.GLABlocks(schedule="chunk_parallel")))
            for name, backend, blocks in candidates:
                if backend == "reference" and t > ref_max_t:
                    row["ref"] = f"not run (T > {ref_max_t})"
                    continue
                try:
                    row[f"{name}_fwd"] = _timeit(_fwd(backend, blocks), q, k, v, g)
                    row[f"{name}_fwd_bwd"] = _timeit(_fwd_bwd(backend, blocks), q, k, v, g, do,
                                                     iters=5)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
            del q, k, v, g, do
            print(f"[time {_elapsed():.0f}s] {row}", flush=True)
    if not with_fla:
        return
    try:
        chunk_gla = _fla_setup(fla_configs)
    except Exception as e:  # noqa: BLE001
        results["fla_error"] = f"{type(e).__name__}: {e}"
        print(results["fla_error"], flush=True)
        return
    for row in rows:
        if "skipped" in row:
            continue
        if _elapsed() > budget:
            row["fla"] = "skipped: time budget"
            continue
        try:
            t0 = time.perf_counter()
            fla = _fla_times(chunk_gla, row["d"], row["t"])
            row["fla_fwd"], row["fla_fwd_bwd"] = fla["fwd"], fla["fwd_bwd"]
            row["fla_first_call_s"] = time.perf_counter() - t0
            import torch
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        print(f"[fla {_elapsed():.0f}s] {row}", flush=True)


def run_variants(results, budget):
    """Block-size variants of our kernels at one shape (D=128, T=8k)."""
    d, t = 128, 8192
    q, k, v, g, _, do = _inputs(B, t, H, d, d, jnp.bfloat16, seed=3)
    variants = {
        "fwd block_v=32, dq block_k=32": gla_mod.GLABlocks(block_v=32, block_k=32),
        "num_stages=1": gla_mod.GLABlocks(num_stages=1),
        "num_stages=3": gla_mod.GLABlocks(num_stages=3),
        "chunk_parallel, block_v=128": gla_mod.GLABlocks(schedule="chunk_parallel",
                                                         block_v=128),
        "dkv unsplit (block_k_dkv=128, 8 warps)": gla_mod.GLABlocks(block_k_dkv=128,
                                                                   num_warps_dkv=8),
    }
    for name, blocks in variants.items():
        if _elapsed() > budget:
            results["variants"].append({"name": name, "skipped": "time budget"})
            continue
        row = {"name": name}
        try:
            row["fwd"] = _timeit(_fwd("pallas", blocks), q, k, v, g)
            row["fwd_bwd"] = _timeit(_fwd_bwd("pallas", blocks), q, k, v, g, do, iters=5)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["variants"].append(row)
        print(f"[variant {_elapsed():.0f}s] {row}", flush=True)


def report(results):
    lines = ["| Dk=Dv | T | ours fwd ms | ours fwd+bwd ms | cp fwd | cp fwd+bwd | ref fwd | "
             "ref fwd+bwd | fla fwd | fla fwd+bwd | fwd vs fla | fwd+bwd vs fla | "
             "fwd+bwd vs ref | Mtok/s fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: f"{x:.2f}" if isinstance(x, float) else "-"
    r = lambda a, b: f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"
    for row in results["timings"]:
        tok = (B * row["t"] / row["ours_fwd_bwd"] / 1e3 if isinstance(row.get("ours_fwd_bwd"),
                                                                        float) else None)
        lines.append(
            f"| {row['d']} | {row['t']} | {f(row.get('ours_fwd'))} | "
            f"{f(row.get('ours_fwd_bwd'))} | {f(row.get('cp_fwd'))} | "
            f"{f(row.get('cp_fwd_bwd'))} | {f(row.get('ref_fwd'))} | "
            f"{f(row.get('ref_fwd_bwd'))} | {f(row.get('fla_fwd'))} | "
            f"{f(row.get('fla_fwd_bwd'))} | {r(row.get('fla_fwd'), row.get('ours_fwd'))} | "
            f"{r(row.get('fla_fwd_bwd'), row.get('ours_fwd_bwd'))} | "
            f"{r(row.get('ref_fwd_bwd'), row.get('ours_fwd_bwd'))} | {f(tok)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gla_bench.json")
    p.add_argument("--budget", type=float, default=200.0, help="seconds; later cells skip")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-configs", type=int, default=2)
    p.add_argument("--dims", default="128,64")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--checks", type=int, default=4, help="how many correctness cases")
    p.add_argument("--no-chunk-parallel", action="store_true",
                   help="skip the chunk-parallel schedule (column cp)")
    p.add_argument("--ref-max-t", type=int, default=8192,
                   help="longest T for the jnp reference (its [T/16, 16, 16, Dk] f32 decay "
                        "tensor does not fit at 32k)")
    args = p.parse_args()
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "B": B, "H": H, "dtype": "bfloat16",
               "fla_configs_per_kernel": args.fla_configs or "all",
               "correctness": [], "timings": [], "variants": []}
    try:
        check_correctness(results, args.checks)
    except Exception as e:  # noqa: BLE001
        results["correctness_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        traceback.print_exc()
    dims = [int(x) for x in args.dims.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    run_timings(results, dims, lengths, args.budget, args.fla_configs, not args.no_fla,
                args.ref_max_t, not args.no_chunk_parallel)
    if args.variants:
        run_variants(results, args.budget)
    results["table"] = report(results)
    results["elapsed_s"] = _elapsed()
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(results["table"])
    for row in results["variants"]:
        print(row)


if __name__ == "__main__":
    main()

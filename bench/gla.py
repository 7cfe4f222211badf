"""Gated linear attention on one GPU: real-lowering correctness, then times against the anchors.

    PYTHONUNBUFFERED=1 python3 bench/gla.py --out $OUT/gla.json [--budget 200] [--no-fla]
        [--dims 128,64] [--lengths 2048,8192] [--hybrid] [--variants] [--stages]

In one run: (1) forward, final state and all gradients of our Pallas kernels (both schedules)
against the f32 step-by-step recurrence (f32 and bf16, ragged length, initial state, Dk != Dv,
strong decay); (2) forward and forward+backward times, bf16, B=8, H=16, Dk=Dv from --dims, of
ours with the default tiling under each schedule (columns seq, cp; `auto` says which one the
default picks), of our jnp chunked reference under jit (T <= --ref-max-t) and of fla's
`chunk_gla` (PyTorch + Triton, from the fla-core wheel), timed right after ours in the same
cell; (3) --hybrid: the GLA shape of configs/hybrid_3to1_gpu.yaml (B=8 and 16, H=6, Dk=64,
Dv=128, T=2048); (4) --variants: tilings at D=128, T=2048; (5) --stages: each pallas_call pass
alone at D=128, T=2048. fla autotunes every kernel over 24-96 configs on first use (minutes);
`--fla-configs N` keeps the first N configs with num_warps=4, num_stages=2 per kernel, which the
JSON records. Our variants of a cell compile in parallel threads. The JSON is rewritten after
every cell, so a timeout keeps what finished; cells past --budget are skipped and say so.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import os
import re
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
gla_mod = importlib.import_module("pallas_kernels.gla")
from bench._common import kernel_times, rel_error, timeit_ms  # noqa: E402

B, H = 8, 16
T0 = time.perf_counter()
GB = gla_mod.GLABlocks
REF_BG = False   # --ref-bg: the reference compiled in background threads, timed last
TIMER = {"loop": False}   # --timer loop: also the looped-jit / CUDA-event times (keys *_loop)
# Session 1-2 tilings: 16-row state steps and diagonal blocks, f32 stored states (explicit: the
# GLABlocks defaults changed to 64-row steps, so GB(schedule=...) alone is seq64 / cp64).
_SUB16 = dict(sub_chunk=16, intra_block=16, bf16_states=False)
SEQ, CP = GB(schedule="sequential", **_SUB16), GB(schedule="chunk_parallel", **_SUB16)


def _elapsed():
    return time.perf_counter() - T0


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
        return lambda q, k, v, g: gla_mod.gla_pallas(q, k, v, g, blocks=blocks)[0]
    return lambda q, k, v, g: gla_mod.gla(q, k, v, g, backend=backend)


def _fwd_bwd(backend, blocks=None):
    fwd = _fwd(backend, blocks)

    def f(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)  # o returned: otherwise XLA drops the forward kernel
    return f


def _compile_all(items, args_of):
    """{name: compiled} for items {name: fn}, compiled in parallel threads (XLA's compile of
    the Triton kernels releases the GIL); failures map to the error string."""
    def one(name):
        try:
            fn = items[name]
            fn.__name__ = re.sub(r"\W+", "_", name)   # names the XLA module (PTX dumps)
            return name, jax.jit(fn).lower(*args_of(name)).compile()
        except Exception as e:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            return name, f"{type(e).__name__}: {str(e)[:300]}"
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(items) or 1)) as ex:
        return dict(ex.map(one, list(items)))


def _loop_n(t):
    """Calls per looped jit (--timer loop): ~10-40 ms of work per call at B=8, H=16."""
    return max(4, int(40 * 2048 / t))


def _looped(fn, n):
    """fn called n times inside one jit (lax.fori_loop): one dispatch for n calls, so the time
    per call is device time back to back, free of host launch and scheduling noise. The inputs
    pass through an optimization_barrier in the loop body (otherwise XLA hoists the
    loop-invariant call out of the loop); the last call's outputs are the result."""
    def run(*args):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))

        def body(_, carry):
            a = jax.lax.optimization_barrier(carry[0])
            return a, fn(*a)
        return jax.lax.fori_loop(0, n, body, (args, zeros))[1]
    return run


def timeit_loop_ms(fn, n, *args, reps=5):
    """Median over `reps` of (wall time of one call of the looped jit `fn`) / n, in ms."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) / n * 1e3)
    return float(np.median(times))


def _time_into(row, compiled, args_of, loop_n=None):
    for name, fn in compiled.items():
        if isinstance(fn, str):
            row[f"{name}_error"] = fn
            continue
        try:
            mem = fn.memory_analysis()   # XLA's buffer assignment: scratch + outputs
            if mem is not None and not name.endswith("_loop"):
                row[f"{name}_mem_mb"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
        except Exception:  # noqa: BLE001, S110 - memory is optional
            pass
        try:
            if name.endswith("_loop"):
                row[name] = timeit_loop_ms(fn, loop_n, *args_of(name))
                continue
            row[name] = timeit_ms(fn, *args_of(name), iters=5 if "fwd_bwd" in name else 10)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()


def _agreement(row, compiled, args_of, names):
    """Largest relative difference over o and the four gradients of each candidate against the
    first one (same inputs, real lowering): every tiling must compute the same function."""
    if len(names) < 2:
        return
    first = compiled.get(f"{names[0]}_fwd_bwd")
    if first is None or isinstance(first, str):
        return
    base = jax.tree.leaves(first(*args_of(f"{names[0]}_fwd_bwd")))
    for name in names[1:]:
        fn = compiled.get(f"{name}_fwd_bwd")
        if fn is None or isinstance(fn, str):
            continue
        outs = jax.tree.leaves(fn(*args_of(f"{name}_fwd_bwd")))
        row[f"{name}_vs_{names[0]}"] = max(rel_error(a, b) for a, b in zip(outs, base,
                                                                           strict=True))


def _close_to_best(row, cands, slack=1.25):
    """The candidates within `slack` of the fastest in `row` (forward or forward+backward),
    plus the first (the baseline): the longer lengths time only those."""
    keep = {}
    for kind in ("fwd", "fwd_bwd"):
        times = {n: row.get(f"{n}_{kind}") for n in cands}
        times = {n: x for n, x in times.items() if isinstance(x, float)}
        if times:
            best = min(times.values())
            keep.update({n: cands[n] for n, x in times.items() if x <= slack * best})
    first = next(iter(cands))
    return {first: cands[first], **keep}


def _save(results, path):
    results["elapsed_s"] = _elapsed()
    results["table"] = report(results)
    with open(path + ".tmp", "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------ correctness


def check_correctness(results, n_cases, out):
    """Ours (real lowering) against the f32 recurrence: outputs, final state, all gradients.
    The cases' jits compile in parallel threads, then run one after the other."""
    v = VARIANTS
    bf, f32 = jnp.bfloat16, jnp.float32
    # First the default (session 4: fast_exp, cumsum_matmul, the dv kernel over 128 columns)
    # at D=128 on both sides of the 64-row block's decay guard, D=64 and Dk=64/Dv=128, then
    # fxma / fxmadv128 / fx (session 4's candidates), then the guard split into two kernels with
    # the common kernels contracting in slices, then the other dk/dv kernel forms (fused
    # chunk-parallel, sequential split and fused).
    # Shapes: (label, batch, T, heads, Dk, Dv, dtype, lowest log-gate, tolerance).
    shapes = {"d128g1": ("bf16 T=300 Dk=Dv=128 log_g>=-1", 2, 300, 4, 128, 128, bf, -1.0, 2e-2),
              "d128g5": ("bf16 T=300 Dk=Dv=128 log_g>=-5", 2, 300, 4, 128, 128, bf, -5.0, 2e-2),
              "d64": ("bf16 T=777 Dk=Dv=64 log_g>=-0.1", 2, 777, 4, 64, 64, bf, -0.1, 2e-2),
              "k64v128": ("bf16 T=300 Dk=64 Dv=128 log_g>=-1", 2, 300, 2, 64, 128, bf, -1.0,
                          2e-2),
              "k64v128f32": ("f32 T=300 Dk=64 Dv=128 log_g>=-1", 2, 300, 2, 64, 128, f32, -1.0,
                             1e-3)}
    four = ("d128g1", "d128g5", "d64", "k64v128")
    plan = ([(sh, "default") for sh in four] + [(sh, "fxma") for sh in four]
            + [("d128g1", "fxmadv128")] + [(sh, "fx") for sh in four[:3]]
            + [("d128g1", "gk64dv128"), ("d128g5", "g"), ("k64v128f32", "hyb64"),
               ("d128g5", "seq"), ("d64", "seq64"), ("d128g1", "cp64f32"), ("d64", "cp")])
    blocks = {"seq": SEQ, "cp": CP}
    cases = [(f"{shapes[sh][0]} {name}", *shapes[sh][1:], blocks.get(name) or v[name])
             for sh, name in plan]
    prepared = [_check_case(*case) for case in cases[:n_cases]]
    compiled = _compile_all({p["name"] + " ours": p["ours"] for p in prepared}
                            | {p["name"] + " ref": p["ref"] for p in prepared},
                            lambda name: next(p["args"] for p in prepared
                                              if name.startswith(p["name"] + " ")))
    for p in prepared:
        try:
            results["correctness"].append(p["finish"](compiled[p["name"] + " ours"],
                                                      compiled[p["name"] + " ref"]))
        except Exception as e:  # noqa: BLE001
            results["correctness"].append({"case": p["name"], "error": f"{type(e).__name__}: "
                                           f"{str(e)[:300]}"})
            traceback.print_exc()
        _save(results, out)


def _check_case(name, b, t, h, dk, dv, dtype, gmin, tol, blocks):
    """The two functions to compile (ours, the f32 recurrence: gradient of a weighted sum of
    the outputs and the final state, with the outputs), their inputs, and `finish`."""
    q, k, v, g, s0, do = _inputs(b, t, h, dk, dv, dtype, seed=t, log_g_min=gmin)
    up = lambda x: x.astype(jnp.float32)
    w = jax.random.normal(jax.random.key(1), (b, h, dk, dv))

    def loss(fn, q, k, v, g, s0):
        o, st = fn(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32) * up(do)) + jnp.sum(st * w), (o, st)

    ours = lambda q, k, v, g, s0: gla_mod.gla_pallas(q, k, v, g, initial_state=s0,
                                                     blocks=blocks)

    def ref(q, k, v, g, s0):
        with jax.default_matmul_precision("highest"):  # no tf32 in the f32 reference
            return gla_mod.gla_recurrent_reference(up(q), up(k), up(v), up(g), initial_state=s0)

    grad = lambda fn: jax.grad(lambda *a: loss(fn, *a), (0, 1, 2, 3, 4), has_aux=True)

    def finish(ours_c, ref_c):
        if isinstance(ours_c, str) or isinstance(ref_c, str):
            raise RuntimeError(ours_c if isinstance(ours_c, str) else ref_c)
        (g_o, (o, st)), (g_r, (o_r, st_r)) = ours_c(*args), ref_c(*args)
        errs = {"o": rel_error(o, o_r), "state": rel_error(st, st_r)}
        errs.update({n: rel_error(a, r) for n, a, r in
                     zip(("dq", "dk", "dv", "dlog_g", "ds0"), g_o, g_r, strict=True)})
        # dlog_g: a reverse cumsum (inside a chunk) of differences of matmul terms, which are
        # bf16 operands for bf16 and tf32 (Triton's f32 dot) for f32 inputs.
        dg_tol = 3 * tol if dtype == jnp.bfloat16 else 10 * tol
        ok = all(e <= (dg_tol if n == "dlog_g" else tol) for n, e in errs.items())
        print(f"[check {_elapsed():.0f}s] {name}: {'OK' if ok else 'FAIL'} "
              + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
        return {"case": name, "ok": ok, "tol": tol, "dlog_g_tol": dg_tol, **errs}

    args = (q, k, v, g, s0)
    return dict(name=name, ours=grad(ours), ref=grad(ref), args=args, finish=finish)


# ------------------------------------------------------------------------------ fla


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


def _fla_times(chunk_gla, b, t, h, dk, dv):
    import torch
    import triton
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v, do = mk(b, t, h, dk), mk(b, t, h, dk), mk(b, t, h, dv), mk(b, t, h, dv)
    g = -torch.rand(b, t, h, dk, device="cuda", generator=gen).to(torch.bfloat16)
    for x in (q, k, v, g):
        x.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return chunk_gla(q, k, v, g)[0]

    def fwd_bwd():
        o = chunk_gla(q, k, v, g)[0]
        return torch.autograd.grad(o, (q, k, v, g), do)

    fwd_bwd()  # autotunes (once per shape class) and compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    mem = {"fla_fwd_bwd_mem_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    out = {"fla_fwd": triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median"),
           "fla_fwd_bwd": triton.testing.do_bench(fwd_bwd, warmup=25, rep=100,
                                                  return_mode="median"), **mem}
    if TIMER["loop"]:
        out["fla_fwd_loop"] = _cuda_events_ms(fwd, _loop_n(t))
        out["fla_fwd_bwd_loop"] = _cuda_events_ms(fwd_bwd, _loop_n(t))
    return out


def _cuda_events_ms(fn, n, reps=5):
    """fla's counterpart of timeit_loop_ms: CUDA events around n back-to-back calls (no L2
    flush between them, unlike do_bench), median over reps of the mean per call, in ms."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return float(np.median(times))


class _Fla:
    def __init__(self, enabled, n_configs, results):
        self.enabled, self.n_configs, self.results, self.fn = enabled, n_configs, results, None

    def time_into(self, row, b, t, h, dk, dv):
        if not self.enabled:
            return
        try:
            if self.fn is None:
                self.fn = _fla_setup(self.n_configs)
            t0 = time.perf_counter()
            row.update(_fla_times(self.fn, b, t, h, dk, dv))
            row["fla_first_call_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
            self.enabled = False


# ------------------------------------------------------------------------------ timings


def run_cell(results, key, b, t, h, dk, dv, candidates, *, budget, fla, ref_max_t, out):
    """One shape: every candidate {name: blocks} forward and forward+backward, the reference,
    fla; one row in results[key]."""
    row = {"b": b, "t": t, "h": h, "dk": dk, "dv": dv}
    results[key].append(row)
    if _elapsed() > budget:
        row["skipped"] = "time budget"
        _save(results, out)
        return
    auto = gla_mod._pick_schedule(GB(), b, h, gla_mod._pow2_at_least_16(dv)).schedule
    row["auto"] = auto
    q, k, v, g, _, do = _inputs(b, t, h, dk, dv, jnp.bfloat16, seed=t + dk)
    items = {}
    n = row["loop_n"] = _loop_n(t)
    for name, blocks in candidates.items():
        items[f"{name}_fwd"] = _fwd("pallas", blocks)
        items[f"{name}_fwd_bwd"] = _fwd_bwd("pallas", blocks)
        if TIMER["loop"]:
            items[f"{name}_fwd_loop"] = _looped(_fwd("pallas", blocks), n)
            items[f"{name}_fwd_bwd_loop"] = _looped(_fwd_bwd("pallas", blocks), n)
    if t <= ref_max_t and not REF_BG:
        items["ref_fwd"], items["ref_fwd_bwd"] = _fwd("reference"), _fwd_bwd("reference")
    args_of = lambda name: (q, k, v, g, do) if "fwd_bwd" in name else (q, k, v, g)
    t0 = time.perf_counter()
    compiled = _compile_all(items, args_of)
    row["compile_s"] = time.perf_counter() - t0
    _time_into(row, compiled, args_of, loop_n=n)
    _agreement(row, compiled, args_of, list(candidates))
    del compiled
    fla.time_into(row, b, t, h, dk, dv)
    print(f"[{key} {_elapsed():.0f}s] {row}", flush=True)
    _save(results, out)


def start_ref_compiles(cells, ref_max_t):
    """--ref-bg: the jnp reference's jits (XLA compiles them in minutes: a slow reduction
    fusion) compiled in background threads from the start, timed after our cells
    (`time_refs`). {(d, t): {name: future}}."""
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    futures = {}
    for d, t in cells:
        if t > ref_max_t or (d, t) in futures:
            continue
        spec = jax.ShapeDtypeStruct((B, t, H, d), jnp.bfloat16)
        compile_ = lambda fn, n_args, spec: jax.jit(fn).lower(*[spec] * n_args).compile()
        futures[(d, t)] = {"ref_fwd": ex.submit(compile_, _fwd("reference"), 4, spec),
                           "ref_fwd_bwd": ex.submit(compile_, _fwd_bwd("reference"), 5, spec)}
    ex.shutdown(wait=False)
    return futures


def time_refs(results, futures, deadline, out):
    """Times the background-compiled references into their cells' rows (the first row of each
    shape), waiting for a compile until `deadline` (seconds since the start)."""
    for (d, t), named in futures.items():
        row = next((r for r in results["timings"] if r["dk"] == d and r["t"] == t
                    and "skipped" not in r), None)
        if row is None:
            continue
        q, k, v, g, _, do = _inputs(B, t, H, d, d, jnp.bfloat16, seed=t + d)
        for name, fut in named.items():
            try:
                fn = fut.result(timeout=max(0.0, deadline - _elapsed()))
                row[f"{name}_compile_done_s"] = _elapsed()
                mem = fn.memory_analysis()
                if mem is not None:
                    row[f"{name}_mem_mb"] = (mem.temp_size_in_bytes
                                             + mem.output_size_in_bytes) / 2**20
                args = (q, k, v, g, do) if name.endswith("fwd_bwd") else (q, k, v, g)
                row[name] = timeit_ms(fn, *args, iters=3, reps=3)
            except concurrent.futures.TimeoutError:
                row[f"{name}_error"] = f"compile not done by {deadline:.0f} s"
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            print(f"[ref {_elapsed():.0f}s] D={d} T={t} {name}: {row.get(name)} "
                  f"{row.get(name + '_error', '')}", flush=True)
            _save(results, out)


def run_stages(results, b, t, h, d, out, budget, only=None):
    """Each pass alone (its own jit), D=Dk=Dv=d: where the time goes. `only`: item names."""
    if _elapsed() > budget:
        results["stages"].append({"skipped": "time budget"})
        return
    q, k, v, g, s0, do = _inputs(b, t, h, d, d, jnp.bfloat16, seed=5)
    dst = jax.random.normal(jax.random.key(9), s0.shape, jnp.float32)
    m = gla_mod
    kw = lambda blocks: dict(scale=d ** -0.5, blocks=blocks, interpret=False)
    rep = dataclasses.replace
    v_ = VARIANTS
    cp64 = v_["cp64"]
    # Residuals the backward passes take, computed once; every item takes these arguments (no
    # large constants in the compiled modules).
    s_end = None   # (the sequential dk/dv items that took the dq pass's states are gone)
    states64 = jax.jit(lambda *a: m._gla_fwd_call(*a, **kw(cp64))[2])(q, k, v, g, s0)
    dstates64 = jax.jit(lambda *a: m._bwd_dstates_pass(*a, **kw(cp64))[0])(q, g, do, dst)
    dq32 = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)
    args = (q, k, v, g, s0, do, dst, dq32, s_end, states64, dstates64)
    fwd = lambda blocks: (lambda q, k, v, g, s0, *_: m._gla_fwd_call(q, k, v, g, s0,
                                                                     **kw(blocks)))
    # The chunk pass's output is unused here: XLA drops that pallas_call.
    states = lambda name: (lambda q, k, v, g, s0, *_: m._gla_fwd_call(q, k, v, g, s0,
                                                                      **kw(v_[name]))[2])
    dstates = lambda name: (lambda q, k, v, g, s0, do, dst, *_: m._bwd_dstates_pass(
        q, g, do, dst, **kw(v_[name])))
    dkv = lambda blocks: (lambda q, k, v, g, s0, do, dst, dq32, s_end, st, dst_: m._bwd_dkv_pass(
        q, k, v, g, do, None, st, dst_, **kw(blocks))[:4])
    split = dict(dkv_split=True)
    items = {
        "seq fwd": fwd(SEQ),
        **{f"{n} fwd (states + chunks)": fwd(v_[n])
           for n in ("default", "cp64", "v64", "told", "t32", "g", "gk64")},
        **{f"{n} states pass": states(n) for n in ("default", "t32", "cp64", "cp64s64")},
        **{f"{n} dstates pass": dstates(n) for n in ("default", "t32")},
        **{f"{n} dkv chunks split": dkv(rep(v_[n], **split))
           for n in ("default", "g", "gk64", "gk64w8", "gk64dv128")},
        "default dkv chunks fused": dkv(rep(v_["default"], dkv_split=False)),
        "g dkv chunks fused": dkv(rep(v_["g"], dkv_split=False)),
    }
    if only:
        items = {n: f for n, f in items.items() if n in only}
    compiled = _compile_all(items, lambda name: args)
    row = {"b": b, "t": t, "h": h, "d": d}
    _time_into(row, compiled, lambda name: args)
    results["stages"].append(row)
    print(f"[stages {_elapsed():.0f}s] {row}", flush=True)
    _save(results, out)


_SUB64 = dict(sub_chunk=64, intra_block=64, bf16_states=True)
# The per-chunk / states tiles before session 3's call 3: states pass over [Dk, 64] (all rows,
# block_v columns), per-chunk forward over 64 columns of v.
_OLD_TILES = dict(states_block_k=None, states_block_v=None, chunk_block_v=64)
_W8 = dict(num_warps_fwd=8, num_warps_dq=8, num_warps_dkv=8)


# The kernel flags of session 3 (the defaults changed in session 4 after call 2): the variants
# below keep the meaning they had when measured.
_S3 = dict(fast_exp=False, cumsum_matmul=False, dstates_acc=False, block_v_dkv=64)


def _cp(**kw):
    """Chunk-parallel, 64-row steps, bf16 states, the old tiles unless kw says otherwise (the
    names below keep the meaning they had when measured)."""
    return GB(schedule="chunk_parallel", **{**_SUB64, **_OLD_TILES, **_S3, **kw})


def _new(**kw):
    """The library's defaults of session 3 (call 3) with kw changed, schedule chunk-parallel."""
    return GB(schedule="chunk_parallel", **{**_S3, **kw})


VARIANTS = {
    # sub_chunk 16 (4 state steps per 64-row chunk, 16-row diagonal blocks), f32 states
    "seq": SEQ,
    "cp": CP,
    "hyb": GB(schedule="hybrid", **_SUB16),
    "seq_fused": dataclasses.replace(SEQ, dkv_split=False),
    "cp_fused": dataclasses.replace(CP, dkv_split=False),
    "seq_st1": dataclasses.replace(SEQ, num_stages=1),
    # one state step per chunk, one 64-row diagonal block (guarded), bf16 stored states
    "seq64": GB(schedule="sequential", **_SUB64),
    "cp64": _cp(),            # the default of session 2's call 3 up to session 3's call 2
    "hyb64": GB(schedule="hybrid", **_SUB64),
    "seq64w8": GB(schedule="sequential", **_SUB64, **_W8),
    "cp64w8": _cp(**_W8),
    "cp64f32": _cp(bf16_states=False),
    "cp64st1": _cp(num_stages=1),
    "cp64fused": _cp(dkv_split=False),
    "cp32": _cp(sub_chunk=32, intra_block=32),
    "seq32": GB(schedule="sequential", sub_chunk=32, intra_block=32, bf16_states=True),
    # the library's default object (schedule "auto", resolved per shape as the library does)
    "default": GB(),
    # session 3, call 2: states / dS passes over [s, s] tiles (p: next chunk's tiles loaded one
    # iteration ahead), v128: the per-chunk forward over all 128 columns, dv128: the split dv
    # kernel over all 128 columns
    "cp64p": _cp(states_prefetch=True),
    "cp64s16": _cp(states_block_k=16, states_block_v=16),
    "cp64s32": _cp(states_block_k=32, states_block_v=32),
    "cp64s64": _cp(states_block_k=64, states_block_v=64),
    "cp64s32p": _cp(states_block_k=32, states_block_v=32, states_prefetch=True),
    "cp64v128s32p": _cp(chunk_block_v=128, states_block_k=32, states_block_v=32,
                        states_prefetch=True, num_warps_fwd=8),
    "cp64v128s32pw4": _cp(chunk_block_v=128, states_block_k=32, states_block_v=32,
                          states_prefetch=True, num_warps_fwd=4),
    "cp64v128s32pdv128": _cp(chunk_block_v=128, states_block_k=32, states_block_v=32,
                             states_prefetch=True, num_warps_fwd=8, block_v_dkv=128),
    # relative to today's defaults (states over [64, Dv<=128] tiles, per-chunk forward over
    # Dv<=128 columns with 4 warps): t32 states over [32, 128]; told the old states tiles; v64
    # the per-chunk forward over 64 columns; g guard "split" (the per-chunk kernels without the
    # 16-row fallback code plus a kernel for the chunks failing the guard); k64 the common
    # per-chunk kernels contract over slices of 64; w8 8 warps in the dk/dv kernels
    "t32": _new(states_block_k=32),
    "told": _new(states_block_k=None, states_block_v=None),
    "v64": _new(chunk_block_v=64),
    "g": _new(guard="split"),
    "gk64": _new(guard="split", contract_slice=64),
    "gk64w8": _new(guard="split", contract_slice=64, num_warps_dkv=8),
    "gk64dv128": _new(guard="split", contract_slice=64, block_v_dkv=128),
    # session 4: fx = the gate factors as exp2(x * log2 e) (one ex2.approx instead of libdevice
    # expf)
    "fx": _new(fast_exp=True),
    # m: the in-chunk cumulative gates as a matmul by a triangular ones matrix (no scan)
    "m": _new(cumsum_matmul=True),
    "fxm": _new(fast_exp=True, cumsum_matmul=True),
    # a: dlog_g's chunk-end term sum_v S_end * dS_end written by the dS pass (the dk kernels
    # do not read S_end)
    "fxma": _new(fast_exp=True, cumsum_matmul=True, dstates_acc=True),
    # fxma with the split dv kernel over all 128 columns (A and the gates once per chunk) with
    # 4 warps (the auto rule gives it 8: one program per SM)
    "fxmadv128": _new(fast_exp=True, cumsum_matmul=True, dstates_acc=True, block_v_dkv=128,
                      num_warps_dkv=4),
    # the default of session 3 (commit 03c4677), whatever the defaults are now
    "s3": _new(),
}


def run_trace(results, spec, out):
    """--trace NAMES:D:T: each VARIANTS name's forward and forward+backward (B=8, H=16, bf16)
    under the profiler: device time per kernel per call."""
    names, d, t = spec.split(":")
    q, k, v, g, _, do = _inputs(B, int(t), H, int(d), int(d), jnp.bfloat16)
    items = {}
    for name in names.split(","):
        items[f"{name}_fwd"] = _fwd("pallas", VARIANTS[name])
        items[f"{name}_fwd_bwd"] = _fwd_bwd("pallas", VARIANTS[name])
    args_of = lambda name: (q, k, v, g, do) if "fwd_bwd" in name else (q, k, v, g)
    compiled = _compile_all(items, args_of)
    for name, fn in compiled.items():
        row = {"name": name, "d": int(d), "t": int(t)}
        try:
            row["kernels"] = kernel_times(fn, args_of(name))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        results["trace"].append(row)
        print(f"[trace {_elapsed():.0f}s] {json.dumps(row)[:3000]}", flush=True)
        _save(results, out)


def ptxas_report(dump_dir):
    """ptxas -v (Triton's copy) over the PTX XLA dumped: registers, spills per gla kernel."""
    import glob
    import subprocess
    try:
        import triton
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    except ImportError:
        ptxas = "ptxas"
    lines = []
    for path in sorted(glob.glob(os.path.join(dump_dir, "**", "*.ptx"), recursive=True)):
        with open(path) as fh:
            if "gla" not in fh.read():
                continue
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                           capture_output=True, text=True, timeout=60)
        keep = [ln for ln in (r.stderr + r.stdout).splitlines()
                if "gla" in ln or "registers" in ln or "spill" in ln or "error" in ln]
        lines += [os.path.basename(path)] + keep
    return lines or [f"no PTX with a gla kernel under {dump_dir}"]


def report(results):
    """Per shape: the fastest of our candidates (forward and forward+backward separately),
    fla, the ratios, the reference; every candidate's numbers stay in the JSON."""
    lines = ["| B | H | Dk | Dv | T | auto | best ours fwd | best ours fwd+bwd | fla fwd | "
             "fla fwd+bwd | fwd vs fla | fwd+bwd vs fla | ref fwd+bwd | fwd+bwd vs ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"
    r = lambda a, b: f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"

    def best(row, kind):
        ours = {k[:-len(kind) - 1]: x for k, x in row.items()
                if k.endswith("_" + kind) and isinstance(x, float)
                and not k.startswith(("fla", "ref")) and (kind == "fwd_bwd"
                                                          or not k.endswith("fwd_bwd"))}
        if not ours:
            return None, "-"
        name = min(ours, key=ours.get)
        return ours[name], f"{ours[name]:.3f} ({name})"
    for row in results["timings"] + results["hybrid"]:
        bf, bf_s = best(row, "fwd")
        bb, bb_s = best(row, "fwd_bwd")
        lines.append(
            f"| {row['b']} | {row['h']} | {row['dk']} | {row['dv']} | {row['t']} | "
            f"{row.get('auto', '-')} | {bf_s} | {bb_s} | {f(row.get('fla_fwd'))} | "
            f"{f(row.get('fla_fwd_bwd'))} | {r(row.get('fla_fwd'), bf)} | "
            f"{r(row.get('fla_fwd_bwd'), bb)} | {f(row.get('ref_fwd_bwd'))} | "
            f"{r(row.get('ref_fwd_bwd'), bb)} |")
    loop = ["", "Looped-jit (ours, ref) and CUDA-event (fla) times, ms, n calls back to back:",
            "| Dk | T | n | name | fwd | fwd+bwd | fla fwd | fla fwd+bwd | fwd vs fla | "
            "fwd+bwd vs fla | mem fwd+bwd MB (fla) |", "|---" * 11 + "|"]
    for row in results["timings"] + results["hybrid"]:
        for key in row:
            if key.endswith("_fwd_loop") and not key.startswith("fla"):
                name = key[:-len("_fwd_loop")]
                a, b_ = row.get(key), row.get(f"{name}_fwd_bwd_loop")
                fa, fb = row.get("fla_fwd_loop"), row.get("fla_fwd_bwd_loop")
                loop.append(f"| {row['dk']} | {row['t']} | {row.get('loop_n')} | {name} | {f(a)} "
                            f"| {f(b_)} | {f(fa)} | {f(fb)} | {r(fa, a)} | {r(fb, b_)} | "
                            f"{f(row.get(f'{name}_fwd_bwd_mem_mb'))} "
                            f"({f(row.get('fla_fwd_bwd_mem_mb'))}) |")
    if len(loop) > 4:
        lines += loop
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gla_bench.json")
    p.add_argument("--budget", type=float, default=200.0, help="seconds; later cells skip")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-configs", type=int, default=2)
    p.add_argument("--dims", default="128,64")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--hybrid", action="store_true", help="B=8/16, H=6, Dk=64, Dv=128, T=2048")
    p.add_argument("--fla-hybrid", action="store_true", help="fla at the hybrid shape too")
    p.add_argument("--hybrid-last", action="store_true", help="the hybrid cells after the others")
    p.add_argument("--variants", default="", help="groups of VARIANTS names at D=128, T=2k, "
                   "one row each: 'a,b;c,d' (run last)")
    p.add_argument("--candidates", default="seq,cp,cp64,hyb64",
                   help="VARIANTS names timed in the main and hybrid cells")
    p.add_argument("--stages", action="store_true", help="each pass alone at D=128, T=2048")
    p.add_argument("--stage-shapes", default="128:2048",
                   help="D:T pairs for --stages, comma-separated")
    p.add_argument("--stages-first", action="store_true", help="--stages before the cells")
    p.add_argument("--checks", type=int, default=5, help="how many correctness cases")
    p.add_argument("--timer", default="host", choices=["host", "loop"],
                   help="loop: also time n calls inside one jit (ours) and CUDA events around "
                   "n back-to-back calls (fla), keys *_loop")
    p.add_argument("--ref-max-t", type=int, default=2048,
                   help="longest T for the jnp reference (0: never)")
    p.add_argument("--ref-bg", type=float, default=0.0, help="seconds: compile the reference "
                   "in background threads from the start, time it after the cells, waiting "
                   "for compiles until this many seconds since the start")
    p.add_argument("--profile", default="", help="NAMES:D:T: run each VARIANTS name's "
                   "forward+backward once at B=8, H=16, D, T (bf16), then exit (under ncu)")
    p.add_argument("--trace", default="", help="NAMES:D:T: device time per kernel of each "
                   "VARIANTS name's forward and forward+backward from a profiler trace (first)")
    p.add_argument("--regs", default="", help="dump dir: only compile each pass (D=128, "
                   "T=2048) with XLA dumping PTX there, then ptxas -v: registers and spills")
    args = p.parse_args()
    TIMER["loop"] = args.timer == "loop"
    global REF_BG
    REF_BG = bool(args.ref_bg)
    if args.profile:
        names, d, t = args.profile.split(":")
        q, k, v, g, _, do = _inputs(B, int(t), H, int(d), int(d), jnp.bfloat16)
        for name in names.split(","):
            fn = jax.jit(_fwd_bwd("pallas", VARIANTS[name]))
            jax.block_until_ready(fn(q, k, v, g, do))
            print(f"profiled {name}", flush=True)
        return
    if args.regs:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_dump_to={args.regs}").strip()
        results = {"stages": [], "timings": [], "hybrid": []}
        run_stages(results, B, 2048, H, 128, args.out, args.budget,
                   only=["seq fwd", "seq dkv split", "cp64 fwd (states + chunks)",
                         "cp64 dkv chunks split (dq inside)"])
        results["ptxas"] = ptxas_report(args.regs)
        _save(results, args.out)
        print("\n".join(results["ptxas"]))
        return
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "dtype": "bfloat16",
               "fla_configs_per_kernel": args.fla_configs or "all",
               "correctness": [], "timings": [], "hybrid": [], "variants": [], "stages": [],
               "trace": []}
    if args.trace:
        try:
            run_trace(results, args.trace, args.out)
        except Exception as e:  # noqa: BLE001
            results["trace_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
    fla = _Fla(not args.no_fla, args.fla_configs, results)
    cell = dict(budget=args.budget, fla=fla, ref_max_t=args.ref_max_t, out=args.out)
    try:
        check_correctness(results, args.checks, args.out)
    except Exception as e:  # noqa: BLE001
        results["correctness_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        traceback.print_exc()
    _save(results, args.out)
    groups = [g.split(",") for g in args.variants.split(";") if g]
    cell_nofla = dict(cell, fla=_Fla(False, 0, results), ref_max_t=0)
    cands = {n: VARIANTS[n] for n in args.candidates.split(",")}
    # Order: the first length for the first head dim, the hybrid_3to1_gpu shape, the first
    # length for the other head dims, then the other lengths (later cells hit --budget first).
    dims = [int(x) for x in args.dims.split(",") if x]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    cells = [(d, t) for t in lengths for d in dims]
    hybrid = lambda: [run_cell(results, "hybrid", b, 2048, 6, 64, 128, cands,
                               **(cell if args.fla_hybrid else cell_nofla))
                      for b in (8, 16)] if args.hybrid else None

    def stages():
        for shape in args.stage_shapes.split(","):
            d, t = map(int, shape.split(":"))
            try:
                run_stages(results, B, t, H, d, args.out, args.budget)
            except Exception as e:  # noqa: BLE001
                results["stages"].append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
                traceback.print_exc()
    if args.stages and args.stages_first:
        stages()
    ref_futures = start_ref_compiles(cells, args.ref_max_t) if REF_BG else {}
    for i, (d, t) in enumerate(cells):
        first = next((r for r in results["timings"] if r["dk"] == d and r["t"] == lengths[0]
                      and "skipped" not in r), None)
        keep = _close_to_best(first, cands) if t != lengths[0] and first else cands
        run_cell(results, "timings", B, t, H, d, d, keep, **cell)
        if i == 0 and not args.hybrid_last:
            hybrid()
    if not cells or args.hybrid_last:
        hybrid()
    if ref_futures:
        time_refs(results, ref_futures, args.ref_bg, args.out)
    if args.stages and not args.stages_first:
        stages()
    for names in groups:
        run_cell(results, "variants", B, 2048, H, 128, 128, {n: VARIANTS[n] for n in names},
                 **cell_nofla)
    _save(results, args.out)
    print(results["table"])


if __name__ == "__main__":
    main()

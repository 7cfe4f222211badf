"""Informer benchmarks: (a) the ETTh1 reproduction that writes docs/RESULTS.md, (b) ProbSparse
versus full attention speed.

(a) Multivariate ETTh1 at the paper's horizons with the authors' settings per horizon
(configs/informer_etth1.yaml plus the input/label lengths below), several seeds, for five
self-attention choices: ProbSparse (the paper's Informer), ProbSparse with the authors' decoder
`mix=True` reshape (`probsparse_mix`), full attention (encoder and decoder), and GLA or Mamba
encoders (bidirectional; the decoder keeps ProbSparse). Each run is
`python train.py --config informer_etth1.yaml ...` in a subprocess; finished runs (a
summary.json in their workdir) are reused, so an interrupted sweep resumes.

    python bench/informer.py reproduce --data /path/to/ETTh1.csv --out runs/informer_repro \\
        [--horizons 24 48 168 336 720] [--seeds 0 1 2] \\
        [--mixers probsparse probsparse_mix full gla mamba] [--epochs 6] \\
        [--write docs/RESULTS.md] [--jobs 6 --gpus 0,1] [--budget SECONDS]

(b) Forward and forward+backward time of the self-attention core at input lengths 96..2048
(B=32, H=8, Dh=64, bf16): ProbSparse (per-query and shared sampling; the kernel path and the
plain jnp form) against full attention (the project's flash kernel, and XLA's
jax.nn.dot_product_attention). Prints a table, writes JSON under --out. Meant for a GPU:

    python bench/informer.py speed --out runs/informer_speed [--lengths 96 192 ... 2048] \
        [--fns probsparse probsparse_shared flash_full xla_full] [--check 720] \
        [--stages 720 2048] [--trace 720] [--budget SECONDS]

`--check` compares the kernel path with the jnp form on the GPU first (M, the chosen queries,
output, gradients); `--stages` times each step of the kernel path alone and tuning variants;
`--trace` records the device time of every kernel (profiler), free of dispatch overhead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run as a script from anywhere

# horizon: (input length, label length), from the authors' ETTh1 scripts.
HORIZONS = {24: (48, 48), 48: (96, 48), 168: (168, 168), 336: (168, 168), 720: (336, 336)}
PAPER = {24: (0.577, 0.549), 48: (0.685, 0.625), 168: (0.931, 0.752), 336: (1.128, 0.873),
         720: (1.215, 0.896)}
PROB = "{type: probsparse, factor: 5, n_heads: 8}"
PROB_DEC = "{type: probsparse, factor: 5, n_heads: 8, causal: true, query_selection: global}"
PROB_DEC_MIX = PROB_DEC[:-1] + ", mix_heads: true}"
MIXERS = {
    "probsparse": (PROB, PROB_DEC),
    "probsparse_mix": (PROB, PROB_DEC_MIX),
    "full": ("{type: attention, n_heads: 8, rope: false, causal: false}",
             "{type: attention, n_heads: 8, rope: false, causal: true}"),
    "gla": ("{type: gla, n_heads: 8, causal: false}", PROB_DEC),
    "mamba": ("{type: mamba, causal: false}", PROB_DEC),
}
LABELS = {"probsparse": "Informer (ProbSparse encoder and decoder)",
          "probsparse_mix": "Informer as the authors' code runs it (ProbSparse; decoder with "
                            "their `mix=True` reshape: `mix_heads: true`)",
          "full": "Full attention (encoder and decoder)",
          "gla": "GLA encoder (bidirectional), ProbSparse decoder",
          "mamba": "Mamba encoder (bidirectional), ProbSparse decoder"}


# -- (a) reproduction -------------------------------------------------------------------------
def run_one(data: str, out: Path, mixer: str, horizon: int, seed: int, epochs: int,
            extra: list[str], env: dict | None = None) -> dict:
    workdir = out / f"{mixer}_h{horizon}_s{seed}"
    summary = workdir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    try:                                 # several reproduce processes may share one --out
        os.close(os.open(workdir / ".running", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None
    try:
        return _train(data, workdir, mixer, horizon, seed, epochs, extra, env)
    finally:
        (workdir / ".running").unlink(missing_ok=True)


def _train(data, workdir, mixer, horizon, seed, epochs, extra, env) -> dict:
    summary = workdir / "summary.json"
    seq_len, label_len = HORIZONS[horizon]
    enc, dec = MIXERS[mixer]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "informer_etth1",
           "--workdir", str(workdir), "--set", f"data.path={data}",
           f"data.pred_len={horizon}", f"data.label_len={label_len}", f"train.seq_len={seq_len}",
           f"train.seed={seed}", f"train.epochs={epochs}", f"model.encoder_mixer={enc}",
           f"model.decoder_mixer={dec}", *extra]
    print(f"[{time.strftime('%H:%M:%S')}] start {mixer} h{horizon} seed {seed}", flush=True)
    with open(workdir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc != 0 or not summary.is_file():
        raise RuntimeError(f"{mixer} h{horizon} seed {seed} failed (rc {rc}); see "
                           f"{workdir / 'log.txt'}")
    return json.loads(summary.read_text())


def aggregate(results: list[dict]) -> dict:
    """{(mixer, horizon): {mse, mse_sd, mae, mae_sd, n, epochs_run}}."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["mixer"], r["horizon"]), []).append(r)
    table = {}
    for key, rows in groups.items():
        mse, mae = [r["test_mse"] for r in rows], [r["test_mae"] for r in rows]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
        table[key] = {"mse": statistics.mean(mse), "mse_sd": sd(mse), "mae": statistics.mean(mae),
                      "mae_sd": sd(mae), "n": len(rows),
                      "steps": [r["step"] for r in rows]}
    return table


def markdown(table: dict, settings: str) -> str:
    lines = [settings, ""]
    for mixer in MIXERS:
        horizons = sorted(h for m, h in table if m == mixer)
        if not horizons:
            continue
        lines += [f"**{LABELS[mixer]}**", "",
                  "| horizon | input / label | seeds | test MSE (mean ± sd) | test MAE (mean ± sd) "
                  "| paper MSE / MAE | MSE / paper |", "|---|---|---|---|---|---|---|"]
        for h in horizons:
            t = table[(mixer, h)]
            pm, pa = PAPER[h]
            fmt = lambda m, s: f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}"
            lines.append(f"| {h} | {HORIZONS[h][0]} / {HORIZONS[h][1]} | {t['n']} | "
                         f"{fmt(t['mse'], t['mse_sd'])} | {fmt(t['mae'], t['mae_sd'])} | "
                         f"{pm} / {pa} | {t['mse'] / pm:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _job_env(slot: int, args) -> dict:
    """Environment of the `slot`-th concurrent run: its GPU (round robin over --gpus), its share
    of that GPU's memory, and one persistent compilation cache, so that seeds and reruns of a
    (mixer, horizon) compile once."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(Path(args.out).resolve() / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if args.gpus:
        gpus = args.gpus.split(",")
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        per_gpu = -(-args.jobs // len(gpus))
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{args.mem_fraction or 0.9 / per_gpu:.3f}"
    return env


def collect(out: Path, todo) -> list[dict]:
    rows = []
    for mixer, horizon, seed in todo:
        summary = out / f"{mixer}_h{horizon}_s{seed}" / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            rows.append({"mixer": mixer, "horizon": horizon, "seed": seed,
                         **{k: s[k] for k in ("test_mse", "test_mae", "eval_mse", "step",
                                              "wall_time_s")}})
    return rows


def reproduce(args) -> None:
    """Every (mixer, horizon, seed) run, `--jobs` at a time; no new run starts after `--budget`
    seconds (finished ones are kept and reused by the next call)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Seed-major (a seed's runs find the compiled steps of the earlier seed in the cache),
    # longest horizon first (the slowest runs do not end up last); the later seeds of the
    # --late mixers after everything else.
    todo = [(m, h, s) for s in args.seeds for h in sorted(args.horizons, reverse=True)
            for m in args.mixers]
    todo.sort(key=lambda r: (r[2] != args.seeds[0] and r[0] in args.late, args.seeds.index(r[2]),
                             -r[1], args.mixers.index(r[0])))
    t0, done, failed = time.time(), 0, []
    slots = queue.SimpleQueue()
    for i in range(args.jobs):
        slots.put(i)

    def one(mixer, horizon, seed):
        slot = slots.get()
        try:
            if args.budget and time.time() - t0 > args.budget:
                return None
            return run_one(args.data, out, mixer, horizon, seed, args.epochs, args.set,
                           _job_env(slot, args))
        finally:
            slots.put(slot)

    if args.no_run:                       # only tabulate what has finished
        todo_run = []
    else:
        todo_run = todo
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one, *key): key for key in todo_run}
        for fut in concurrent.futures.as_completed(futures):
            mixer, horizon, seed = futures[fut]
            try:
                s = fut.result()
            except RuntimeError as e:
                failed.append(str(e))
                print(f"    FAILED: {e}", flush=True)
                continue
            if s is None:
                continue
            done += 1
            print(f"    {mixer} h{horizon} seed {seed}: test mse {s['test_mse']:.4f} "
                  f"mae {s['test_mae']:.4f} ({s['step']} steps, {s['wall_time_s']:.0f} s)",
                  flush=True)
    # Every finished run under --out (also those of earlier calls or of a process beside this
    # one), not only this process's.
    results = collect(out, todo)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{done} runs done or reused here, {len(failed)} failed, {len(results)} of {len(todo)} "
          f"finished under {out} ({time.time() - t0:.0f} s)", flush=True)
    if not results:
        raise SystemExit("no finished runs")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # runs may still be going
    import jax
    where = args.measured_on or (f"{jax.devices()[0].device_kind} ({jax.device_count()} "
                                 f"device(s)), jax {jax.__version__}")
    settings = (f"Measured {datetime.date.today()} on {where}: multivariate ETTh1, "
                f"up to {args.epochs} epochs (early stopping, patience 3), seeds "
                f"{args.seeds}, extra overrides {args.set or 'none'}.")
    text = markdown(aggregate(results), settings)
    print(text)
    (out / "results.md").write_text(text)
    if args.write:
        path = Path(args.write)
        tag = f" {args.section}" if args.section else ""
        begin, end = (f"<!-- bench/informer.py: {w}{tag} -->" for w in ("begin", "end"))
        doc = path.read_text() if path.is_file() else ""
        if begin not in doc:                      # a new section goes at the end
            doc += f"\n{begin}\n{end}\n"
        head, rest = doc.split(begin, 1)
        path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


# -- (b) speed --------------------------------------------------------------------------------
def _time(fn, *args, reps: int = 20) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def _timed(fn, *args) -> tuple[float, float]:
    """(best ms of 3 x 20 calls, seconds of the first call: compile + one run)."""
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    return _time(fn, *args), first


def _inputs(b, length, h=8, d=64):
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(jax.random.PRNGKey(length), 4)
    q, k, v = (jax.random.normal(kk, (b, length, h, d), jnp.bfloat16) for kk in ks[:3])
    return q, k, v, ks[3]


def _speed_fns(on_gpu: bool) -> dict:
    """The timed functions of the table: name -> fn(q, k, v, key)."""
    import jax

    import pallas_kernels as pk
    from mixers.probsparse import V1, probsparse_attention
    ps = lambda sampling, backend=None, tuning=None: lambda q, k, v, key: probsparse_attention(
        q, k, v, key, factor=5, sampling=sampling, backend=backend, tuning=tuning)
    return {
        "probsparse": ps("per_query"),                       # the default path of the platform
        "probsparse_shared": ps("shared"),
        "probsparse_v1": ps("per_query", tuning=V1),         # flash on the gathered rows
        "probsparse_shared_v1": ps("shared", tuning=V1),
        "probsparse_jnp": ps("per_query", "reference"),      # the plain jnp form (before)
        "probsparse_shared_jnp": ps("shared", "reference"),
        "xla_full": lambda q, k, v, key: jax.nn.dot_product_attention(q, k, v),
        "flash_full": lambda q, k, v, key: pk.flash_attention(
            q, k, v, backend=None if on_gpu else "reference"),
    }


def _fwd_and_grad(fn):
    import jax
    import jax.numpy as jnp
    loss = lambda q, k, v, key: fn(q, k, v, key).astype(jnp.float32).sum()
    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _speed_check(b: int, length: int, cases: list[int] | None = None) -> list[dict]:
    """GPU correctness of the kernel path against the jnp form at one length (bf16): M, the
    chosen queries, the output and the gradients."""
    import jax

    from mixers.probsparse import probsparse_sizes
    q, k, v, key = _inputs(b, length)
    n_sample, u = probsparse_sizes(length, length, 5)
    kernel = "pallas" if jax.devices()[0].platform == "gpu" else "interpret"    # CPU: dry run
    rows = []
    from mixers.probsparse import V1
    skipped = 0
    for sampling, causal, selection, tuning in (("shared", False, "global", None),
                                                ("per_query", False, "global", None),
                                                ("shared", False, "global", V1),
                                                ("per_query", False, "global", V1),
                                                ("shared", True, "prefix", None),
                                                ("per_query", True, "global", None)):
        if cases and len(rows) + skipped not in cases:
            skipped += 1
            continue
        try:
            row = _check_one(q, k, v, key, length, n_sample, u, kernel, sampling, causal,
                             selection, tuning)
        except Exception as e:                          # report, keep going
            row = {"check": f"{sampling} {causal} {selection}", "ok": False,
                   "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _check_one(q, k, v, key, length, n_sample, u, kernel, sampling, causal, selection,
               tuning):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench._common import rel_error
    from mixers.probsparse import draw_samples, probsparse_attention
    from pallas_kernels.probsparse import sparsity_measure, sparsity_reference
    prefix = causal and selection == "prefix"
    idx = draw_samples(key, length, length, n_sample, sampling=sampling,
                       causal_samples=prefix)
    cs = prefix and sampling == "shared"
    m = jax.jit(functools.partial(sparsity_measure, causal_samples=cs, backend=kernel))(
        q, k, idx)
    m_ref = jax.jit(functools.partial(sparsity_reference, causal_samples=cs))(q, k, idx)
    top = np.sort(np.asarray(jax.lax.top_k(m, u)[1]), -1)
    top_ref = np.sort(np.asarray(jax.lax.top_k(m_ref, u)[1]), -1)
    kw = dict(factor=5, causal=causal, query_selection=selection, sampling=sampling)
    fns = {be: _fwd_and_grad(functools.partial(probsparse_attention, backend=be, tuning=tuning,
                                               **kw))
           for be in (kernel, "reference")}
    outs = {be: (f(q, k, v, key), g(q, k, v, key)) for be, (f, g) in fns.items()}
    row = {"check": f"{sampling}{' causal ' + selection if causal else ''}"
                    f"{' v1' if tuning else ''}", "length": length,
           "m_max_abs_err": float(jnp.abs(m - m_ref).max()),
           "same_top_u_rows": float((top == top_ref).all(-1).mean()),
           "out_rel_err": rel_error(outs[kernel][0].astype(jnp.float32),
                                    outs["reference"][0].astype(jnp.float32)),
           "grad_rel_err": [rel_error(a.astype(jnp.float32), r.astype(jnp.float32))
                            for a, r in zip(outs[kernel][1], outs["reference"][1],
                                            strict=True)]}
    row["ok"] = bool(row["same_top_u_rows"] > 0.99 and row["out_rel_err"] < 2e-2
                     and max(row["grad_rel_err"]) < 2e-2)
    return row


def _speed_stages(b: int, length: int, over_budget=lambda: False) -> list[dict]:
    """Each step of the kernel path timed alone (separate jits), and tuning variants."""
    import jax
    import jax.numpy as jnp

    from mixers.probsparse import (
        TUNING,
        V1,
        draw_samples,
        probsparse_attention,
        probsparse_sizes,
    )
    from pallas_kernels.attention import flash_attention_kernel
    from pallas_kernels.probsparse import sparsity_measure, top_u
    q, k, v, key = _inputs(b, length)
    h = q.shape[2]
    n_sample, u = probsparse_sizes(length, length, 5)
    interp = jax.devices()[0].platform != "gpu"                    # CPU: a dry run
    kernel = "interpret" if interp else "pallas"
    measure = functools.partial(sparsity_measure, backend=kernel)
    flash = functools.partial(flash_attention_kernel, interpret=interp)
    rows = []

    def rec(name, fn, *args):
        if over_budget():
            return
        try:
            ms, first = _timed(jax.jit(fn), *args)
            row = {"stage": name, "length": length, "ms": ms, "first_s": round(first, 2)}
        except Exception as e:                          # report, keep going
            row = {"stage": name, "length": length, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    idx_s = draw_samples(key, length, length, n_sample, sampling="shared", causal_samples=False)
    idx_q = draw_samples(key, length, length, n_sample, sampling="per_query",
                         causal_samples=False)
    m = jax.jit(lambda q, k: measure(q, k, idx_s))(q, k)
    top_BUH = jnp.swapaxes(jax.lax.top_k(m, u)[1], 1, 2)
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, None, :]
    q_top = q[bi, top_BUH, hi]
    o_top = flash(q_top, k, v, fwd_impl="triton")
    rec("draw per_query idx", lambda key: draw_samples(
        key, length, length, n_sample, sampling="per_query", causal_samples=False), key)
    rec("measure shared (kernel)", lambda q, k, i: measure(q, k, i), q, k, idx_s)
    rec("measure per_query (kernel)", lambda q, k, i: measure(q, k, i), q, k, idx_q)
    rec("top_k (XLA)", lambda m: jax.lax.top_k(m, u)[1], m)
    rec("top_u (kernel)", lambda m: top_u(m, u, backend=kernel), m)
    rec("gather q rows", lambda q, t: q[bi, t, hi], q, top_BUH)
    rec("flash top rows, triton fwd", lambda qt, k, v: flash(
        qt, k, v, fwd_impl="triton"), q_top, k, v)
    rec("flash top rows, default fwd", lambda qt, k, v: flash(qt, k, v),
        q_top, k, v)
    rec("mean(V) fill + scatter", lambda v, t, o: jnp.broadcast_to(
        v.astype(jnp.float32).mean(1, keepdims=True).astype(v.dtype), v.shape).at[
        bi, t, hi].set(o, unique_indices=True), v, top_BUH, o_top)
    rec("read q,k,v + write out (copy floor)", lambda q, k, v: q + k + v, q, k, v)
    loss = lambda f: lambda q, k, v, key: f(q, k, v, key).astype(jnp.float32).sum()
    variants = {"default": TUNING, "lax.top_k": {**TUNING, "top_u": "xla"}, "v1": V1,
                "v1, flash split bwd": {**V1, "flash": {"fwd_impl": "triton",
                                                        "bwd_impl": "split"}},
                "v1, flash default fwd": {**V1, "flash": {}}}
    for sampling in ("shared", "per_query"):
        for tag, tuning in variants.items():
            f = lambda q, k, v, key, s=sampling, t=tuning: probsparse_attention(
                q, k, v, key, sampling=s, tuning=t, backend=kernel)
            rec(f"{sampling} fwd, {tag}", f, q, k, v, key)
            rec(f"{sampling} fwd+bwd, {tag}", jax.grad(loss(f), argnums=(0, 1, 2)),
                q, k, v, key)
    for bq, nw, unroll, blocks in ((16, 4, 5, 1), (64, 4, 5, 1), (32, 2, 5, 1), (32, 4, 1, 1),
                                   (64, 8, 5, 1), (32, 4, 5, 4), (64, 8, 5, 64), (32, 8, 5, 8),
                                   (32, 4, 5, 64), (16, 2, 5, 8)):
        rec(f"measure per_query block_q={bq} warps={nw} unroll={unroll} blocks={blocks}",
            lambda q, k, i, bq=bq, nw=nw, unroll=unroll, blocks=blocks: measure(
                q, k, i, block_q=bq, num_warps=nw, unroll=unroll, blocks=blocks), q, k, idx_q)
    for bq, nw in ((32, 4), (128, 4)):
        rec(f"measure shared block_q={bq} warps={nw}", lambda q, k, i, bq=bq, nw=nw:
            measure(q, k, i, block_q=bq, num_warps=nw), q, k, idx_s)
    return rows


def _speed_trace(b: int, length: int) -> list[dict]:
    """Per-kernel device time of ProbSparse (both samplings) and flash, forward and fwd+bwd."""
    from bench._common import kernel_times
    on_gpu = __import__("jax").devices()[0].platform == "gpu"
    fns = _speed_fns(on_gpu)
    q, k, v, key = _inputs(b, length)
    rows = []
    for name in ("probsparse_shared", "probsparse", "probsparse_shared_v1", "probsparse_v1",
                 "flash_full"):
        for mode, f in zip(("fwd", "fwdbwd"), _fwd_and_grad(fns[name]), strict=True):
            try:
                row = {"trace": f"{name} {mode}", "length": length,
                       "kernels": kernel_times(f, (q, k, v, key), top=30)}
            except Exception as e:                      # report, keep going
                row = {"trace": f"{name} {mode}", "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            print(json.dumps(row)[:4000], flush=True)
    return rows


def speed(args) -> None:
    import jax

    from mixers.probsparse import probsparse_sizes
    t_start = time.perf_counter()
    b, h, d = args.batch, 8, 64
    on_gpu = jax.devices()[0].platform == "gpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": b,
            "heads": h, "head_dim": d, "dtype": "bfloat16", "date": str(datetime.date.today()),
            "command": "python bench/informer.py " + " ".join(sys.argv[1:])}
    # host time of one call of a trivial jitted function: the floor of the timer (dispatch)
    meta["dispatch_floor_ms"] = _time(jax.jit(lambda x: x + 1), jax.numpy.zeros(()))
    result = {"meta": meta, "checks": [], "stages": [], "rows": [], "traces": []}

    def save():
        (out / "informer_speed.json").write_text(json.dumps(result, indent=2))

    def over_budget():
        return args.budget and time.perf_counter() - t_start > args.budget

    for length in args.check:
        result["checks"] += _speed_check(b, length, args.check_cases)
        save()
    all_fns = _speed_fns(on_gpu)
    names = args.fns or list(all_fns)
    if args.fns_if_check_fails and not all(c.get("ok") for c in result["checks"]):
        names = args.fns_if_check_fails
        print(f"a check failed: timing {names}", flush=True)
    result["meta"]["fns"] = names
    fns = {n: all_fns[n] for n in names}
    for length in args.lengths:
        if over_budget():
            print(f"budget: stopped before L={length}", flush=True)
            break
        q, k, v, key = _inputs(b, length, h, d)
        n_sample, u = probsparse_sizes(length, length, 5)
        row = {"length": length, "n_sample": n_sample, "u": u}
        for name, fn in fns.items():
            fwd, bwd = _fwd_and_grad(fn)
            try:
                row[f"{name}_fwd_ms"], row[f"{name}_fwd_first_s"] = _timed(fwd, q, k, v, key)
                row[f"{name}_fwdbwd_ms"], row[f"{name}_fwdbwd_first_s"] = _timed(
                    bwd, q, k, v, key)
            except Exception as e:                      # report, keep the other columns
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        result["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
    _speed_table(result, list(fns))
    for length in args.trace:
        if over_budget():
            break
        result["traces"] += _speed_trace(b, length)
        save()
    for length in args.stages:
        if over_budget():
            break
        result["stages"] += _speed_stages(b, length, over_budget)
        save()
    print(f"wrote {out / 'informer_speed.json'}")


def _speed_table(result: dict, names: list[str]) -> None:
    meta, nan = result["meta"], float("nan")
    print(f"\nB={meta['batch']} H={meta['heads']} Dh={meta['head_dim']} bf16, {meta['device']}, "
          f"jax {meta['jax']}; ms, best of 3 x 20; ratio = flash_full / X (> 1: X faster)")
    probs = [n for n in names if n.startswith("probsparse")]
    print("| L | u | " + " | ".join([f"{n} fwd / f+b" for n in names] +
                                    [f"flash / {n} fwd / f+b" for n in probs]) + " |")
    print("|---" * (2 + len(names) + len(probs)) + "|")
    for r in sorted(result["rows"], key=lambda r: r["length"]):
        cells = [f"{r.get(f'{n}_fwd_ms', nan):.3f} / {r.get(f'{n}_fwdbwd_ms', nan):.3f}"
                 for n in names]
        ratios = [" / ".join(f"{r.get(f'flash_full_{p}_ms', nan) / r.get(f'{n}_{p}_ms', nan):.2f}"
                             for p in ("fwd", "fwdbwd")) for n in probs]
        print(f"| {r['length']} | {r['u']} | " + " | ".join(cells + ratios) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("reproduce", help="ETTh1 table -> docs/RESULTS.md")
    rep.add_argument("--data", required=True, help="path to ETTh1.csv")
    rep.add_argument("--out", default="runs/informer_repro")
    rep.add_argument("--horizons", type=int, nargs="+", default=list(HORIZONS))
    rep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    rep.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    rep.add_argument("--epochs", type=int, default=6)
    rep.add_argument("--set", nargs="*", default=[], help="extra train.py overrides")
    rep.add_argument("--write", default=None, help="markdown file to update (between markers)")
    rep.add_argument("--section", default="",
                     help="name of the marker pair in --write (one table per variant)")
    rep.add_argument("--late", nargs="*", default=[], choices=list(MIXERS),
                     help="run these mixers' seeds after the first one last")
    rep.add_argument("--no-run", action="store_true",
                     help="train nothing: tabulate the finished runs under --out")
    rep.add_argument("--measured-on", default="",
                     help="where the runs ran, for the table's header (with --no-run)")
    rep.add_argument("--jobs", type=int, default=1, help="runs at a time (they share the GPUs)")
    rep.add_argument("--gpus", default="", help="e.g. 0,1: spread the runs over these GPUs")
    rep.add_argument("--mem-fraction", type=float, default=0.0,
                     help="GPU memory share of each run (default 0.9 / runs per GPU; set it when "
                          "several reproduce processes share a GPU)")
    rep.add_argument("--budget", type=float, default=0.0,
                     help="seconds after which no new run starts (0: no limit)")
    spd = sub.add_parser("speed", help="ProbSparse vs full attention timings")
    spd.add_argument("--out", default="runs/informer_speed")
    spd.add_argument("--lengths", type=int, nargs="+",
                     default=[96, 192, 336, 720, 1024, 1440, 2048])
    spd.add_argument("--batch", type=int, default=32)
    spd.add_argument("--fns", nargs="*", default=None,
                     help="columns of the table (default: all; see _speed_fns)")
    spd.add_argument("--check", type=int, nargs="*", default=[],
                     help="lengths at which to check the kernel path against the jnp form first")
    spd.add_argument("--check-cases", type=int, nargs="*", default=[],
                     help="which of the checks (0: shared, 1: per_query, 2: shared v1, "
                          "3: per_query v1, 4: shared causal prefix, 5: per_query causal global)")
    spd.add_argument("--fns-if-check-fails", nargs="*", default=[],
                     help="columns to time instead of --fns when a check fails")
    spd.add_argument("--stages", type=int, nargs="*", default=[],
                     help="lengths at which to time each step of the kernel path and variants")
    spd.add_argument("--trace", type=int, nargs="*", default=[],
                     help="lengths at which to record per-kernel device times (profiler)")
    spd.add_argument("--budget", type=float, default=0.0,
                     help="seconds after which no new length starts (0: no limit)")
    args = parser.parse_args(argv)
    reproduce(args) if args.cmd == "reproduce" else speed(args)


if __name__ == "__main__":
    main()

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
(B=32, H=8, Dh=64, bf16): ProbSparse (per-query and shared sampling) against full attention
(the project's flash kernel, and XLA's jax.nn.dot_product_attention). Prints a table, writes
JSON under --out. Meant for a GPU (about a minute on an H200):

    python bench/informer.py speed --out runs/informer_speed [--lengths 96 192 ... 2048]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
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


def speed(args) -> None:
    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk
    from mixers.probsparse import probsparse_attention, probsparse_sizes

    b, h, d = args.batch, 8, 64
    dtype = jnp.bfloat16
    on_gpu = jax.devices()[0].platform == "gpu"
    fns = {
        "probsparse": lambda q, k, v, key: probsparse_attention(q, k, v, key, factor=5),
        "probsparse_shared": lambda q, k, v, key: probsparse_attention(
            q, k, v, key, factor=5, sampling="shared"),
        "xla_full": lambda q, k, v, key: jax.nn.dot_product_attention(q, k, v),
        "flash_full": lambda q, k, v, key: pk.flash_attention(
            q, k, v, backend=None if on_gpu else "reference"),
    }
    rows = []
    for length in args.lengths:
        ks = jax.random.split(jax.random.PRNGKey(length), 4)
        q, k, v = (jax.random.normal(kk, (b, length, h, d), dtype) for kk in ks[:3])
        n_sample, u = probsparse_sizes(length, length, 5)
        row = {"length": length, "n_sample": n_sample, "u": u}
        for name, fn in fns.items():
            fwd = jax.jit(fn)
            loss = lambda q, k, v, key, fn=fn: fn(q, k, v, key).astype(jnp.float32).sum()
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            try:
                row[f"{name}_fwd_ms"] = _time(fwd, q, k, v, ks[3])
                row[f"{name}_fwdbwd_ms"] = _time(bwd, q, k, v, ks[3])
            except Exception as e:                      # report, keep the other columns
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(fns)
    print(f"\nB={b} H={h} Dh={d} bf16, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          "ms, best of 3 x 20; ratio = flash_full / probsparse (> 1: ProbSparse faster)")
    print("| L | u | " + " | ".join(f"{n} fwd | {n} f+b" for n in names) +
          " | ratio fwd | ratio f+b | ratio fwd (shared) |")
    print("|---" * (2 + 2 * len(names) + 3) + "|")
    nan = float("nan")
    for r in rows:
        cells = [f"{r.get(f'{n}_fwd_ms', nan):.3f} | {r.get(f'{n}_fwdbwd_ms', nan):.3f}"
                 for n in names]
        ratios = [r.get(f"flash_full_{p}_ms", nan) / r.get(f"{n}_{p}_ms", nan)
                  for n, p in (("probsparse", "fwd"), ("probsparse", "fwdbwd"),
                               ("probsparse_shared", "fwd"))]
        print(f"| {r['length']} | {r['u']} | " + " | ".join(cells) + " | " +
              " | ".join(f"{x:.2f}" for x in ratios) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": b,
            "heads": h, "head_dim": d, "dtype": "bfloat16", "date": str(datetime.date.today())}
    (out / "informer_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out / 'informer_speed.json'}")


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
    args = parser.parse_args(argv)
    reproduce(args) if args.cmd == "reproduce" else speed(args)


if __name__ == "__main__":
    main()

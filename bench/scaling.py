"""Data-parallel and FSDP scaling of the trainer on every GPU it finds, in one command.

    PYTHONUNBUFFERED=1 python3 bench/scaling.py --config hybrid_3to1_gpu --steps 200 \
        --out $OUT/scaling

Each run is a fresh subprocess (its own compile and a clean peak-memory counter) training the
same config on the same global batch, from the same initial parameters, for `--steps` steps:

- `single`: one device, the unsharded path (no mesh set: kernels called directly);
- `mesh1`:  one device, the sharded path (a 1-device mesh, kernels inside shard_map);
- `data`:   mesh {data: N} over all N devices (skipped when N = 1);
- `fsdp`:   mesh {fsdp: N} (parameters and Adam moments split over N devices);
- or any `data=A,fsdp=B` given in --runs.

For each run: tokens/s and step time over the steps after `--warmup` (the first ones include the
compile), peak memory per device (memory_stats, GPU only), speedup and scaling efficiency against
`single` (efficiency = speedup / devices), and the loss curve. The table compares `mesh1` with
`single` (the sharded path must cost nothing on one device) and the loss curves of every run with
`single` (max |loss difference| over the steps: they agree up to reduction order). Writes
scaling.json and scaling.md under --out. `--set` overrides config keys as in train.py; on a
CPU, `--smoke` runs a tiny model on 8 simulated devices to check this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SET = ["model.d_model=32", "model.n_layers=2", "model.layers=[gla, attn]",
             "model.mixers.attn.n_heads=2", "model.mixers.attn.n_kv_heads=1",
             "model.mixers.gla.n_heads=2", "train.seq_len=32", "train.batch_size=8",
             "train.dtype=float32"]


# -- one run (the child process) -----------------------------------------------------------------

def child(spec: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from training import load_config
    from training.loop import Trainer

    run = load_config(spec["config"], spec["overrides"] + [
        f"mesh.data={spec['data']}", f"mesh.fsdp={spec['fsdp']}",
        f"train.steps={spec['steps']}"])
    n = spec["data"] * spec["fsdp"]
    devices = jax.devices()[:n]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(run, tmp, log=lambda *a, **k: None, devices=devices)
        if spec["unsharded"]:
            # The same step function, jitted without a mesh: no shard_map around the kernels.
            step_fn = jax.jit(trainer._step, donate_argnums=0)
            batch_fn = lambda i: jax.device_put(trainer.data.batch(
                i, run.train.batch_size, "train"), devices[0])
        else:
            step_fn = trainer._train_step
            batch_fn = lambda i: trainer._device_batch(i, "train")
        mesh_ctx = (jax.set_mesh(trainer.mesh) if not spec["unsharded"] else
                    _nullcontext())
        with mesh_ctx:
            jaxpr = str(jax.make_jaxpr(trainer._step)(trainer.state, batch_fn(0)))
        params = int(sum(x.size for x in jax.tree.leaves(trainer.state[0])))
        state, metrics = trainer.state, []
        for i in range(spec["steps"]):
            if i == spec["warmup"]:
                jax.block_until_ready(state)
                t_start = time.perf_counter()
            state, m = step_fn(state, batch_fn(i))
            metrics.append(m)
            if i == 0:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
        jax.block_until_ready(state)
        timed = spec["steps"] - spec["warmup"]
        elapsed = time.perf_counter() - t_start
        profile = None
        if spec.get("profile_steps"):
            with tempfile.TemporaryDirectory() as pdir:
                with jax.profiler.trace(pdir, create_perfetto_trace=True):
                    for i in range(spec["profile_steps"]):
                        state, _ = step_fn(state, batch_fn(spec["steps"] + i))
                    jax.block_until_ready(state)
                profile = summarize_trace(pdir, spec["profile_steps"])
        losses = [float(x["loss"]) for x in jax.device_get(metrics)]
        stats = [d.memory_stats() or {} for d in devices]
        peak = [s.get("peak_bytes_in_use") for s in stats]
        tokens = run.train.batch_size * run.train.seq_len
        return {
            "name": spec["name"] + (f" ({spec['label']})" if spec.get("label") else ""),
            "run": spec["name"], "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compiler_options": {} if spec["unsharded"] else trainer.compiler_options,
            "devices": n,
            "mesh": dict(trainer.mesh.shape),
            "platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "shard_map_in_step": "shard_map" in jaxpr, "timed_steps": timed,
            "step_ms": elapsed / timed * 1e3, "tokens_per_s": tokens * timed / elapsed,
            "peak_gib_per_device": [None if p is None else p / 2**30 for p in peak],
            "startup_and_compile_s": compile_s, "losses": losses,
            "global_batch": [run.train.batch_size, run.train.seq_len],
            "parameters": params,
            "final_loss": float(np.mean(losses[-10:])),
            "profile": profile,
        }


# Kernel-name patterns of each category, checked in this order (lower case).
CATEGORIES = [
    ("communication", ("nccl", "all-reduce", "allreduce", "all_reduce", "reduce-scatter",
                       "reduce_scatter", "all-gather", "all_gather", "collective")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "sm90_xmma", "dot")),
    ("gla kernels", ("gla",)),
    # pallas_kernels/attention*.py name no pallas_call: their kernels carry the function names.
    ("attention kernels", ("flash", "attention", "mha", "attn", "_fwd_kernel", "_dq_kernel",
                           "_dkv_kernel", "_forward_kernel", "_decode_kernel")),
    ("other pallas", ("pallas", "scan", "pool", "mamba", "kernel")),
]


def summarize_trace(log_dir: str, steps: int, top: int = 25) -> dict:
    """Per-step GPU time by kernel and by category, from the perfetto trace of
    jax.profiler.trace(create_perfetto_trace=True). Only the first device's kernels."""
    import collections
    import glob
    import gzip

    files = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return {"error": "no perfetto trace written"}
    data = json.load(gzip.open(files[0]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = sorted(pid for pid, n in names.items() if "gpu" in n.lower() and "host" not in
                     n.lower())
    if not devices:
        return {"error": "no device events (CPU run?)", "processes": sorted(set(names.values()))}
    pid = devices[0]
    # A device's trace has kernel rows per CUDA stream and may have rows of XLA modules / ops
    # spanning them: count the stream rows only, when there are any.
    threads = {e["tid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") == pid}
    streams = {t for t, n in threads.items() if "stream" in n.lower()}
    per_kernel, count, calls = collections.Counter(), 0, collections.Counter()
    first, last = float("inf"), 0.0
    spans = {"communication": [], "compute": []}
    category = lambda name: next((c for c, pats in CATEGORIES
                                  if any(x in name.lower() for x in pats)),
                                 "other (fusions, copies)")
    for e in events:
        if (e.get("ph") == "X" and e.get("pid") == pid and e.get("dur")
                and (not streams or e.get("tid") in streams)):
            per_kernel[e["name"]] += e["dur"]
            calls[e["name"]] += 1
            count += 1
            first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
            kind = "communication" if category(e["name"]) == "communication" else "compute"
            spans[kind].append((e["ts"], e["ts"] + e["dur"]))
    busy = sum(per_kernel.values())
    cats = collections.Counter()
    for name, dur in per_kernel.items():
        cats[category(name)] += dur
    ms = lambda us: round(us / steps / 1e3, 3)
    compute = _union(spans["compute"])
    comm = _union(spans["communication"])
    exposed = _length(comm) - _overlap(comm, compute)
    return {"device": names[pid], "rows": sorted(set(threads.values())), "steps": steps,
            "kernels_per_step": count / steps,
            "busy_ms_per_step": ms(busy), "span_ms_per_step": ms(last - first),
            # Time with a compute kernel running on any stream, and the communication time
            # during which no compute kernel ran (collectives not hidden behind compute).
            "compute_ms_per_step": ms(_length(compute)),
            "exposed_communication_ms_per_step": ms(exposed),
            "idle_ms_per_step": ms((last - first) - _length(_union(compute + comm))),
            "categories_ms_per_step": {c: ms(d) for c, d in cats.most_common()},
            "top_kernels_ms_per_step": [[n, ms(d)] for n, d in per_kernel.most_common(top)],
            # Every kernel: [launches per step, ms per step] (to diff two runs' programs).
            "kernels": {n: [calls[n] / steps, ms(d)] for n, d in per_kernel.most_common()}}


def _union(spans: list) -> list:
    """Sorted, merged [start, end) intervals."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(union: list) -> float:
    return sum(b - a for a, b in union)


def _overlap(u: list, v: list) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(u) and j < len(v):
        a, b = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        total += max(0.0, b - a)
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- the driver ----------------------------------------------------------------------------------

def _spec(name: str, n: int, args) -> dict:
    if name == "single":
        data, fsdp = 1, 1
    elif name == "mesh1":
        data, fsdp = 1, 1
    elif name == "data":
        data, fsdp = n, 1
    elif name == "fsdp":
        data, fsdp = 1, n
    else:
        sizes = dict(kv.split("=") for kv in name.split(","))
        data, fsdp = int(sizes.get("data", 1)), int(sizes.get("fsdp", 1))
    return {"name": name, "data": data, "fsdp": fsdp, "unsharded": name == "single",
            "config": args.config, "overrides": args.set, "steps": args.steps,
            "warmup": min(args.warmup, args.steps - 1), "profile_steps": args.profile,
            "label": args.label}


def _launch(spec: dict, env: dict) -> dict:
    env = dict(env)
    if spec["data"] * spec["fsdp"] == 1:       # a one-device run holds only one GPU
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        return {"name": spec["name"], "error": (out.stdout + out.stderr)[-4000:]}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - t
    return result


def _device_count(env: dict) -> int:
    code = "import jax; print(jax.device_count(), jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    n, platform = out.stdout.split()[-2:]
    return int(n), platform


def _fmt(x, spec="{:.1f}"):
    return "—" if x is None else spec.format(x)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r.get("run", r["name"]) == "single" and "error" not in r),
                None)
    rows = ["| run | devices | mesh | tokens/s | step (ms) | peak GiB / device | speedup | "
            "efficiency | final loss | loss diff vs single: max / mean of last 50 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | failed: see JSON | | | | | | | | |")
            continue
        speed = eff = diff = late = None
        if base:
            speed = r["tokens_per_s"] / base["tokens_per_s"]
            eff = speed / r["devices"]
            k = min(len(r["losses"]), len(base["losses"]))
            d = [abs(a - b) for a, b in zip(r["losses"][:k], base["losses"][:k], strict=True)]
            diff, late = max(d), sum(d[-50:]) / len(d[-50:])
        peaks = [p for p in r["peak_gib_per_device"] if p is not None]
        mesh = ", ".join(f"{k}: {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        if r.get("run", r["name"]) == "single":
            mesh = "none (unsharded)"
        rows.append(f"| {r['name']} | {r['devices']} | {mesh} | {r['tokens_per_s']:,.0f} | "
                    f"{r['step_ms']:.1f} | {_fmt(max(peaks) if peaks else None, '{:.2f}')} | "
                    f"{_fmt(speed, '{:.3f}x')} | {_fmt(eff, '{:.1%}')} | "
                    f"{r['final_loss']:.4f} | {_fmt(diff, '{:.2e}')} / "
                    f"{_fmt(late, '{:.2e}')} |")
    return "\n".join(rows)


def plot_losses(results: list[dict], path: Path, title: str) -> None:
    """Loss against step for every run (matplotlib if installed; else nothing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if "error" not in r:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["name"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_table(results: list[dict]) -> str:
    """GPU time per step of the first device by category, for the runs traced (--profile)."""
    runs = [r for r in results if "error" not in r and (r.get("profile") or {}).get(
        "categories_ms_per_step")]
    if not runs:
        return ""
    cats = []
    for r in runs:
        cats += [c for c in r["profile"]["categories_ms_per_step"] if c not in cats]
    extra = [("compute_ms_per_step", "compute ms (any stream)"),
             ("exposed_communication_ms_per_step", "exposed comm. ms"),
             ("idle_ms_per_step", "idle ms")]
    extra = [(k, h) for k, h in extra if any(k in r["profile"] for r in runs)]
    rows = ["| run | step ms (timed) | GPU busy ms / step | kernels / step | " +
            " | ".join(cats + [h for _, h in extra]) + " |",
            "|---" * (4 + len(cats) + len(extra)) + "|"]
    for r in runs:
        pr = r["profile"]
        rows.append(f"| {r['name']} | {r['step_ms']:.1f} | {pr['busy_ms_per_step']:.1f} | "
                    f"{pr['kernels_per_step']:.0f} | " + " | ".join(
                        [f"{pr['categories_ms_per_step'].get(c, 0.0):.1f}" for c in cats] +
                        [f"{pr[k]:.1f}" if k in pr else "" for k, _ in extra]) + " |")
    return ("GPU time per step on the first device, from a jax.profiler trace of the steps after "
            "the timed ones (ms):\n\n" + "\n".join(rows))


def write(results: list[dict], args, n: int, platform: str, wall_s: float, out: Path) -> dict:
    """scaling.json, scaling.md and losses.png for the runs so far (rewritten after each run,
    so a run that hits a time limit keeps the earlier ones)."""
    ok = [r for r in results if "error" not in r]
    summary = {"config": args.config, "overrides": args.set, "steps": args.steps,
               "warmup": args.warmup, "devices": n, "platform": platform,
               "date": time.strftime("%Y-%m-%d"), "wall_s": wall_s, "runs": results}
    by = {r["name"]: r for r in ok}
    if "single" in by and "mesh1" in by:
        summary["mesh1_vs_single_tokens_ratio"] = (by["mesh1"]["tokens_per_s"] /
                                                  by["single"]["tokens_per_s"])
    n = max([r["devices"] for r in ok] or [n])     # merged runs may come from another machine
    head = (f"{time.strftime('%Y-%m-%d')}, {n} x {ok[0]['device_kind'] if ok else platform}, "
            f"jax {ok[0]['jax'] if ok else '?'}, config `{args.config}` "
            f"{' '.join(args.set)}, global batch "
            f"{ok[0]['global_batch'] if ok else '?'}, {args.steps} steps per run "
            f"(timed after {args.warmup}).")
    if "mesh1_vs_single_tokens_ratio" in summary:
        head += (f" Sharded path on one device / unsharded: "
                 f"{summary['mesh1_vs_single_tokens_ratio']:.3f}x tokens/s.")
    summary["markdown"] = head + "\n\n" + table(results)
    if profile_table(results):
        summary["markdown"] += "\n\n" + profile_table(results)
    (out / "scaling.json").write_text(json.dumps(summary, indent=1))
    (out / "scaling.md").write_text(summary["markdown"] + "\n")
    plot_losses(results, out / "losses.png", f"{args.config}: training loss per run")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="hybrid_3to1_gpu")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=200, help="steps per run (loss curve length)")
    p.add_argument("--warmup", type=int, default=20, help="untimed first steps (compile)")
    p.add_argument("--runs", default=None,
                   help="runs separated by ';': single, mesh1, data, fsdp or data=A,fsdp=B; "
                        "none: only tabulate the --merge files "
                        "(default: single;mesh1;data;fsdp)")
    p.add_argument("--out", default="bench_out/scaling")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace N more steps with jax.profiler and report GPU time "
                        "per step by kernel and by category (matmul, GLA / attention kernels, "
                        "communication, other)")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="scaling.json of an earlier call (same config and --set): its runs join "
                        "the table (e.g. `single` measured in one device call, `data` in another)")
    p.add_argument("--label", default="",
                   help="appended to the run names in the table, e.g. the XLA_FLAGS of this "
                        "call (the flags themselves are recorded in scaling.json)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on 8 simulated CPU devices (checks this script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")      # as train.py sets it
    if args.smoke:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
        args.set = SMOKE_SET + args.set
        if args.config == "hybrid_3to1_gpu":
            args.config = "hybrid_3to1"
    n, platform = _device_count(env)
    names = [] if args.runs == "none" else args.runs.split(";") if args.runs else (
        ["single", "mesh1"] + (["data", "fsdp"] if n > 1 else []))
    print(f"{n} {platform} device(s); config {args.config} {' '.join(args.set)}; "
          f"{args.steps} steps per run ({args.warmup} untimed); runs {names}", flush=True)
    results, t0 = [], time.perf_counter()
    for path in args.merge:                 # runs measured by an earlier call, same settings
        earlier = json.loads(Path(path).read_text())
        results += [r for r in earlier["runs"] if r["name"] not in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = _spec(name, n, args)
        r = _launch(spec, env)
        results.append(r)
        if "error" in r:
            print(f"  {name}: FAILED\n{r['error']}", flush=True)
        else:
            print(f"  {name}: {r['tokens_per_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step, "
                  f"final loss {r['final_loss']:.4f}, shard_map in step: "
                  f"{r['shard_map_in_step']}, {r['wall_s']:.0f} s wall", flush=True)
        write(results, args, n, platform, time.perf_counter() - t0, out)   # progress
    summary = write(results, args, n, platform, time.perf_counter() - t0, out)
    print("\n" + summary["markdown"], flush=True)
    print(f"\nwrote {out / 'scaling.json'}, {out / 'scaling.md'} and {out / 'losses.png'} "
          f"({summary['wall_s']:.0f} s)", flush=True)
    ok = [r for r in results if "error" not in r]
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

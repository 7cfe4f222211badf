"""Timing and error helpers shared by the kernel benchmarks (run on the GPU)."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import jax
import numpy as np


def timeit_ms(fn, *args, iters=10, reps=3, min_ms=None):
    """Median over `reps` of the mean time (ms) of `iters` back-to-back calls (after a warm-up).
    With `min_ms`, `iters` (1..100) is chosen from one timed call so that a repetition lasts
    about `min_ms`."""
    jax.block_until_ready(fn(*args))
    if min_ms is not None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one = (time.perf_counter() - t0) * 1e3
        iters = int(max(1, min(100, min_ms / max(one, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return float(np.median(times))


def rel_error(x, ref):
    """||x - ref|| / ||ref|| in float64; NaN when x has non-finite entries."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("nan")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def kernel_times(fn, args, runs: int = 5, top: int = 40) -> dict:
    """Device time per call of each GPU kernel of `fn` from a profiler trace of `runs` calls:
    {plane | line: {event: [mean us per call, launches per call]}}, the `top` longest events of
    each line of the GPU planes (streams: kernels; "XLA Ops" / "XLA Modules": HLO ops, modules).
    Dispatch overhead is not in it."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(runs):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(paths[0])
        result = {}
        for plane in data.planes:
            if "gpu" not in plane.name.lower():
                continue
            for line in plane.lines:
                sums = {}
                for ev in line.events:
                    t, c = sums.get(ev.name, (0.0, 0))
                    sums[ev.name] = (t + ev.duration_ns, c + 1)
                longest = sorted(sums.items(), key=lambda x: -x[1][0])[:top]
                result[f"{plane.name} | {line.name}"] = {
                    n[:120]: [round(t / runs / 1e3, 2), c / runs] for n, (t, c) in longest}
        return result

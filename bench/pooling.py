"""Benchmark of the PoNet pooling kernels on a GPU: correctness with real lowering, then each op
(forward, and forward + backward) against its jnp reference under jit and against its HBM floor.

The floor of an op is the bytes of its kernel's inputs and outputs, each moved once, over the
copy bandwidth measured in the same run (a device-to-device copy through PyTorch when it is
installed, else an XLA copy). Run from the repository root:

    PYTHONPATH=. python3 bench/pooling.py --out $OUT

Prints a table and writes pooling.json and pooling.md under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._common import timeit_ms  # noqa: E402
from pallas_kernels import pooling as pool  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

SEGMENT, WINDOW, HEAD_DIM = 32, 3, 128         # the mixer's defaults; heads = D / HEAD_DIM


def timeit(f, *args, reps=5, inner=10, target=0.02):
    """Median seconds per call (bench._common.timeit_ms, about `target` s a repetition) and the
    output of one more call."""
    return timeit_ms(f, *args, iters=inner, reps=reps, min_ms=target * 1e3) / 1e3, f(*args)


def copy_bandwidth(mib):
    """Bytes read + written per second of a device-to-device copy of `mib` MiB."""
    nbytes = mib << 20
    try:
        import torch
        a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(10):
            start.record()
            b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        torch_bw = 2 * nbytes / float(np.median(ts))
        del a, b
    except Exception:                               # no torch or no CUDA torch
        torch_bw = None
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    xla_copy = 2 * nbytes / timeit(jax.jit(lambda x: x.copy()), x)[0]
    xla_ew = 2 * nbytes / timeit(jax.jit(lambda x: x * jnp.bfloat16(1.5)), x)[0]
    return {"torch_copy": torch_bw, "xla_copy": xla_copy, "xla_elementwise": xla_ew}


@jax.jit
def _rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
    return jnp.where(jnp.all(jnp.isfinite(x)), err, jnp.inf)


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float32 on the device (inf if x has a NaN or inf)."""
    return float(_rel_err(x, ref))


def tied(key, shape, dtype):
    return (jnp.round(jax.random.normal(key, shape) * 2) / 2).astype(dtype)


# name -> (make_args(key, b, l, d, dtype), op(backend) -> fn, floor bytes fwd, floor bytes bwd)
def _ops():
    def x_args(key, b, l, d, dtype):
        return (tied(key, (b, l, d), dtype),)

    def qkv_args(key, b, l, d, dtype):
        ks = jax.random.split(key, 3)
        h = max(1, d // HEAD_DIM)
        return tuple(jax.random.normal(k, (b, l, h, d // h), dtype) for k in ks)

    def fuse_args(key, b, l, d, dtype):
        ks = jax.random.split(key, 4)
        return (jax.random.normal(ks[0], (b, 1, d), dtype),
                *(jax.random.normal(k, (b, l, d), dtype) for k in ks[1:]))

    def pool_args(g_len):                # g [B, 1, D] (bidirectional) or [B, L, D] (causal)
        def make(key, b, l, d, dtype):
            ks = jax.random.split(key, 4)
            return (jax.random.normal(ks[0], (b, g_len or l, d), dtype),
                    tied(ks[1], (b, l, d), dtype), jax.random.normal(ks[2], (b, l, d), dtype),
                    tied(ks[3], (b, l, d), dtype))
        return make

    def three_kernels(causal):           # the unfused path: segment max, local max, fusion
        def op(be, bl=None):
            return lambda g, s, o, l: pool.ponet_fuse(
                g, pool.segment_max(s, SEGMENT, causal=causal, backend=be, blocks=bl), o,
                pool.local_max(l, WINDOW, causal=causal, backend=be, blocks=bl), backend=be,
                blocks=bl)
        return op

    def fused(causal):
        return lambda be, bl=None: lambda g, s, o, l: pool.ponet_pool_fuse(
            g, s, o, l, SEGMENT, WINDOW, causal=causal, backend=be, blocks=bl)

    n = lambda a: a[0].size * a[0].dtype.itemsize        # bytes of one [B, L, D] operand
    return {
        "segment_max": (x_args, lambda be, bl=None: lambda x: pool.segment_max(
            x, SEGMENT, backend=be, blocks=bl),
            lambda a: 2 * n(a) + 4 * a[0].size // SEGMENT,
            lambda a: 2 * n(a) + 4 * a[0].size // SEGMENT),
        "segment_max causal": (x_args, lambda be, bl=None: lambda x: pool.segment_max(
            x, SEGMENT, causal=True, backend=be, blocks=bl),
            lambda a: 2 * n(a), lambda a: 3 * n(a)),
        "local_max": (x_args, lambda be, bl=None: lambda x: pool.local_max(
            x, WINDOW, backend=be, blocks=bl), lambda a: 2 * n(a), lambda a: 3 * n(a)),
        "local_max causal": (x_args, lambda be, bl=None: lambda x: pool.local_max(
            x, WINDOW, causal=True, backend=be, blocks=bl),
            lambda a: 2 * n(a), lambda a: 3 * n(a)),
        "prefix_mean": (x_args, lambda be, bl=None: lambda x: pool.prefix_mean(
            x, backend=be, blocks=bl), lambda a: 2 * n(a), lambda a: 2 * n(a)),
        # the variants: one walk over L (scan, or tensor-core products), chunk sums first
        "prefix_mean scan": (x_args, lambda be, bl=None: lambda x: pool.prefix_mean(
            x, backend=be, blocks=bl or pool.PoolBlocks(group=1, dot=False)),
            lambda a: 2 * n(a), lambda a: 2 * n(a)),
        "prefix_mean dot": (x_args, lambda be, bl=None: lambda x: pool.prefix_mean(
            x, backend=be, blocks=bl or pool.PoolBlocks(group=1, dot=True)),
            lambda a: 2 * n(a), lambda a: 2 * n(a)),
        "prefix_mean chunked": (x_args, lambda be, bl=None: lambda x: pool.prefix_mean(
            x, backend=be, blocks=bl or pool.PoolBlocks(group=16)),
            lambda a: 2 * n(a), lambda a: 2 * n(a)),
        "global_aggregate": (qkv_args, lambda be, bl=None: lambda q, k, v: pool.global_aggregate(
            q, k, v, backend=be, blocks=bl), lambda a: 3 * n(a), lambda a: 5 * n(a)),
        "ponet_fuse": (fuse_args, lambda be, bl=None: lambda g, s, o, l: pool.ponet_fuse(
            g, s, o, l, backend=be, blocks=bl), lambda a: 4 * n(a[1:]), lambda a: 5 * n(a[1:])),
        # (g + segment_max(s)) * o + local_max(l): floors of the fused op (s, o, l, dy read once;
        # ds, do, dl written once; g full in the causal mixer, one row bidirectionally)
        "pools+fuse 3 kernels": (pool_args(1), three_kernels(False), lambda a: 4 * n(a[1:]),
                                  lambda a: 7 * n(a[1:])),
        "ponet_pool_fuse": (pool_args(1), fused(False), lambda a: 4 * n(a[1:]),
                            lambda a: 7 * n(a[1:])),
        "pools+fuse causal 3 kernels": (pool_args(None), three_kernels(True),
                                         lambda a: 5 * n(a[1:]), lambda a: 9 * n(a[1:])),
        "ponet_pool_fuse causal": (pool_args(None), fused(True), lambda a: 5 * n(a[1:]),
                                   lambda a: 9 * n(a[1:])),
    }


def compile_all(fns, threads):
    """{key: (jitted fn, args)} -> {key: compiled executable, or the exception}, in threads."""
    def one(key):
        fn, args = fns[key]
        try:
            return key, fn.lower(*args).compile()
        except Exception as e:                      # reported on the row
            traceback.print_exc()
            return key, e

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        return dict(ex.map(one, list(fns)))


def fwd_bwd(fn):
    """jit of (dy, *args) -> (y, gradients for the cotangent dy)."""
    def run(dy, *args):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(dy)
    return jax.jit(run)


def cotangent(fn, args):
    """A random cotangent for fn(*args), made once outside the timed function."""
    out = jax.eval_shape(fn, *args)
    return jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(out.dtype)


def max_rel_err(out, out_ref):
    y, grads = out
    y_ref, grads_ref = out_ref
    return max([rel_err(y, y_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref, strict=True)])


def check_correctness(log, backend, shapes, selected):
    """Pallas vs reference on ragged shapes with ties: forward and gradients, bf16 and f32."""
    rows, ok = [], True
    bf16_shape, f32_shape = (tuple(map(int, s.split("x"))) for s in shapes.split(","))
    f32_ops = ["prefix_mean", "prefix_mean chunked", "global_aggregate", "ponet_fuse",
               "ponet_pool_fuse", "ponet_pool_fuse causal"]
    cases = [(jnp.bfloat16, bf16_shape, list(_ops())), (jnp.float32, f32_shape, f32_ops)]
    for dtype, (b, l, d), names in cases:
        for name in (n for n in names if n in selected):
            make, op, _, _ = _ops()[name]
            args = make(jax.random.key(l), b, l, d, dtype)
            try:
                dy = cotangent(op("reference"), args)
                err = max_rel_err(fwd_bwd(op(backend))(dy, *args),
                                  fwd_bwd(op("reference"))(dy, *args))
            except Exception as e:                  # report and go on to the next op
                log(f"FAIL {name} {jnp.dtype(dtype).name}: {type(e).__name__}: {str(e)[:1500]}")
                traceback.print_exc()
                err = float("inf")
            # bf16: the reference rounds every intermediate to bf16, the kernels work in f32
            good = err < (1e-5 if dtype == jnp.float32 else 2e-2)
            ok &= good
            rows.append({"op": name, "dtype": jnp.dtype(dtype).name, "shape": [b, l, d],
                         "max_rel_err": err, "pass": bool(good)})
            log(f"{'PASS' if good else 'FAIL'} {name:20s} {jnp.dtype(dtype).name:8s} "
                f"{b}x{l}x{d} max rel err {err:.2e}")
    return rows, ok


def _one_matmul():
    """PoolingMixer with its earlier input projection: one matmul x @ W [D, 6D] and jnp.split
    (bench only; the mixer now makes six matmuls, one per column block of W)."""
    from mixers.pooling import PoolingMixer

    class OneMatmul(PoolingMixer):
        def _project(self, x):
            return jnp.split(self.in_proj(x), 6, axis=-1)

    return OneMatmul


MIXER_VARIANTS = {  # name -> (impl is the kernel backend?, spec overrides, one matmul,
    #                      kernel defaults in effect while it is traced)
    "fused": (True, {"fused_pool": True}, False, {}),               # the defaults
    "3 kernels": (True, {"fused_pool": False}, False, {}),
    "fused 1 matmul": (True, {"fused_pool": True}, True, {}),
    "fused dot": (True, {"fused_pool": True}, False,                # causal only
                  {"prefix_mean": (64, 64, 1, 4, 3, True)}),
    "reference": (False, {}, False, {}),
    "reference 1 matmul": (False, {}, True, {}),
}


def _with_defaults(fn, defaults):
    """fn, with pool._DEFAULTS updated by `defaults` during each call (jit traces at the first)."""
    if not defaults:
        return fn

    def run(*args):
        saved = dict(pool._DEFAULTS)
        pool._DEFAULTS.update(defaults)
        try:
            return fn(*args)
        finally:
            pool._DEFAULTS.clear()
            pool._DEFAULTS.update(saved)

    return run


def mixer_fns(b, l, d, causal, backend, variants):
    """jit'd forward and forward+backward (params and x) of the PoolingMixer, per variant."""
    from flax import nnx

    from mixers import build_mixer
    from mixers.pooling import PoolingConfig

    x = jax.random.normal(jax.random.key(1), (b, l, d), jnp.bfloat16)
    out = {}
    for name in variants:
        kernel, over, one_matmul, defaults = MIXER_VARIANTS[name]
        if "dot" in name and not causal:
            continue
        spec = {"causal": causal, "impl": backend if kernel else "reference",
                "n_heads": d // HEAD_DIM, "segment_size": SEGMENT, "local_window": WINDOW, **over}
        if one_matmul:
            mixer = _one_matmul()(PoolingConfig(**spec), d_model=d, rngs=nnx.Rngs(0),
                                  dtype=jnp.bfloat16)
        else:
            mixer = build_mixer({"type": "pooling", **spec}, d_model=d, rngs=nnx.Rngs(0),
                                dtype=jnp.bfloat16)
        graphdef, state = nnx.split(mixer)
        fwd = jax.jit(lambda state, x, g=graphdef: nnx.merge(g, state)(x))

        def loss(state, x, g=graphdef):
            return jnp.sum(nnx.merge(g, state)(x).astype(jnp.float32) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        out[name] = (_with_defaults(fwd, defaults), _with_defaults(grad, defaults), state, x)
    return out


def bench_mixer(shape, backend, variants, results, log, over):
    """Each mixer variant, forward and forward + backward; speed-up = reference / variant."""
    b, l, d = map(int, shape.split("x"))
    log("| mixer | B x L x D | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up |")
    log("|---|---|---|---|---|---|")
    for causal in (False, True):
        try:
            fns = mixer_fns(b, l, d, causal, backend, variants)
        except Exception as e:
            log(f"| PoolingMixer causal={causal} | error: {type(e).__name__}: {str(e)[:300]} |")
            continue
        times = {}
        for name in ["reference"] + [v for v in variants if v != "reference"]:
            if name not in fns or over():
                continue
            f, g, s, x = fns[name]
            try:
                times[name] = (timeit(f, s, x)[0], timeit(g, s, x)[0])
            except Exception as e:
                log(f"| {name} causal={causal} | error: {type(e).__name__}: {str(e)[:300]} |")
                continue
            tf, tb = times[name]
            rf, rb = times.get("reference", (float("nan"),) * 2)
            results["mixer"].append({"variant": name, "causal": causal, "shape": [b, l, d],
                                     "fwd": tf, "fwd_bwd": tb, "ref_fwd": rf, "ref_fwd_bwd": rb})
            log(f"| {name}, causal={causal} | {shape} | {tf * 1e3:.3f} | {rf / tf:.2f} | "
                f"{tb * 1e3:.3f} | {rb / tb:.2f} |")


SWEEP = [  # (op, block sizes) tried besides the defaults, most wanted first
    ("global_aggregate", [dict(block_l=16, block_d=512, num_warps=8), dict(num_warps=8)]),
    ("ponet_fuse", [dict(block_l=64, block_d=128, num_warps=8)]),
    ("local_max causal", [dict(block_l=64, block_d=128, num_warps=8)]),
    ("ponet_pool_fuse causal", [dict(group=4, block_d=128)]),
    ("prefix_mean dot", [dict(block_l=32, dot=True), dict(block_d=32, dot=True),
                         dict(group=4, dot=True)]),
]

# --tune: op -> (key of pool._DEFAULTS, candidates); the fastest correct forward + backward at
# the tuning shape becomes the default of that key for the rest of the run (and is written to
# tuned.json). The current default is always a candidate ({}).
TUNE = {
    "prefix_mean": ("prefix_mean", [{}, dict(dot=True), dict(dot=True, block_l=32),
                                    dict(dot=True, block_d=32), dict(dot=True, block_l=128)]),
    "global_aggregate": ("aggregate", [{}, dict(num_warps=8),
                                       dict(block_l=16, block_d=512, num_warps=8),
                                       dict(block_l=32, block_d=256)]),
    "local_max causal": ("local_max", [{}, dict(block_l=64, block_d=128, num_warps=8),
                                       dict(block_l=16, block_d=256)]),
    "ponet_fuse": ("fuse", [{}, dict(block_l=64, block_d=128, num_warps=8),
                            dict(block_l=16, block_d=256)]),
    "ponet_pool_fuse causal": ("pool_fuse_causal", [{}, dict(group=4)]),
    "ponet_pool_fuse": ("pool_fuse", [{}, dict(block_l=64, num_warps=8)]),
}
_FIELDS = ("block_l", "block_d", "group", "num_warps", "num_stages", "dot")


def _setup(ops, name, b, l, d, copy_bw):
    """One op at one shape: (op, inputs, cotangent, reference result, fwd floor, fwd+bwd floor)."""
    make, op, floor_f, floor_b = ops[name]
    a = make(jax.random.key(0), b, l, d, jnp.bfloat16)
    dy = cotangent(op("reference"), a)
    ref_out = fwd_bwd(op("reference"))(dy, *a)
    return op, a, dy, ref_out, floor_f(a) / copy_bw, (floor_f(a) + floor_b(a)) / copy_bw


def _time_variant(name, op, backend, v, a, dy, ref_out, log):
    """Forward and forward+backward seconds and max relative error of one block variant, or
    None (logged) when it fails to compile or run."""
    try:
        fn = op(backend, pool.PoolBlocks(**v))
        tf = timeit(jax.jit(fn), *a)[0]
        tb, out = timeit(fwd_bwd(fn), dy, *a)
        return tf, tb, max_rel_err(out, ref_out)
    except Exception as e:
        log(f"| {name} | {v} | error: {type(e).__name__}: {str(e)[:200]} |")
        return None


def tune(shape, backend, copy_bw, log, over, publish):
    """Pick each TUNE op's fastest correct candidate; publish({defaults key: tuple}) after each
    op (so that a timeout keeps what was tuned)."""
    b, l, d = map(int, shape.split("x"))
    ops, chosen = _ops(), {}
    log(f"| tune at {shape} | candidate | fwd / floor | fwd+bwd / floor | rel err |")
    for name, (key, candidates) in TUNE.items():
        op, a, dy, ref_out, ff, fb = _setup(ops, name, b, l, d, copy_bw)
        best = None
        for v in candidates:
            if over():
                break
            timed = _time_variant(name, op, backend, v, a, dy, ref_out, log)
            if timed is None:
                continue
            tf, tb, err = timed
            log(f"| {name} | {v} | {tf / ff:.2f} | {tb / fb:.2f} | {err:.1e} |")
            # a new default must beat the current one ({}, timed first) by 3%: not by noise
            if err < 2e-2 and (best is None or tb < (0.97 if best[1] == {} else 1.0) * best[0]):
                best = (tb, v)
        if best is not None:
            default = pool._DEFAULTS[key]
            chosen[key] = tuple(best[1].get(f, dv) for f, dv in zip(_FIELDS, default,
                                                                      strict=True))
            log(f"tuned {key}: {default} -> {chosen[key]}")
            publish(chosen)


def sweep(shape, backend, copy_bw, results, log, over, names, save):
    """Other block sizes of each kernel at one shape (kernel only; ratios to the floor)."""
    b, l, d = map(int, shape.split("x"))
    ops = _ops()
    log(f"| sweep at {shape} | blocks | fwd / floor | fwd+bwd / floor | rel err |")
    for name, variants in SWEEP:
        if name not in names:
            continue
        op, a, dy, ref_out, ff, fb = _setup(ops, name, b, l, d, copy_bw)
        for v in variants:
            if over():
                return
            timed = _time_variant(name, op, backend, v, a, dy, ref_out, log)
            if timed is None:
                continue
            tf, tb, err = timed
            results.setdefault("sweep", []).append({"op": name, "blocks": v, "fwd": tf,
                                                    "fwd_bwd": tb, "shape": [b, l, d],
                                                    "max_rel_err": err})
            log(f"| {name} | {v} | {tf / ff:.2f} | {tb / fb:.2f} | {err:.1e} |")
            save()



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; later rows skipped")
    parser.add_argument("--shapes", default="8x16384x2048,8x4096x1024,8x4096x2048,8x16384x1024")
    parser.add_argument("--ops", default=",".join(_ops()), help="comma-separated")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--check-ops", default=None, help="ops checked for correctness (--ops)")
    parser.add_argument("--check-shapes", default="2x4133x1000,2x1037x520",
                        help="ragged shapes of the bf16 and the f32 correctness checks")
    parser.add_argument("--copy-mib", type=int, default=2048, help="0: no bandwidth, no floors")
    parser.add_argument("--backend", default="pallas", help="'interpret' for a dry run on CPU")
    parser.add_argument("--mixer-shapes", default="8x4096x1024",
                        help="comma-separated, '' to skip the mixer; timed after the ops of the "
                             "first shape (--shapes '': no ops, only the mixer and the sweep)")
    parser.add_argument("--mixer-variants", default="fused,3 kernels,reference",
                        help=f"comma-separated, of {list(MIXER_VARIANTS)}")
    parser.add_argument("--sweep", action="store_true", help="time other block sizes too")
    parser.add_argument("--sweep-shape", default="", help="default: the first of --shapes")
    parser.add_argument("--tune", default="", help="a shape: pick the TUNE defaults there first "
                                                   "(written to tuned.json)")
    parser.add_argument("--defaults", default="", help="a tuned.json to apply first (if it exists)")
    parser.add_argument("--late-mixer-shapes", default="", help="mixer shapes timed last")
    parser.add_argument("--compile-threads", type=int, default=12)
    parser.add_argument("--tag", default="pooling", help="name of the json and md files")
    args = parser.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    lines = []
    names = args.ops.split(",")
    ops = _ops()
    if unknown := [n for n in names if n not in ops]:
        parser.error(f"unknown ops {unknown}; valid: {list(ops)}")

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = jax.devices()[0]
    meta = {"date": datetime.date.today().isoformat(), "device": dev.device_kind,
            "jax": jax.__version__, "segment": SEGMENT, "window": WINDOW, "head_dim": HEAD_DIM,
            "argv": " ".join(sys.argv[1:])}
    log(f"# {meta}")
    results = {"meta": meta, "bench": [], "mixer": []}

    def save():                                     # after every row: a timeout keeps the rest
        results["defaults_in_effect"] = {k: list(v) for k, v in pool._DEFAULTS.items()}
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    if args.defaults and os.path.exists(args.defaults):
        with open(args.defaults) as f:
            tuned = {k: tuple(v) for k, v in json.load(f).items()}
        pool._DEFAULTS.update(tuned)
        results["defaults_applied"] = tuned
        log(f"defaults from {args.defaults}: {tuned}")
    if not args.no_check:
        results["check"], ok = check_correctness(
            log, args.backend, args.check_shapes,
            names if args.check_ops is None else args.check_ops.split(","))
        log(f"correctness: {'all pass' if ok else 'FAILURES'}  ({time.time() - t_start:.0f} s)")
        save()
    copy_bw = float("nan")
    if args.copy_mib:
        bw = copy_bandwidth(args.copy_mib)
        results["bandwidth"] = bw
        copy_bw = bw["torch_copy"] or bw["xla_copy"]
        log("bandwidth TB/s: " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bw.items() if v))
        save()

    def mixer(mixer_shapes):
        for mshape in (s for s in mixer_shapes.split(",") if s):
            if not over():
                bench_mixer(mshape, args.backend, args.mixer_variants.split(","), results, log,
                            over)
                save()

    over = lambda: time.time() - t_start > args.budget
    if args.tune:
        def publish(tuned):
            pool._DEFAULTS.update(tuned)
            results["tuned"] = tuned
            with open(os.path.join(args.out, "tuned.json"), "w") as f:
                json.dump(tuned, f)
            save()

        tune(args.tune, args.backend, copy_bw, log, over, publish)
    shapes = [s for s in args.shapes.split(",") if s]
    if shapes:
        log("| op | B x L x D | fwd ms | ref fwd ms | fwd / floor | ref / floor | fwd+bwd ms | "
            "ref fwd+bwd ms | fwd+bwd / floor | ref / floor | rel err |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
    for si, shape in enumerate(shapes):
        b, l, d = map(int, shape.split("x"))
        if over():
            log(f"(budget reached: skipped {shape})")
            continue
        # Every op's four functions at this shape compile in parallel threads first (XLA and
        # Triton compile outside the GIL), then run one after another.
        todo = {}
        for name in names:
            make, op, floor_f, floor_b = ops[name]
            a = make(jax.random.key(0), b, l, d, jnp.bfloat16)
            dy = cotangent(op("reference"), a)
            todo[name] = (a, dy, {"fwd": (jax.jit(op(args.backend)), a),
                                  "ref_fwd": (jax.jit(op("reference")), a),
                                  "fwd_bwd": (fwd_bwd(op(args.backend)), (dy, *a)),
                                  "ref_fwd_bwd": (fwd_bwd(op("reference")), (dy, *a))})
        compiled = compile_all({(n, k): fa for n, (_, _, fns) in todo.items()
                                for k, fa in fns.items()}, args.compile_threads)
        log(f"({shape}: compiled in {time.time() - t_start:.0f} s)")
        for name in names:
            if over():
                log(f"(budget reached: skipped {name} at {shape})")
                continue
            a, dy, fns = todo[name]
            _, _, floor_f, floor_b = ops[name]
            row = {"op": name, "shape": [b, l, d]}
            try:
                outs = {}
                for kind in fns:
                    fn = compiled[(name, kind)]
                    if isinstance(fn, Exception):
                        raise fn
                    row[kind], outs[kind] = timeit(fn, *fns[kind][1])
                row["max_rel_err"] = max_rel_err(outs["fwd_bwd"], outs["ref_fwd_bwd"])
                del outs
            except Exception as e:
                log(f"| {name} | {shape} | error: {type(e).__name__}: {str(e)[:300]} |")
                continue
            ff = floor_f(a) / copy_bw
            fb = (floor_f(a) + floor_b(a)) / copy_bw
            row.update(floor_fwd=ff, floor_fwd_bwd=fb)
            results["bench"].append(row)
            log(f"| {name} | {shape} | {row['fwd'] * 1e3:.3f} | {row['ref_fwd'] * 1e3:.3f} | "
                f"{row['fwd'] / ff:.2f} | {row['ref_fwd'] / ff:.2f} | "
                f"{row['fwd_bwd'] * 1e3:.3f} | {row['ref_fwd_bwd'] * 1e3:.3f} | "
                f"{row['fwd_bwd'] / fb:.2f} | {row['ref_fwd_bwd'] / fb:.2f} | "
                f"{row['max_rel_err']:.1e} |")
            save()
        del todo, compiled
        if si == 0:
            mixer(args.mixer_shapes)
    if not shapes:
        mixer(args.mixer_shapes)
    mixer(args.late_mixer_shapes)
    sweep_shape = args.sweep_shape or (shapes[0] if shapes else "")
    if args.sweep and sweep_shape and not over():
        sweep(sweep_shape, args.backend, copy_bw, results, log, over, names, save)
    log(f"total {time.time() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()

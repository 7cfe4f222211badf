"""The selective scan's Mosaic GPU kernels as lowered for CUDA, captured on any machine (no GPU).

For refactors of pallas_kernels/selective_scan_mgpu.py when no GPU is at hand: run it before and
after the change and compare the folders; identical text means the change traced the same
kernels (the same operations in the same order), so the GPU timings and checks still hold.

    python bench/mgpu_lowering.py --out /tmp/before      # on the old code
    python bench/mgpu_lowering.py --out /tmp/after       # on the new code
    diff -r /tmp/before /tmp/after && echo identical

Each case is exported with `jax.export(..., platforms=["cuda"])` (forward, and forward+backward
through jax.grad) with the Hopper check patched to true. The Mosaic GPU modules are taken as
MLIR text without debug info (their locations change with every edited line) from Mosaic GPU's
serialization pass, and written to OUT/<case>_<fwd|fb>.mlir; one sha256 per file is printed.
Cases: the default path at 8×2048×2048 (bf16, z, D, bias, softplus; the pair kernels), at
2×777×256 (f32, 2 groups, every option, ragged) and at 8×2048×4096 (the one-thread kernels),
plus the opt-in v8 inference body, `rawp`, `mgpu_bwd_direct_out`, `mgpu_bwd_perm=3` and the ck2
one-thread backward (`--only` picks cases by name).
A kernel lowered by an earlier case may come from a cache in a later one: compare whole folders
from the same script.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ss = importlib.import_module("pallas_kernels.selective_scan")

_KERNELS: list[str] = []


def _capture_kernels():
    """Records every Mosaic GPU module Mosaic serializes, as text without debug info."""
    from jax.experimental.mosaic.gpu import core
    serde = core._run_serde_pass

    def recording(module, **kw):
        if kw.get("serialize"):
            _KERNELS.append(module.operation.get_asm(enable_debug_info=False))
        return serde(module, **kw)
    core._run_serde_pass = recording
    ss._is_hopper = lambda: True


def cases():
    """(name, (u, delta, A, B, C), selective_scan_pallas keyword arguments)."""
    ck2_one_thread = dict(mgpu_bwd_pair=False, mgpu_ck_pair=True, mgpu_ck_late=False,
                          mgpu_bwd_keep_b=False, mgpu_bwd_pad_rows=False,
                          mgpu_bwd_pair_ahead=False, mgpu_bwd_direct_out=False)
    for b, length, dn, n, groups, dtype, extra in [
            (8, 2048, 2048, 16, None, jnp.bfloat16, "z"),
            (2, 777, 256, 16, 2, jnp.float32, "all"),
            (8, 2048, 4096, 16, None, jnp.bfloat16, "")]:
        seq = jnp.zeros((b, length, dn), dtype)
        bc = jnp.zeros((b, length, n) if groups is None else (b, length, groups, n), dtype)
        args = (seq, seq, jnp.zeros((dn, n), jnp.float32), bc, bc)
        kw = {}
        if extra:
            kw = dict(z=seq, D=jnp.zeros((dn,), jnp.float32),
                      delta_bias=jnp.zeros((dn,), jnp.float32), delta_softplus=True)
        if extra == "all":
            kw["initial_state"] = jnp.zeros((b, dn, n), jnp.float32)
        yield f"default_{b}x{length}x{dn}", args, kw
        if n == 16 and groups is None:
            yield f"bwd_perm3_{b}x{length}x{dn}", args, dict(kw, mgpu_bwd_perm=3)
            yield f"bwd_red_early_{b}x{length}x{dn}", args, dict(kw, mgpu_bwd_red_early=True)
        if dn == 2048:
            yield "ck2_one_thread", args, dict(kw, **ck2_one_thread)
            yield "direct_out", args, dict(kw, mgpu_bwd_direct_out=True)
            yield "v8_inference_body", args, dict(kw, mgpu_pair_inf=None)
            yield "rawp", args, dict(kw, mgpu_pair_inf=(("sp1", True), ("ydefer", 16),
                                                        ("rawp", True)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the <case>_<mode>.mlir files")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _capture_kernels()
    only = set(filter(None, args.only.split(",")))
    for name, xs, kw in cases():
        if only and name not in only:
            continue
        def fwd(*a, kw=kw):
            return ss.selective_scan_pallas(*a, **kw)[0]

        def fb(*a, kw=kw):
            loss = lambda *x: ss.selective_scan_pallas(*x, **kw)[0].astype(jnp.float32).sum()
            return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a)
        for mode, f in (("fwd", fwd), ("fb", fb)):
            jax.export.export(jax.jit(f), platforms=["cuda"])(*xs)
            text = "\n".join(_KERNELS)
            _KERNELS.clear()
            with open(os.path.join(args.out, f"{name}_{mode}.mlir"), "w") as fh:
                fh.write(text)
            print(f"{name}_{mode}: {hashlib.sha256(text.encode()).hexdigest()[:16]}, "
                  f"{text.count('func.func')} functions", flush=True)


if __name__ == "__main__":
    main()

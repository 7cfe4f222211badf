"""Every Mosaic TPU kernel lowered for a real TPU, on this CPU machine (no TPU needed).

`jax.export(jax.jit(f), platforms=["tpu"])` inside an abstract mesh of one TPU device runs the
real Pallas -> Mosaic lowering of each `pallas_call` (not interpret mode) and serializes the
Mosaic module into a `tpu_custom_call`, exactly as it would ship to a TPU. `tpu_target` also
makes `_common.platform()` say "tpu", so the public functions dispatch as on a TPU
(backend="pallas" -> the Mosaic kernels). Each case asserts the exact multiset of Mosaic kernels
(by kernel name) in the exported module: a silent fallback to the jnp reference lowers too, with
no kernel, and fails. With a libtpu.so (TPU_LIBRARY_PATH) the same cases, and whole models'
training steps, also go through the real TPU compiler, deviceless. What this does and does not
verify: docs/tpu.md.

Run: `python -m pytest -q tests/kernels/test_tpu_lowering.py` (default ~30 s, ~50 s with libtpu);
`-m slow` adds f32 compiles, TPU v6e/v4/v5p and the model configs.
"""

import base64
import collections
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib
from jax._src.lib import tpu
from jax._src.lib.mlir import ir, passmanager
from jax.experimental import pallas as pl

from pallas_kernels import _common

attn = importlib.import_module("pallas_kernels.attention")
attn_tpu = importlib.import_module("pallas_kernels.attention_tpu")
gla_mod = importlib.import_module("pallas_kernels.gla")
ss = importlib.import_module("pallas_kernels.selective_scan")
pool = importlib.import_module("pallas_kernels.pooling")
probsparse = importlib.import_module("pallas_kernels.probsparse")

CHIP = ("TPU v5 lite", 1)                          # device_kind, TensorCores per device
OTHER_CHIPS = (("TPU v6 lite", 1), ("TPU v4", 2))  # v4: megacore (two cores, one device)
VMEM_BUDGET = 16 * 2**20   # scoped VMEM limit of v5e/v5p, all of a v4 core (docs/tpu.md)


# ---------------------------------------------------------------------------------------------
# Lowering helpers
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tpu_target(device_kind: str = CHIP[0], num_cores: int = CHIP[1]):
    """Trace and lower for one TPU device of `device_kind` (a kind jax/_src/tpu_info.py knows).

    jax.enable_checks also runs the MLIR verifier over the whole Mosaic module when it is
    serialized (the lowering itself verifies the kernel body only).
    """
    device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                     platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with (jax.sharding.use_abstract_mesh(mesh), jax.enable_checks(True),
          mock.patch.object(_common, "platform", lambda: "tpu")):
        yield


@dataclasses.dataclass(frozen=True)
class MosaicKernel:
    name: str
    body: bytes      # the serialized Mosaic module, as the TPU compiler receives it

    def module_text(self) -> str:
        """The Mosaic MLIR (deserialized with the same `mosaic-serde` pass that wrote it)."""
        ctx = ir.Context()
        tpu.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        with ctx, ir.Location.unknown(ctx):
            module = ir.Module.parse(self.body)
            passmanager.PassManager.parse(
                "builtin.module(mosaic-serde{serialize=false})").run(module.operation)
            return str(module)

    def vmem_bytes(self) -> int:
        """Lower bound of the kernel's VMEM: two buffers per pipelined block plus the scratch,
        each padded to (8 * packing, 128) tiles. Values the compiler spills are not counted."""
        text = self.module_text()
        main = re.search(r"function_type = \((.*?)\) -> \(\).*?scratch_operands = (\d+)"
                         r".*?window_params = \[(.*?)\]\}", text, re.S)
        args, n_scratch, windows = main.group(1), int(main.group(2)), main.group(3)
        vmem = [_memref_bytes(m) for m in re.findall(r"memref<([^>]*vmem>)>", args)]
        n_windows = windows.count("window_bounds")
        blocks, scratch = vmem[:len(vmem) - n_scratch], vmem[len(vmem) - n_scratch:]
        assert len(blocks) == n_windows, (len(blocks), n_windows)
        return 2 * sum(blocks) + sum(scratch)


def _memref_bytes(spec: str) -> int:
    dims = spec.split(",")[0].split("x")
    shape, dtype = [int(d) for d in dims[:-1]], dims[-1]
    size = {"f32": 4, "i32": 4, "bf16": 2, "f16": 2, "i8": 1}.get(dtype, 4)
    if shape:
        shape[-1] = _common.round_up(shape[-1], 128)
    if len(shape) >= 2:
        shape[-2] = _common.round_up(shape[-2], 8 * (4 // size))
    n = size
    for d in shape:
        n *= d
    return n


def lower_for_tpu(fn, *args, chip=CHIP) -> list[MosaicKernel]:
    """Export jit(fn) for a TPU; returns the Mosaic kernels of the module in program order."""
    with tpu_target(*chip):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    kernels = []
    for line in exported.mlir_module().splitlines():
        if "@tpu_custom_call" not in line:
            continue
        config = re.search(r'backend_config = "([^"]*)"', line).group(1).replace("\\22", '"')
        body = json.loads(config)["custom_call_config"]["body"]
        name = re.search(r'kernel_name = "([^"]*)"', line).group(1)
        kernels.append(MosaicKernel(name, base64.b64decode(body)))
    return kernels


def check_kernels(kernels: list[MosaicKernel], expected: dict[str, int]) -> None:
    """The module holds exactly these Mosaic kernels (name -> count)."""
    found = collections.Counter(k.name for k in kernels)
    assert found == collections.Counter(expected), (
        f"Mosaic kernels {dict(found)}, expected {expected}")


def train(fn, argnums):
    """value_and_grad of a sum of every output: the training forward and every backward."""
    def loss(*a):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fn(*a)))
    return lambda *a: jax.value_and_grad(loss, argnums)(*a)


# ---------------------------------------------------------------------------------------------
# The cases: (id, fn, input shapes and dtypes, forward kernels, backward kernels or None)
# ---------------------------------------------------------------------------------------------

S = jax.ShapeDtypeStruct
I32 = jnp.int32
F32 = jnp.float32

FLASH_FWD = {"flash_attention_fwd_tpu": 1}
FLASH_BWD = {"flash_attention_dq_tpu": 1, "flash_attention_dkv_tpu": 1}


def _attention_cases(dt):
    def flash(**kw):
        return lambda q, k, v: attn.flash_attention(q, k, v, backend="pallas", **kw)

    def seg_flash(q, k, v, seg):
        return attn.flash_attention(q, k, v, segment_ids=seg, causal=True, backend="pallas")

    def decode(**kw):
        return lambda q, k, v, n: attn.decode_attention(q, k, v, n, backend="pallas", **kw)

    q, kv = S((2, 256, 4, 128), dt), S((2, 256, 2, 128), dt)
    q_long, kv_long = S((1, 200, 4, 64), dt), S((1, 330, 4, 64), dt)
    tiny = S((1, 5, 2, 64), dt)
    return [
        ("flash_causal_gqa", flash(causal=True), (q, kv, kv), FLASH_FWD, FLASH_BWD),
        ("flash_full", flash(), (q, q, q), FLASH_FWD, FLASH_BWD),
        ("flash_window", flash(causal=True, window=64), (q, kv, kv), FLASH_FWD, FLASH_BWD),
        ("flash_segments", seg_flash, (q, kv, kv, S((2, 256), I32)), FLASH_FWD, FLASH_BWD),
        ("flash_ragged_lq_ne_lk", flash(causal=True), (q_long, kv_long, kv_long), FLASH_FWD,
         FLASH_BWD),
        ("flash_tiny", flash(causal=True), (tiny, tiny, tiny), FLASH_FWD, FLASH_BWD),
        ("decode_t1_gqa_window", decode(window=100),
         (S((2, 1, 8, 128), dt), S((2, 300, 2, 128), dt), S((2, 300, 2, 128), dt),
          S((2,), I32)), {"flash_decode_tpu": 1}, None),
        ("decode_t3", decode(),
         (S((3, 3, 4, 64), dt), S((3, 40, 4, 64), dt), S((3, 40, 4, 64), dt), S((3,), I32)),
         {"flash_decode_tpu": 1}, None),
    ]


GLA_FWD = {"gla_fwd_tpu": 1}
GLA_BWD = {"gla_bwd_dq_tpu": 1, "gla_bwd_dkv_tpu": 1}


def _gla_cases(dt):
    def run(q, k, v, g, s0=None):
        return gla_mod.gla(q, k, v, g, initial_state=s0, return_state=True, backend="pallas")

    qk, v = S((2, 200, 2, 64), dt), S((2, 200, 2, 32), dt)
    odd_qk, odd_v = S((1, 65, 3, 100), dt), S((1, 65, 3, 20), dt)
    return [
        ("gla_initial_state", run, (qk, qk, v, qk, S((2, 2, 64, 32), F32)), GLA_FWD, GLA_BWD),
        ("gla_odd_dims", run, (odd_qk, odd_qk, odd_v, odd_qk), GLA_FWD, GLA_BWD),
    ]


SCAN_FWD = {"selective_scan_fwd_tpu": 1}
SCAN_BWD = {"selective_scan_bwd_tpu": 1}


def _scan_cases(dt):
    def scan(*opts, softplus=True):
        def run(u, delta, a, b, c, *rest):
            kw = dict(zip(opts, rest, strict=True))
            return ss.selective_scan(u, delta, a, b, c, **kw, delta_softplus=softplus,
                                     return_state=True, backend="pallas")
        return run

    def shapes(bsz, length, dn, n, groups=1):
        bc = S((bsz, length, n) if groups == 1 else (bsz, length, groups, n), dt)
        u = S((bsz, length, dn), dt)
        return u, (u, u, S((dn, n), F32), bc, bc), dict(D=S((dn,), F32), z=u,
                                                       delta_bias=S((dn,), F32),
                                                       initial_state=S((bsz, dn, n), F32))

    u, base, opt = shapes(2, 100, 256, 16)
    _, small, _ = shapes(2, 50, 48, 8)
    _, grouped, _ = shapes(1, 40, 512, 16, groups=4)          # 128 lanes per group
    _, narrow, _ = shapes(1, 40, 512, 16, groups=8)           # 64: two groups per block
    cases = [("scan_plain", scan(softplus=False), base),
             ("scan_z", scan("z"), base + (opt["z"],)),
             ("scan_d_bias", scan("D", "delta_bias"), base + (opt["D"], opt["delta_bias"])),
             ("scan_all", scan("D", "z", "delta_bias", "initial_state"),
              base + (opt["D"], opt["z"], opt["delta_bias"], opt["initial_state"])),
             ("scan_channels_below_128", scan(), small),
             ("scan_grouped_bc", scan(), grouped),
             ("scan_grouped_bc_narrow", scan(), narrow)]
    return [(name, fn, args, SCAN_FWD, SCAN_BWD) for name, fn, args in cases]


def _pool_cases(dt):
    x, row = S((2, 300, 256), dt), S((2, 1, 256), dt)
    narrow = S((2, 300, 96), dt)                 # channels no multiple of 128
    qkv = S((2, 300, 4, 64), dt)
    p = lambda f, **kw: (lambda *a: f(*a, **kw, backend="pallas"))
    return [
        ("segment_max", p(pool.segment_max, segment_size=5), (x,),
         {"segment_max_tpu": 1}, {"segment_max_bwd_tpu": 1}),
        ("segment_max_causal", p(pool.segment_max, segment_size=16, causal=True), (x,),
         {"segment_max_tpu": 1}, {"segment_max_bwd_tpu": 1}),
        ("local_max", p(pool.local_max, window=3), (x,),
         {"local_max_tpu": 1}, {"local_max_bwd_tpu": 1}),
        ("local_max_causal", p(pool.local_max, window=4, causal=True), (x,),
         {"local_max_tpu": 1}, {"local_max_bwd_tpu": 1}),
        ("local_max_96_channels", p(pool.local_max, window=5), (narrow,),
         {"local_max_tpu": 1}, {"local_max_bwd_tpu": 1}),
        ("segment_max_96_channels", p(pool.segment_max, segment_size=7, causal=True), (narrow,),
         {"segment_max_tpu": 1}, {"segment_max_bwd_tpu": 1}),
        ("prefix_mean", p(pool.prefix_mean), (x,),
         {"prefix_mean_tpu": 1}, {"prefix_mean_bwd_tpu": 1}),
        ("global_aggregate", p(pool.global_aggregate), (qkv, qkv, qkv),
         {"aggregate_qsum_tpu": 1, "aggregate_fwd_tpu": 1}, {"aggregate_bwd_tpu": 1}),
        ("ponet_fuse_g_row", p(pool.ponet_fuse), (row, x, x, x),
         {"ponet_fuse_tpu": 1}, {"ponet_fuse_bwd_tpu": 1}),
        ("ponet_fuse_g_full", p(pool.ponet_fuse), (x, x, x, x),
         {"ponet_fuse_tpu": 1}, {"ponet_fuse_bwd_tpu": 1}),
        ("ponet_pool_fuse_causal", p(pool.ponet_pool_fuse, segment_size=4, causal=True),
         (row, x, x, x),
         {"segment_max_tpu": 1, "local_max_tpu": 1, "ponet_fuse_tpu": 1},
         {"segment_max_bwd_tpu": 1, "local_max_bwd_tpu": 1, "ponet_fuse_bwd_tpu": 1}),
        ("ponet_pool_fuse", p(pool.ponet_pool_fuse, segment_size=8, window=5), (row, x, x, x),
         {"segment_max_tpu": 1, "local_max_tpu": 1, "ponet_fuse_tpu": 1},
         {"segment_max_bwd_tpu": 1, "local_max_bwd_tpu": 1, "ponet_fuse_bwd_tpu": 1}),
    ]


def _cases():
    out = []
    for dt in (jnp.bfloat16, jnp.float32):
        for family in (_attention_cases, _gla_cases, _scan_cases, _pool_cases):
            for name, fn, args, fwd, bwd in family(dt):
                out.append(pytest.param(fn, args, fwd, bwd,
                                        id=f"{name}-{jnp.dtype(dt).name}"))
    return out


CASES = _cases()


def _float_args(args):
    return tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))


def _lower_case(fn, args, fwd, bwd, chip=CHIP):
    """Lower the forward (inference) and, where a backward exists, the training step."""
    forward = lower_for_tpu(fn, *args, chip=chip)
    check_kernels(forward, fwd)
    step = []
    if bwd is not None:
        step = lower_for_tpu(train(fn, _float_args(args)), *args, chip=chip)
        check_kernels(step, collections.Counter(fwd) + collections.Counter(bwd))
    return forward + step


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, args, fwd, bwd", CASES)
def test_kernel_lowers_to_mosaic_and_fits_vmem(fn, args, fwd, bwd):
    for kernel in _lower_case(fn, args, fwd, bwd):
        assert kernel.vmem_bytes() <= VMEM_BUDGET, (kernel.name, kernel.vmem_bytes())


def _one_per_family():
    keep = ("flash_causal_gqa", "decode_t1_gqa_window", "gla_initial_state", "scan_all",
            "segment_max_causal", "local_max", "global_aggregate", "ponet_pool_fuse")
    return [c for c in CASES if c.id.split("-")[0] in keep and c.id.endswith("bfloat16")]


@pytest.mark.parametrize("chip", OTHER_CHIPS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("fn, args, fwd, bwd", _one_per_family())
def test_mosaic_module_is_the_same_on_other_chips(fn, args, fwd, bwd, chip):
    """The kernels lower for other generations too, to the same Mosaic module (compared
    without source locations): the lowering takes nothing chip-specific from our kernels, the
    TPU compiler does the per-chip work."""
    reference = _lower_case(fn, args, fwd, bwd)
    other = _lower_case(fn, args, fwd, bwd, chip=chip)
    assert [k.module_text() for k in other] == [k.module_text() for k in reference]


@pytest.mark.slow
@pytest.mark.parametrize("chip", OTHER_CHIPS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("fn, args, fwd, bwd", CASES)
def test_kernel_lowers_on_other_chips(fn, args, fwd, bwd, chip):
    _lower_case(fn, args, fwd, bwd, chip=chip)


def _large_cases():
    f32, bf16 = F32, jnp.bfloat16
    x, qkv = S((2, 4096, 1024), f32), S((2, 4096, 16, 128), f32)
    q256, g256 = S((1, 4096, 8, 256), f32), S((1, 4096, 4, 256), f32)
    u, a, bc = S((1, 2048, 4096), f32), S((4096, 128), f32), S((1, 2048, 128), f32)
    kv = S((4, 8192, 8, 128), bf16)
    cases = [(f"segment_max_{size}{'_causal' * c}",
              lambda x, size=size, c=c: pool.segment_max(x, size, causal=c, backend="pallas"),
              (x,), True) for size in (32, 256, 1024) for c in (False, True)]
    cases.append(("segment_max_2048_causal_1000_channels", lambda x: pool.segment_max(
        x, 2048, causal=True, backend="pallas"), (S((1, 2048, 1000), f32),), True))
    return cases + [
        ("local_max_9", lambda x: pool.local_max(x, 9, backend="pallas"), (x,), True),
        ("prefix_mean", lambda x: pool.prefix_mean(x, backend="pallas"), (x,), True),
        ("global_aggregate_16x128", lambda q, k, v: pool.global_aggregate(
            q, k, v, backend="pallas"), (qkv, qkv, qkv), True),
        ("flash_d256", lambda q, k, v: attn.flash_attention(q, k, v, causal=True,
                                                            backend="pallas"),
         (q256, q256, q256), True),
        ("gla_256", lambda q, k, v, g: gla_mod.gla(q, k, v, g, backend="pallas"),
         (g256, g256, g256, g256), True),
        ("scan_n128", lambda u, d, a, b, c: ss.selective_scan(u, d, a, b, c, backend="pallas"),
         (u, u, a, bc, bc), True),
        ("decode_8k", lambda q, k, v, n: attn.decode_attention(q, k, v, n, backend="pallas"),
         (S((4, 4, 32, 128), bf16), kv, kv, S((4,), I32)), False),
    ]


@pytest.mark.parametrize("fn, args, grads", [pytest.param(*c[1:], id=c[0])
                                             for c in _large_cases()])
def test_vmem_fits_at_large_shapes(fn, args, grads):
    """Long sequences, wide heads, long PoNet segments: the blocks still fit (segment_max
    used to take 8 whole segments per block: 64 MiB at segments of 1024 x 512 lanes)."""
    kernels = lower_for_tpu(train(fn, _float_args(args)) if grads else fn, *args)
    assert kernels
    for kernel in kernels:
        assert kernel.vmem_bytes() <= VMEM_BUDGET, (kernel.name, kernel.vmem_bytes())


@pytest.mark.parametrize("width, budget, tiles", [
    (256, 3 * 8 * 128 * 4, (3, 128, 256)),      # 3 segments x 128 of the 256 channels a block
    (300, 2 * 8 * 128 * 4, (2, 128, 384)),      # channels padded to 384, 2 segments a block
])
@pytest.mark.parametrize("causal", [False, True])
def test_segment_max_with_few_segments_per_block_matches_reference(causal, width, budget, tiles):
    """TPU interpret mode with the block budget cut so that long segments' tilings run on a
    small input (fewer segments per block, narrower or padded channels); forward and gradient."""
    x = jax.random.normal(jax.random.key(0), (2, 37, width), F32)
    dy = jax.random.normal(jax.random.key(1), x.shape, F32)

    def run(backend):
        fn = lambda x: pool.segment_max(x, 5, causal=causal, backend=backend)
        y, vjp = jax.vjp(fn, x)
        return y, vjp(dy)[0]

    with mock.patch.object(pool, "_SEGMENT_BLOCK_BYTES", budget):
        assert pool._segment_tiles(5, width) == tiles
        y, dx = run("tpu_interpret")
    y_ref, dx_ref = run("reference")
    assert jnp.allclose(y, y_ref) and jnp.allclose(dx, dx_ref, atol=1e-6)


@pytest.mark.parametrize("dn, groups, n", [
    (256, 4, 16),                                                   # 2 groups per 128-lane block
    pytest.param(96, 3, 4, marks=pytest.mark.slow),                 # one block of all 3 groups
    pytest.param(512, 2, 8, marks=pytest.mark.slow),                # 2 blocks per group
])
def test_scan_grouped_blocks_match_reference_in_tpu_interpret_mode(dn, groups, n):
    """Grouped B/C as the Mosaic kernels now tile them (groups narrower than 128 lanes used to
    give blocks of per_group lanes, which do not lower): outputs and gradients."""
    ks = jax.random.split(jax.random.key(0), 6)
    bsz, length = 1, 11
    u = jax.random.normal(ks[0], (bsz, length, dn), F32)
    delta = jax.random.normal(ks[1], (bsz, length, dn), F32)
    a = -jnp.exp(jax.random.normal(ks[2], (dn, n), F32))
    b, c = (jax.random.normal(k, (bsz, length, groups, n), F32) for k in ks[3:5])
    w = jax.random.normal(ks[5], (bsz, length, dn), F32)

    def loss(scan):
        def f(u, delta, a, b, c):
            y, h = scan(u, delta, a, b, c)
            return jnp.sum(y * w) + jnp.sum(h), (y, h)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3, 4), has_aux=True))

    tpu = lambda *x: ss.selective_scan_tpu(*x, delta_softplus=True, chunk=8, interpret=True)
    ref = lambda *x: ss.selective_scan_reference(*x, delta_softplus=True, method="scan")
    (_, out), grads = loss(tpu)(u, delta, a, b, c)
    (_, out_ref), grads_ref = loss(ref)(u, delta, a, b, c)
    for x, x_ref in zip((*out, *grads), (*out_ref, *grads_ref), strict=True):
        assert jnp.allclose(x, x_ref, rtol=1e-4, atol=1e-4), float(jnp.max(jnp.abs(x - x_ref)))


def test_dimension_semantics_keep_carried_axes_sequential():
    """Axes that carry state in scratch across grid steps must be "arbitrary" (a megacore
    splits "parallel" axes over its two cores)."""
    q, kv = S((1, 256, 2, 128), jnp.bfloat16), S((1, 256, 2, 128), jnp.bfloat16)
    u, bc = S((1, 64, 128), jnp.float32), S((1, 64, 16), jnp.float32)
    x = S((1, 300, 128), jnp.float32)
    kernels = (
        lower_for_tpu(train(lambda q, k, v: attn.flash_attention(
            q, k, v, causal=True, backend="pallas"), (0, 1, 2)), q, kv, kv)
        + lower_for_tpu(train(lambda u, d, a, b, c: ss.selective_scan(
            u, d, a, b, c, backend="pallas"), (0, 1, 2, 3, 4)), u, u, S((128, 16), F32), bc, bc)
        + lower_for_tpu(train(lambda x: pool.prefix_mean(x, backend="pallas"), (0,)), x)
        + lower_for_tpu(train(lambda q, k, v, g: gla_mod.gla(q, k, v, g, backend="pallas"),
                              (0, 1, 2, 3)), *[S((1, 128, 2, 64), F32)] * 4)
        + lower_for_tpu(lambda q, k, v, n: attn.decode_attention(q, k, v, n, backend="pallas"),
                        S((1, 1, 2, 128), jnp.bfloat16), kv, kv, S((1,), I32)))
    last_arbitrary = {"flash_attention_fwd_tpu", "flash_attention_dq_tpu",
                      "flash_attention_dkv_tpu", "selective_scan_fwd_tpu",
                      "selective_scan_bwd_tpu", "prefix_mean_tpu", "prefix_mean_bwd_tpu",
                      "gla_fwd_tpu", "gla_bwd_dq_tpu", "gla_bwd_dkv_tpu", "flash_decode_tpu"}
    assert {k.name for k in kernels} == last_arbitrary
    for kernel in kernels:
        semantics = re.search(r"dimension_semantics = \[(.*?)\]", kernel.module_text()).group(1)
        kinds = re.findall(r"dimension_semantics<(\w+)>", semantics)
        assert kinds[-1] == "arbitrary" and set(kinds[:-1]) == {"parallel"}, (kernel.name, kinds)


def test_illegal_block_shape_fails_at_lowering():
    """The check can fail: a query block of 100 rows is no multiple of 8 sublanes."""
    q = S((1, 512, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower_for_tpu(lambda q, k, v: attn_tpu.flash_attention_tpu(q, k, v, block_q=100),
                      q, q, q)


def test_reference_fallback_fails_the_kernel_check():
    """A function that takes the jnp reference lowers too, with no Mosaic kernel: the check
    of the kernel names is what tells them apart."""
    q = S((1, 256, 2, 128), jnp.bfloat16)
    kernels = lower_for_tpu(
        lambda q, k, v: attn.flash_attention(q, k, v, causal=True, backend="reference"), q, q, q)
    assert kernels == []
    with pytest.raises(AssertionError, match="expected"):
        check_kernels(kernels, FLASH_FWD)


def test_vmem_estimate_counts_double_buffered_blocks():
    """The decode kernel: q, k, v and o blocks double-buffered, plus three scratch tiles."""
    d, rows, bk = 128, 8, 128               # rep * T = 4 rows of q, padded to 8
    (kernel,) = lower_for_tpu(
        lambda q, k, v, n: attn.decode_attention(q, k, v, n, backend="pallas"),
        S((1, 1, 4, d), F32), S((1, 256, 1, d), F32), S((1, 256, 1, d), F32), S((1,), I32))
    blocks = (rows * d + 2 * bk * d + rows * d) * 4
    scratch = (rows * 128 + rows * 128 + rows * d) * 4
    assert kernel.vmem_bytes() == 2 * blocks + scratch


def test_paths_without_a_mosaic_kernel_lower_to_plain_xla():
    """On a TPU these run jnp code (no Mosaic kernel exists for them): ProbSparse's measure,
    top-u and active rows, the selective scan's and GLA's decoding steps."""
    q = S((1, 64, 2, 32), F32)
    idx = S((64, 8), I32)
    top = S((1, 2, 8), I32)
    assert lower_for_tpu(lambda q, k, i: probsparse.sparsity_measure(q, k, i, backend="pallas"),
                         q, q, idx) == []
    assert lower_for_tpu(lambda m: probsparse.top_u(m, 8, backend="pallas"),
                         S((1, 2, 64), F32)) == []
    assert lower_for_tpu(lambda q, k, v, t: probsparse.active_rows_attention(
        q, k, v, t, backend="pallas"), q, q, q, top) == []
    dn, n = 256, 16
    assert lower_for_tpu(
        lambda h, u, d, a, b, c: ss.selective_state_update(h, u, d, a, b, c, backend="pallas"),
        S((2, dn, n), F32), S((2, dn), F32), S((2, dn), F32), S((dn, n), F32),
        S((2, n), F32), S((2, n), F32)) == []
    qk = S((2, 4, 64), F32)
    assert lower_for_tpu(gla_mod.gla_step, qk, qk, S((2, 4, 32), F32), qk,
                         S((2, 4, 64, 32), F32)) == []


# ---------------------------------------------------------------------------------------------
# The real TPU compiler, deviceless: libtpu compiles for a TPU topology without a TPU attached
# (XLA:TPU and Mosaic's own passes: layouts, VMEM allocation, code generation). A compiler
# error can abort the process, so a worker subprocess compiles, restarted past a crash.
# ---------------------------------------------------------------------------------------------

TOPOLOGY = "v5e:2x2"                               # device kind "TPU v5 lite"
OTHER_TOPOLOGIES = ("v6e:2x2", "v4:2x2x1", "v5p:2x2x1")


def libtpu_path() -> str | None:
    """libtpu.so: $TPU_LIBRARY_PATH, else an installed `libtpu` package (found, not imported)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return path
    spec = importlib.util.find_spec("libtpu")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, "libtpu.so")):
            return os.path.join(folder, "libtpu.so")
    return None


MODEL_CONFIGS = {   # config -> Mosaic kernels in its training step (layers x kernels a layer)
    "transformer": 12, "gla": 12, "mamba": 8, "ponet": 32, "hybrid_3to1": 12,
    "hybrid_mamba_3to1": 9}


def _model_step(config: str):
    """The training step (loss and gradient) of configs/<config>.yaml with every mixer's impl
    set to the Pallas kernels, and its inputs' shapes."""
    import yaml
    from flax import nnx

    from models import build_model
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "configs", f"{config}.yaml")) as f:
        raw = yaml.safe_load(f)
    for spec in raw["model"]["mixers"].values():
        spec["impl"] = "flash" if spec["type"] == "attention" else "pallas"
    with mock.patch.object(_common, "platform", lambda: "tpu"):
        graphdef, state = nnx.split(build_model(raw["model"], rngs=nnx.Rngs(0)))

    def loss(state, tokens_BL):
        logits = nnx.merge(graphdef, state)(tokens_BL[:, :-1])
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BL[:, 1:, None], -1)
        return -jnp.mean(picked)

    tokens = S((raw["train"]["batch_size"], raw["train"]["seq_len"] + 1), I32)
    return jax.value_and_grad(loss), (jax.tree.map(lambda x: S(x.shape, x.dtype), state), tokens)


def _compile_jobs(selection: str):
    """(name, make) to compile, make() -> (fn, args): "bf16" / "f32" the CASES of that dtype
    (forward and training step), "large" the VMEM cases, "models" the training step of each
    model config, "negative" two that must not compile."""
    if selection == "models":
        return [(f"{name}:train", functools.partial(_model_step, name)) for name in MODEL_CONFIGS]
    if selection == "large":
        return [(f"{name}:{'train' if grads else 'fwd'}",
                 lambda fn=fn, args=args, grads=grads: (
                     train(fn, _float_args(args)) if grads else fn, args))
                for name, fn, args, grads in _large_cases()]
    if selection == "negative":
        def unbounded(x):              # segment_max's old tiling: 8 segments x 512 lanes
            with mock.patch.object(pool, "_SEGMENT_BLOCK_BYTES", 1 << 40):
                return pool.segment_max(x, 1024, backend="pallas")
        return [("segment_max_1024_8_segments_per_block:fwd",
                 lambda: (unbounded, (S((2, 4096, 1024), F32),))),
                ("mask_to_3d:fwd", lambda: (_mask_to_3d, (S((128, 4, 64), F32),)))]
    jobs = []
    for case in CASES:
        if not case.id.endswith({"bf16": "-bfloat16", "f32": "-float32"}[selection]):
            continue
        fn, args, _, bwd = case.values
        jobs.append((f"{case.id}:fwd", lambda fn=fn, args=args: (fn, args)))
        if bwd is not None:
            jobs.append((f"{case.id}:train",
                         lambda fn=fn, args=args: (train(fn, _float_args(args)), args)))
    return jobs


def _mask_to_3d(x):
    """A [TL, H] mask broadcast over a [TL, H, Dh] tile: the construct of the old
    global_aggregate kernel, on which the Mosaic compiler aborts (a layout check)."""
    def kernel(x_ref, o_ref):
        ok = jax.lax.broadcasted_iota(jnp.int32, x_ref.shape[:2], 0) < 100
        o_ref[...] = jnp.where(ok[:, :, None], x_ref[...], 0.0)
    spec = pl.BlockSpec(x.shape, lambda i: (0, 0, 0))
    return pl.pallas_call(kernel, out_shape=S(x.shape, x.dtype), grid=(1,), in_specs=[spec],
                          out_specs=spec)(x)


def _compile_worker(topology: str, selection: str, start: int, out: str) -> None:
    """Compile jobs[start:] for `topology`, appending "START i", then "ok i n" (n Mosaic
    kernels in the module) or "FAIL i msg"."""
    import numpy as np
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology, "tpu").devices[:1]
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jobs = _compile_jobs(selection)
    for i, (name, make) in enumerate(jobs[start:], start):
        with open(out, "a") as f:
            f.write(f"START {i} {name}\n")
        try:
            fn, args = make()
            args = jax.tree.map(lambda a: S(a.shape, a.dtype, sharding=sharding), args)
            with jax.set_mesh(mesh), mock.patch.object(_common, "platform", lambda: "tpu"):
                lowered = jax.jit(fn).trace(*args).lower()
                lowered.compile()
            line = f"ok {i} {lowered.as_text().count('@tpu_custom_call')}"
        except Exception as e:  # noqa: BLE001 - reported to the test as text
            line = f"FAIL {i} {type(e).__name__}: {e}".replace("\n", " | ")
        with open(out, "a") as f:
            f.write(line[:4000] + "\n")
    with open(out, "a") as f:
        f.write("DONE\n")


def compile_for_tpu(topology: str, selection: str, folder) -> dict[str, str]:
    """Job name -> "ok <n Mosaic kernels>" or the compiler's error, from worker runs (restarted
    past crashes)."""
    out = os.path.join(folder, f"{topology}-{selection}.txt".replace(":", "_"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # ALLOW_MULTIPLE_LIBTPU_LOAD: this process may hold libtpu's lock file (jax tries to start
    # a TPU backend when TPU_LIBRARY_PATH is set) while the worker loads libtpu again.
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_LIBRARY_PATH=libtpu_path(),
               ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    names = [name for name, _ in _compile_jobs(selection)]
    results, start = {}, 0
    while start < len(names):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), topology, selection,
                               str(start), out], env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        lines = open(out).read().splitlines() if os.path.exists(out) else []
        for kind, *rest in (line.split(" ", 2) for line in lines):
            if kind in ("ok", "FAIL"):
                results[names[int(rest[0])]] = " ".join([kind] + rest[1:]) if kind == "ok" else (
                    rest[1])
        if lines and lines[-1] == "DONE":
            break
        started = [int(line.split()[1]) for line in lines if line.startswith("START ")]
        if not started or started[-1] < start:
            raise RuntimeError(f"compile worker failed to start:\n{proc.stderr[-3000:]}")
        crash = [ln for ln in proc.stderr.splitlines() if "Check failed" in ln or "error" in ln]
        results[names[started[-1]]] = f"crashed (rc {proc.returncode}): {crash[:3]}"
        start = started[-1] + 1
    return results


needs_libtpu = pytest.mark.skipif(libtpu_path() is None,
                                  reason="no libtpu.so: set TPU_LIBRARY_PATH (docs/tpu.md)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, session_shared):
    """compiled(topology, selection): compile_for_tpu's results, once per test session (shared
    by the pytest-xdist workers)."""
    folder = tmp_path_factory.mktemp("tpu_compile")
    return lambda topology, selection: session_shared(
        f"test_tpu_lowering:{topology}:{selection}",
        lambda: compile_for_tpu(topology, selection, folder))


def _job_params(selections, topologies, slow=False):
    return [pytest.param(t, sel, name, id=f"{t}-{name}",
                         marks=[pytest.mark.slow] if slow else [])
            for t in topologies for sel in selections for name, _ in _compile_jobs(sel)]


@needs_libtpu
@pytest.mark.parametrize(
    "topology, selection, job",
    _job_params(("bf16", "large"), (TOPOLOGY,))
    + _job_params(("f32",), (TOPOLOGY,), slow=True)
    + _job_params(("bf16", "f32", "large"), OTHER_TOPOLOGIES, slow=True))
def test_kernel_compiles_for_tpu(compiled, topology, selection, job):
    """XLA:TPU and the Mosaic compiler accept the kernels (layouts, VMEM, code generation)."""
    result = compiled(topology, selection)[job]
    assert result.startswith("ok "), result


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_model_training_step_compiles_for_tpu(compiled, config):
    """A whole model's training step (configs/<config>.yaml, every mixer on its Pallas kernels,
    batch and length of the config) compiles for a TPU, with all its Mosaic kernels."""
    result = compiled(TOPOLOGY, "models")[f"{config}:train"]
    assert result == f"ok {MODEL_CONFIGS[config]}", result


@needs_libtpu
def test_tpu_compile_rejects_a_kernel_over_its_vmem(compiled):
    """The check can fail: segment_max's old tiling (8 segments of 1024 rows x 512 lanes f32,
    double-buffered in and out: 64 MiB) is over v5e's 16 MiB scoped VMEM."""
    result = compiled(TOPOLOGY, "negative")["segment_max_1024_8_segments_per_block:fwd"]
    assert "RESOURCE_EXHAUSTED" in result and "vmem" in result, result


@needs_libtpu
def test_tpu_compile_survives_a_compiler_abort(compiled):
    """A kernel on which Mosaic aborts the process is reported, and the worker goes on."""
    result = compiled(TOPOLOGY, "negative")["mask_to_3d:fwd"]
    assert result.startswith("crashed") and "Check failed" in result, result


if __name__ == "__main__":
    _compile_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])

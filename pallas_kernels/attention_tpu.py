"""Flash attention as Mosaic TPU kernels (forward, dq, dk/dv, decode); the math is in attention.py.

Same algorithm as the GPU-style kernels in `attention.py` (FlashAttention-2 with a base-2 online
softmax and a saved log-sum-exp), laid out the TPU way: heads before length ([B, H, L, D]), one
grid step per (batch, head, query block, KV block) with the KV axis innermost and "arbitrary", the
running max / sum / output accumulated in VMEM scratch across it, and per-row statistics (lse,
delta) kept lane-broadcast as [..., 128]. Fully masked KV blocks (above the causal diagonal,
outside the window) are skipped twice: the block index map clamps into the visible range, so no
new DMA is issued, and `pl.when` skips the compute. GQA maps query head h to KV head h // rep in
the index maps (K/V are never repeated); the dk/dv kernel walks the rep query heads of its KV head
on its inner grid axis.

Checked on CPU only (no TPU was available): the numerics in TPU interpret mode
(`pltpu.InterpretParams`, tests/kernels/test_attention.py), the real Mosaic lowering and a
deviceless compile with libtpu for TPU v4/v5e/v5p/v6e (tests/kernels/test_tpu_lowering.py; what
that leaves unchecked: docs/tpu.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.attention import (
    LOG2E,
    MASK_VALUE,
    FlashConfig,
    _kv_block_range,
    _q_block_range,
)

LANES = 128


def _dot(a, b, contract=(1, 1)):
    """Tile matmul with f32 accumulation; contract=(1, 1) is a @ b.T, (0, 0) is a.T @ b."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(q0, k0, shape, q_seg, k_seg, cfg: FlashConfig):
    """Visibility of a [bq, bk] tile from 2-D iotas (TPU vectors are 2-D)."""
    q_pos = q0 + (cfg.lk - cfg.lq) + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = k_pos < cfg.lk
    if cfg.causal:
        mask &= k_pos <= q_pos
    if cfg.window is not None:
        mask &= k_pos > q_pos - cfg.window
    if q_seg is not None:
        mask &= q_seg == k_seg                             # [bq, 1] == [1, bk]
    return mask


def _visit(j, lo, mid_lo, mid_hi, hi, step):
    """Run step(masked) for block j: unmasked inside [mid_lo, mid_hi), masked at the edges."""
    inside = (j >= mid_lo) & (j < mid_hi)
    pl.when(inside)(lambda: step(False))
    pl.when((j >= lo) & (j < hi) & ~inside)(lambda: step(True))


def _clamp_block(j, lo, hi):
    """Block index to fetch at grid step j: outside [lo, hi) repeat a visible one (no new DMA)."""
    return jnp.maximum(jnp.maximum(jnp.minimum(j, hi - 1), jnp.minimum(lo, hi - 1)), 0)


def _lanes(x):
    return jnp.broadcast_to(x, (x.shape[0], LANES))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

def _softmax_step(s, v_ref, m_sc, l_sc, acc_sc):
    """One online-softmax step (base 2) of the [bq, bk] scores s (already scaled by log2 e) into
    the running max m, sum l (lane-broadcast) and output accumulator acc (VMEM scratch)."""
    m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new)
    l_sc[...] = _lanes(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True))
    m_sc[...] = _lanes(m_new)
    acc_sc[...] = acc_sc[...] * alpha + _dot(p.astype(v_ref.dtype), v_ref[...], (1, 0))


def _fwd_kernel(*refs, cfg: FlashConfig, bq: int, bk: int):
    if cfg.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        s = _dot(q_ref[...], k_ref[...]) * (cfg.sm_scale * LOG2E)      # [bq, bk]
        if masked:
            segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
            s = jnp.where(_mask(i * bq, j * bk, s.shape, *segs, cfg), s, -jnp.inf)
        _softmax_step(s, v_ref, m_sc, l_sc, acc_sc)

    _visit(j, *_kv_block_range(i * bq, bq, bk, cfg), step)

    @pl.when(j == nk - 1)
    def _finish():
        l, m = l_sc[...][:, :1], m_sc[...][:, :1]
        empty = l == 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = _lanes(jnp.where(empty, jnp.inf, m + jnp.log2(l)))


def _prepare(q, k, v, segment_ids, bq, bk):
    """[B, L, H, D] -> padded [B, H, L, D]; segment ids as [B, Lq, 1] and [B, 1, Lk]."""
    qt = _common.pad_axis(rearrange(q, "b l h d -> b h l d"), 2, bq)
    kt = _common.pad_axis(rearrange(k, "b l h d -> b h l d"), 2, bk)
    vt = _common.pad_axis(rearrange(v, "b l h d -> b h l d"), 2, bk)
    segs = ()
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        segs = (_common.pad_axis(seg, 1, bq, -1)[:, :, None],
                _common.pad_axis(seg, 1, bk, -1)[:, None, :])
    return qt, kt, vt, segs


def _interpret(cfg):
    return pltpu.InterpretParams() if cfg.interpret else False


def _params(n_parallel):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _query_major_specs(bq, bk, d, rep, cfg: FlashConfig):
    """BlockSpecs of a query-major grid (batch, query head, query block i, KV block j): the q tile,
    the K / V tile of KV head h // rep (j clamped to the blocks query block i visits, so skipped
    blocks cost no DMA) and the segment-id tiles of both sides."""
    def kv_map(b_, h, i, j):
        lo, _, _, hi = _kv_block_range(i * bq, bq, bk, cfg)
        return b_, h // rep, _clamp_block(j, lo, hi), 0

    def kseg_map(b_, h, i, j):
        lo, _, _, hi = _kv_block_range(i * bq, bq, bk, cfg)
        return b_, 0, _clamp_block(j, lo, hi)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0))
    seg_specs = [pl.BlockSpec((None, bq, 1), lambda b_, h, i, j: (b_, i, 0)),
                 pl.BlockSpec((None, 1, bk), kseg_map)]
    return q_spec, pl.BlockSpec((None, None, bk, d), kv_map), seg_specs


def _forward(q, k, v, segment_ids, cfg: FlashConfig):
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    qt, kt, vt, segs = _prepare(q, k, v, segment_ids, bq, bk)
    nq, nk = qt.shape[2] // bq, kt.shape[2] // bk

    q_spec, kv_spec, seg_specs = _query_major_specs(bq, bk, d, rep, cfg)
    in_specs = [q_spec, kv_spec, kv_spec] + (seg_specs if segs else [])
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk),
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=[q_spec,
                   pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j: (b_, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, qt.shape[2], LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(3),
        interpret=_interpret(cfg),
        name="flash_attention_fwd_tpu",
    )(qt, kt, vt, *segs)
    return rearrange(o[:, :, :lq], "b h l d -> b l h d"), lse


# --------------------------------------------------------------------------------------------
# Backward: dq (grid over query blocks, KV innermost) and dk/dv (KV blocks, query heads x blocks)
# --------------------------------------------------------------------------------------------

def _dq_kernel(*refs, cfg: FlashConfig, bq: int, bk: int):
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dq_ref, dq_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = _dot(q_ref[...], k) * (cfg.sm_scale * LOG2E)
        if masked:
            segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
            s = jnp.where(_mask(i * bq, j * bk, s.shape, *segs, cfg), s, -jnp.inf)
        p = jnp.exp2(s - lse_ref[...][:, :1])
        ds = p * (_dot(do_ref[...], v_ref[...]) - delta_ref[...][:, :1])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, (1, 0))

    _visit(j, *_kv_block_range(i * bq, bq, bk, cfg), step)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: FlashConfig, bq: int, bk: int, nq: int, lq_pad: int):
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dk_ref, dv_ref, dk_sc, dv_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    j, t, nt = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    i = t % nq                                             # query block of query head t // nq

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = _dot(q, k_ref[...]) * (cfg.sm_scale * LOG2E)               # [bq, bk]
        if masked:
            segs = (qseg_ref[...], kseg_ref[...]) if cfg.has_segments else (None, None)
            s = jnp.where(_mask(i * bq, j * bk, s.shape, *segs, cfg), s, -jnp.inf)
        p = jnp.exp2(s - lse_ref[...][:, :1])
        dv_sc[...] += _dot(p.astype(do.dtype), do, (0, 0))              # p.T @ dO
        ds = p * (_dot(do, v_ref[...]) - delta_ref[...][:, :1])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0))               # dS.T @ Q

    _visit(i, *_q_block_range(j * bk, bq, bk, lq_pad, cfg), step)

    @pl.when(t == nt - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, segment_ids, o, lse, do, cfg: FlashConfig):
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    # Forward padding of the rows was block_q; the backward pads to the largest query block.
    blk_q = max(cfg.block_q, cfg.block_q_dq, cfg.block_q_dkv)
    blk_k = max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv)
    qt, kt, vt, segs = _prepare(q, k, v, segment_ids, blk_q, blk_k)
    dot_ = _common.pad_axis(rearrange(do, "b l h d -> b h l d"), 2, blk_q)
    lq_pad, lk_pad = qt.shape[2], kt.shape[2]
    lse = _common.pad_axis(lse[:, :, :lq], 2, blk_q)
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = _lanes_last(_common.pad_axis(delta, 2, blk_q))

    # dq
    bq, bk = cfg.block_q_dq, cfg.block_k_dq

    q_spec, kv_spec, seg_specs = _query_major_specs(bq, bk, d, rep, cfg)
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j: (b_, h, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + (seg_specs if segs else [])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk),
        grid=(b, hq, lq_pad // bq, lk_pad // bk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(3),
        interpret=_interpret(cfg),
        name="flash_attention_dq_tpu",
    )(qt, kt, vt, dot_, lse, delta, *segs)

    # dk, dv: inner axis t walks (query head of the group, query block).
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    nq = lq_pad // bq

    def q_map(b_, g, j, t):
        lo, _, _, hi = _q_block_range(j * bk, bq, bk, lq_pad, cfg)
        return b_, g * rep + t // nq, _clamp_block(t % nq, lo, hi), 0

    def qseg_map(b_, g, j, t):
        lo, _, _, hi = _q_block_range(j * bk, bq, bk, lq_pad, cfg)
        return b_, _clamp_block(t % nq, lo, hi), 0

    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, g, j, t: (b_, g, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if segs:
        in_specs += [pl.BlockSpec((None, bq, 1), qseg_map),
                     pl.BlockSpec((None, 1, bk), lambda b_, g, j, t: (b_, 0, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, nq=nq, lq_pad=lq_pad),
        grid=(b, hkv, lk_pad // bk, rep * nq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(3),
        interpret=_interpret(cfg),
        name="flash_attention_dkv_tpu",
    )(qt, kt, vt, dot_, lse, delta, *segs)
    back = functools.partial(rearrange, pattern="b h l d -> b l h d")
    return back(dq[:, :, :lq]), back(dk[:, :, :lk]), back(dv[:, :, :lk])


def _lanes_last(x):
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


_flash_tpu = _common.lse_attention_vjp(_forward, _backward)


def flash_attention_tpu(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None,
                        interpret=False, block_q=128, block_k=128, block_q_dq=128,
                        block_k_dq=128, block_q_dkv=128, block_k_dkv=128):
    """Mosaic TPU flash attention on [B, L, H, D] inputs (arguments as `flash_attention`)."""
    lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)

    def fit(block, n):                                     # short sequences: one 8-row tile
        return min(block, _common.round_up(n, 8))
    cfg = FlashConfig(causal=bool(causal), window=window, sm_scale=sm_scale, lq=lq, lk=lk,
                      has_segments=segment_ids is not None, interpret=interpret,
                      block_q=fit(block_q, lq), block_k=fit(block_k, lk),
                      block_q_dq=fit(block_q_dq, lq), block_k_dq=fit(block_k_dq, lk),
                      block_q_dkv=fit(block_q_dkv, lq), block_k_dkv=fit(block_k_dkv, lk))
    return _flash_tpu(q, k, v, segment_ids, cfg)


# --------------------------------------------------------------------------------------------
# Decode: the GQA heads x T tokens of one KV head form the rows; lengths arrive by scalar prefetch
# --------------------------------------------------------------------------------------------

def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, sm_scale: float,
                   window, t: int, bk: int):
    b, j, nk = pl.program_id(0), pl.program_id(2), pl.num_programs(2)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    lo = 0 if window is None else jnp.maximum(length - t - window + 1, 0) // bk
    hi = (length + bk - 1) // bk

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s = _dot(q_ref[...], k_ref[...]) * (sm_scale * LOG2E)         # [M, bk]
        rows = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        q_pos = length - t + jnp.minimum(rows % t, t - 1)
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        s = jnp.where(mask, s, -jnp.inf)
        _softmax_step(s, v_ref, m_sc, l_sc, acc_sc)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...][:, :1]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def decode_attention_tpu(q, k_cache, v_cache, lengths, *, sm_scale=None, window=None,
                         interpret=False, block_k=128):
    """q [B, T, Hq, D] against caches [B, S, Hkv, D] with `lengths` [B] valid entries."""
    b, t, hq, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    rep = hq // hkv
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    bk = min(block_k, _common.round_up(s_max, 8))
    m_rows = _common.round_up(rep * t, 8)
    q_BGMD = rearrange(q, "b t (g r) d -> b g (r t) d", g=hkv)
    q_BGMD = jnp.pad(q_BGMD, ((0, 0), (0, 0), (0, m_rows - rep * t), (0, 0)))
    kt = _common.pad_axis(rearrange(k_cache, "b s g d -> b g s d"), 2, bk)
    vt = _common.pad_axis(rearrange(v_cache, "b s g d -> b g s d"), 2, bk)
    nk = kt.shape[2] // bk

    def kv_map(b_, g, j, len_ref):
        hi = (len_ref[b_] + bk - 1) // bk
        return b_, g, jnp.maximum(jnp.minimum(j, hi - 1), 0), 0

    o = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=sm_scale, window=window, t=t, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hkv, nk),
            in_specs=[pl.BlockSpec((None, None, m_rows, d), lambda b_, g, j, _: (b_, g, 0, 0)),
                      pl.BlockSpec((None, None, bk, d), kv_map),
                      pl.BlockSpec((None, None, bk, d), kv_map)],
            out_specs=pl.BlockSpec((None, None, m_rows, d), lambda b_, g, j, _: (b_, g, 0, 0)),
            scratch_shapes=[pltpu.VMEM((m_rows, LANES), jnp.float32),
                            pltpu.VMEM((m_rows, LANES), jnp.float32),
                            pltpu.VMEM((m_rows, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_BGMD.shape, q.dtype),
        compiler_params=_params(2),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_decode_tpu",
    )(lengths.astype(jnp.int32), q_BGMD, kt, vt)
    return rearrange(o[:, :, :rep * t], "b g (r t) d -> b t (g r) d", t=t)

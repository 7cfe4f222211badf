"""Pooling operations of PoNet (Tan et al. 2021, "PoNet: Pooling Network for Efficient Token
Mixing in Long Sequences"): references, Pallas kernels (forward and backward) and the dispatch.

All ops take x [B, L, D] (D = all channels; heads do not matter to pooling) and return [B, L, D]
in the dtype of x unless said otherwise. Max pools route the gradient to one argmax per output;
ties go to the earliest position (deterministic).

  segment_max(x, segment_size, causal)  tokens are split into consecutive segments of
        `segment_size`; bidirectional: every token gets the max over its segment; causal: the max
        over its segment up to and including itself (prefix-within-segment max).
  local_max(x, window, causal)  bidirectional: max over the centred window [t - w//2, t + w//2]
        (w odd), clipped at the ends; causal: max over [t - w + 1, t].
  prefix_mean(x)  running mean over positions <= t (the causal global aggregation).
  global_aggregate(q, k, v)  bidirectional global aggregation with heads: q/k/v [B, L, H, Dh],
        pooled query qbar = mean_t q_t; g = softmax_t(qbar . k_t / sqrt(Dh)) v; returns [B, H, Dh].
  ponet_fuse(g, s, o, l)  the PoNet fusion (g + s) * o + l with g broadcast over L when it has
        no length axis ([B, 1, D]); the result has the promoted dtype of the four inputs. One
        decoding step may pass all four as [B, D].
  ponet_pool_fuse(g, s, o, l, segment_size, window, causal)  added op: (g + segment_max(s)) * o
        + local_max(l), the two pools and the fusion in one kernel (the pooled s and l never
        touch memory); equal to composing the three ops above.

Kernels (GPU-style Pallas: Triton lowering on GPU, interpret mode on CPU). Each op is one pass
over memory forward and one backward, through jax.custom_vjp; arithmetic is in float32 and any
length works (rows past L and channels past D are masked inside the kernels):
  prefix_mean     forward: a program owns (batch, chunk of the length, channel block) and walks
                  its rows in tiles, an in-tile cumsum plus a float32 carry; backward: the same
                  walk from the end (dx_u = sum_{t >= u} dy_t / (t + 1)). With one chunk (the
                  default) the carry starts at 0; with more, a first pass of chunk sums gives
                  each chunk its carry (one more read, more parallel programs). The in-tile
                  cumsum is a product with a triangular matrix on the tensor cores for bf16
                  (the default, PoolBlocks(dot=True)), else a scan across the tile's threads.
  segment_max     bidirectional: a program owns (batch, group of segments, channel block); the
                  forward saves the argmax [B, ceil(L / S), D] int32 (small), the backward writes
                  the segment's gradient sum at it. Causal: a running max row by row; the
                  backward walks each segment backwards and recognises the argmax positions as the
                  strict increases of the saved output y (y_t > y_{t-1}), so no index is stored.
  local_max       forward: w shifted tile loads (cache hits after the first); backward recomputes
                  which window each x_j wins from 2w - 1 shifted loads of x (no saved indices).
  global_aggregate  pass 1: column sums of q (split over the length); pass 2: per chunk of the
                  length an online softmax over keys (as in flash decoding), partials combined
                  exactly in XLA ([B, chunks, H, Dh], small); backward: one pass over k and v
                  writing dk, dv and partial dqbar, then dq = dqbar / L broadcast.
  ponet_fuse      one elementwise pass; the backward writes ds and do (dg = ds when g has a length
                  axis, else per-tile partial sums) and returns dy as dl.
  ponet_pool_fuse the segment-max tiling (bidirectional) or row walk (causal) with the window max
                  and the fusion inside; the causal backward sweeps each segment forwards (running
                  max, do, dl, dg; the running max parked in the ds buffer) and then backwards (ds).
Block sizes are keyword arguments (`blocks=PoolBlocks(...)`); the defaults target an H200.
TPU variants (Mosaic; numerics checked in TPU interpret mode, the real lowering and a deviceless
TPU compile by tests/kernels/test_tpu_lowering.py, never run on a TPU: docs/tpu.md) follow the
GPU kernels: BlockSpec tiles in VMEM (segment blocks sized to stay within VMEM), cumsum as a
triangular matmul, prefix max and segmented sums by doubling steps of pltpu.roll, the global
aggregate on [L, H*Dh] tiles with per-head sums as 0/1 matmuls; ponet_pool_fuse runs the three
TPU kernels in turn.

Backends: see pallas_kernels._common ("pallas", "interpret", "tpu_interpret", "reference").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


def _neg_inf(dtype):
    return jnp.finfo(dtype).min


def _first_argmax_scan(x_BSLD):
    """Prefix argmax along axis 2 (earliest wins ties): returns int32 indices [B, S, L, D]."""
    idx = jnp.broadcast_to(jnp.arange(x_BSLD.shape[2])[None, None, :, None], x_BSLD.shape)

    def combine(a, b):
        (va, ia), (vb, ib) = a, b
        take_b = vb > va
        return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)

    _, arg = jax.lax.associative_scan(combine, (x_BSLD, idx), axis=2)
    return arg


def segment_max_reference(x, segment_size: int, *, causal: bool = False):
    length = x.shape[1]
    xp = _common.pad_axis(x, 1, segment_size, value=_neg_inf(x.dtype))
    x_BNSD = rearrange(xp, "b (n s) d -> b n s d", s=segment_size)
    if causal:
        arg = _first_argmax_scan(x_BNSD)
    else:
        arg = jnp.broadcast_to(jnp.argmax(x_BNSD, axis=2)[:, :, None], x_BNSD.shape)
    y = jnp.take_along_axis(x_BNSD, arg, axis=2)
    return rearrange(y, "b n s d -> b (n s) d")[:, :length]


def local_max_reference(x, window: int = 3, *, causal: bool = False):
    if causal:
        left, right = window - 1, 0
    else:
        if window % 2 != 1:
            raise ValueError(f"window must be odd for bidirectional local max, got {window}")
        left = right = window // 2
    length = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)), constant_values=_neg_inf(x.dtype))
    stacked = jnp.stack([xp[:, j:j + length] for j in range(left + right + 1)], axis=2)
    arg = jnp.argmax(stacked, axis=2)                    # earliest position wins ties
    return jnp.take_along_axis(stacked, arg[:, :, None], axis=2)[:, :, 0]


def prefix_mean_reference(x):
    counts = jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    return (jnp.cumsum(x.astype(jnp.float32), axis=1) / counts).astype(x.dtype)


def global_aggregate_reference(q, k, v):
    dh = q.shape[-1]
    qbar_BHD = jnp.mean(q.astype(jnp.float32), axis=1)
    s_BHL = jnp.einsum("bhd,blhd->bhl", qbar_BHD, k.astype(jnp.float32)) * dh ** -0.5
    p_BHL = jax.nn.softmax(s_BHL, axis=-1)
    return jnp.einsum("bhl,blhd->bhd", p_BHL, v.astype(jnp.float32)).astype(v.dtype)


def ponet_fuse_reference(g, s, o, l):
    return (g + s) * o + l


# ---------------------------------------------------------------------------------------------
# Kernel helpers (GPU-style). Each program gets its batch row's whole [L, ...] slab as a ref and
# loads power-of-two tiles of it by row and column index arrays; masks cover the ragged ends,
# including negative rows (shifted windows), which interpret mode handles like the GPU.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolBlocks:
    """Tile sizes (powers of two); None keeps the op's default.

    block_l: rows of a tile (segment_max: segments x positions per tile); block_d: channels of a
    tile; group: segments per program of the causal segment max, chunks of the length that
    prefix_mean runs in parallel (1: one pass, else one more read for the chunk sums);
    num_warps, num_stages: Triton; dot (prefix_mean, bf16 inputs, block_l >= 16): in-tile
    prefix sums as triangular-matrix products on the tensor cores instead of a scan.
    """

    block_l: int | None = None
    block_d: int | None = None
    group: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    dot: bool | None = None


@dataclasses.dataclass(frozen=True)
class _Cfg:
    interpret: bool
    block_l: int
    block_d: int
    group: int
    num_warps: int
    num_stages: int
    dot: bool = False


_DEFAULTS = {  # op -> (block_l, block_d, group, num_warps, num_stages, dot), for an H200
    "prefix_mean": (64, 64, 1, 4, 3, True),   # group: chunks run in parallel; dot: bf16 only
    "segment_max": (32, 128, 1, 4, 3, False),
    "segment_cummax": (1, 128, 8, 4, 3, False),   # group: segments per program
    "local_max": (32, 128, 1, 4, 3, False),
    "fuse": (32, 128, 1, 4, 3, False),
    "aggregate": (32, 512, 1, 4, 3, False),
    "pool_fuse": (32, 128, 1, 4, 3, False),           # ponet_pool_fuse: as segment_max
    "pool_fuse_causal": (1, 128, 8, 4, 3, False),     # as segment_cummax
}


def _cfg(op: str, blocks: PoolBlocks | None, interpret: bool) -> _Cfg:
    default = _DEFAULTS[op]
    blocks = blocks or PoolBlocks()
    given = dataclasses.astuple(blocks)[:len(default)]
    vals = [d if g is None else g for g, d in zip(given, default, strict=True)]
    for name, v in zip(("block_l", "block_d", "group"), vals[:3], strict=True):
        if v < 1 or v & (v - 1):
            raise ValueError(f"blocks.{name} must be a power of two, got {v}")
    return _Cfg(interpret, *vals[:5], dot=vals[5])


def _call(kernel, cfg: _Cfg, *, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=cfg.interpret, name=name)


def _slab(shape):
    """BlockSpec that hands each program the whole slab [L, ...] of its batch row (grid axis 0)."""
    n = len(shape)
    return pl.BlockSpec((None, *shape[1:]), lambda b, *_: (b,) + (0,) * (n - 1))


def _ar(n):
    return jnp.arange(n, dtype=jnp.int32)


def _in(i, size):
    return (i >= 0) & (i < size)


def _rc(ref, rows, cols, row_ok):
    """Index and mask of a tile: rows [...] x cols [C] of a 2D ref -> shape [..., C]."""
    col_shape = (1,) * rows.ndim + (cols.shape[0],)
    idx = (rows[..., None], cols.reshape(col_shape))
    mask = row_ok[..., None] & (cols < ref.shape[1]).reshape(col_shape)
    return ref.at[idx], mask


def _load(ref, rows, cols, row_ok, other):
    view, mask = _rc(ref, rows, cols, row_ok)
    return plgpu.load(view, mask=mask, other=other)


def _store(ref, rows, cols, row_ok, val):
    view, mask = _rc(ref, rows, cols, row_ok)
    plgpu.store(view, val.astype(ref.dtype), mask=mask)


def _load_f32(ref, rows, cols, row_ok, other):
    return _load(ref, rows, cols, row_ok, other).astype(jnp.float32)


def _rhd(ref, rows, heads, dims):
    """Index and mask of a [T, HB, DB] tile of a 3D ref [L, H, Dh]."""
    length, n_heads, head_dim = ref.shape
    idx = (rows[:, None, None], heads[None, :, None], dims[None, None, :])
    mask = (_in(rows, length)[:, None, None] & (heads < n_heads)[None, :, None]
            & (dims < head_dim)[None, None, :])
    return ref.at[idx], mask


def _hd(ref, c, heads, dims):
    """Index and mask of row `c` of a 3D ref [C, H, Dh] -> [HB, DB] (or of a 2D ref [H, Dh])."""
    n_heads, head_dim = ref.shape[-2:]
    idx = (heads[:, None], dims[None, :])
    if ref.ndim == 3:
        idx = (c,) + idx
    return ref.at[idx], (heads < n_heads)[:, None] & (dims < head_dim)[None, :]


def _dot_f32(a, b):
    """a @ b of two 2D 16-bit tiles on the tensor cores, summed in float32."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _row_loop(n: int, step, carry, unroll: int):
    """carry = step(s, carry) for s in range(n); `unroll` steps per loop iteration."""
    def body(i, carry):
        for u in range(unroll):
            carry = step(i * unroll + u, carry)
        return carry

    carry = lax.fori_loop(0, n // unroll, body, carry)
    for s in range(n - n % unroll, n):
        carry = step(s, carry)
    return carry


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------


def _prefix_mean_fwd_kernel(x_ref, carry_ref, y_ref, *, chunk, block_l, block_d, dot):
    # x_ref, y_ref: [L, D] of one batch row; the program owns rows [c*chunk, (c+1)*chunk) and
    # channels [j*block_d, ...); carry_ref [C, D] f32: the sum of x over the chunks before c.
    # dot (bf16 x): the in-tile cumsum is tril(ones) @ x on the tensor cores (exact products,
    # float32 sums) instead of a scan across the threads of the tile.
    length, width = x_ref.shape
    c = pl.program_id(1)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    tril = _ar(block_l)[None, :] <= _ar(block_l)[:, None]

    def tile(i, carry_D):
        rows = c * chunk + i * block_l + _ar(block_l)
        count = (rows + 1).astype(jnp.float32)[:, None]
        if dot:
            x = _load(x_ref, rows, cols, rows < length, 0.0)
            csum = _dot_f32(tril.astype(x.dtype), x) + carry_D[None, :]
            x = x.astype(jnp.float32)
        else:
            x = _load_f32(x_ref, rows, cols, rows < length, 0.0)
            csum = jnp.cumsum(x, axis=0) + carry_D[None, :]
        _store(y_ref, rows, cols, rows < length, csum / count)
        return carry_D + jnp.sum(x, axis=0)

    carry_D = plgpu.load(carry_ref.at[c, cols], mask=cols < width, other=0.0)
    lax.fori_loop(0, chunk // block_l, tile, carry_D)


def _segment_rows(c, segs, size, chunk, length):
    """Rows [G, SC] of chunk c of segments `segs` [G], and which of them exist."""
    pos = c * chunk + _ar(chunk)
    rows = segs[:, None] * size + pos[None, :]
    return pos, rows, (pos < size)[None, :] & (rows < length)


def _segment_max_fwd_kernel(x_ref, y_ref, arg_ref, *, size, group, chunk, block_d):
    # x_ref, y_ref: [L, D]; arg_ref: [n_segments, D] int32 (argmax position inside the segment).
    length = x_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    n_chunks = pl.cdiv(size, chunk)

    def reduce(c, carry):
        best_GD, arg_GD = carry
        _, rows, ok = _segment_rows(c, segs, size, chunk, length)
        x = _load_f32(x_ref, rows, cols, ok, -jnp.inf)                  # [G, SC, TD]
        m = jnp.max(x, axis=1)
        a = jnp.argmax(x, axis=1).astype(jnp.int32) + c * chunk          # earliest on ties
        take = m > best_GD
        return jnp.where(take, m, best_GD), jnp.where(take, a, arg_GD)

    init = (jnp.full((group, block_d), -jnp.inf, jnp.float32),
            jnp.zeros((group, block_d), jnp.int32))
    best_GD, arg_GD = (reduce(0, init) if n_chunks == 1
                       else lax.fori_loop(0, n_chunks, reduce, init))
    _store(arg_ref, segs, cols, segs < arg_ref.shape[0], arg_GD)

    @pl.loop(0, n_chunks)
    def _(c):
        _, rows, ok = _segment_rows(c, segs, size, chunk, length)
        y = jnp.broadcast_to(best_GD[:, None, :], rows.shape + cols.shape)
        _store(y_ref, rows, cols, ok, y)


def _segment_cummax_fwd_kernel(x_ref, y_ref, *, size, group, block_d, unroll):
    # Running max inside each segment, row by row: one [G, TD] row of G segments per step.
    length = x_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)

    def step(s, best_GD):
        rows = segs * size + s
        best_GD = jnp.maximum(best_GD, _load_f32(x_ref, rows, cols, rows < length, -jnp.inf))
        _store(y_ref, rows, cols, rows < length, best_GD)
        return best_GD

    _row_loop(min(size, length), step, jnp.full((group, block_d), -jnp.inf, jnp.float32), unroll)


def _window_max(x_ref, rows, cols, window, left):
    """Max of x over the window [t - left, t - left + window - 1] (clipped) of each row t."""
    best = None
    for m in range(window):
        r = rows + (m - left)
        x = _load_f32(x_ref, r, cols, _in(r, x_ref.shape[0]), -jnp.inf)
        best = x if best is None else jnp.maximum(best, x)
    return best


def _local_max_fwd_kernel(x_ref, y_ref, *, window, left, block_l, block_d):
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    _store(y_ref, rows, cols, rows < x_ref.shape[0], _window_max(x_ref, rows, cols, window, left))


def _load_g(g_ref, rows, cols, ok):
    """g tile: [T, TD], or its one row [1, TD] when g has no length axis."""
    if g_ref.shape[0] == 1:
        return _load_f32(g_ref, jnp.zeros((1,), jnp.int32), cols, jnp.ones((1,), bool), 0.0)
    return _load_f32(g_ref, rows, cols, ok, 0.0)


def _fuse_fwd_kernel(g_ref, s_ref, o_ref, l_ref, y_ref, *, block_l, block_d):
    length = s_ref.shape[0]
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    ok = rows < length
    g = _load_g(g_ref, rows, cols, ok)
    s, o, l = (_load_f32(r, rows, cols, ok, 0.0) for r in (s_ref, o_ref, l_ref))
    _store(y_ref, rows, cols, ok, (g + s) * o + l)


def _pool_fuse_fwd_kernel(g_ref, s_ref, o_ref, l_ref, y_ref, *, size, group, chunk, block_d,
                          window, left):
    # Bidirectional fused PoNet: tiles [G, SC, TD] of whole segments (SC >= S, one chunk).
    length = s_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    _, rows, ok = _segment_rows(0, segs, size, chunk, length)
    s_max = jnp.max(_load_f32(s_ref, rows, cols, ok, -jnp.inf), axis=1, keepdims=True)
    l_max = _window_max(l_ref, rows, cols, window, left)
    o = _load_f32(o_ref, rows, cols, ok, 0.0)
    _store(y_ref, rows, cols, ok, (_load_g(g_ref, rows, cols, ok) + s_max) * o + l_max)


def _pool_fuse_causal_fwd_kernel(g_ref, s_ref, o_ref, l_ref, y_ref, *, size, group, block_d,
                                 window, unroll):
    # Causal fused PoNet, row by row through G segments: running segment max of s, trailing
    # window max of l.
    length = s_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)

    def step(t, s_max):
        rows = segs * size + t
        ok = rows < length
        s_max = jnp.maximum(s_max, _load_f32(s_ref, rows, cols, ok, -jnp.inf))
        l_max = _window_max(l_ref, rows, cols, window, window - 1)
        o = _load_f32(o_ref, rows, cols, ok, 0.0)
        _store(y_ref, rows, cols, ok, (_load_g(g_ref, rows, cols, ok) + s_max) * o + l_max)
        return s_max

    _row_loop(min(size, length), step, jnp.full((group, block_d), -jnp.inf, jnp.float32),
              unroll)


def _col_sum_kernel(x_ref, out_ref, *, chunk, block_l, block_d, weighted=False):
    # out_ref [C, D] f32: sums of x (of x_t / (t + 1) when weighted) over the rows of chunk c.
    length = x_ref.shape[0]
    c = pl.program_id(1)
    cols = pl.program_id(2) * block_d + _ar(block_d)

    def tile(i, acc_D):
        rows = c * chunk + i * block_l + _ar(block_l)
        x = _load_f32(x_ref, rows, cols, rows < length, 0.0)
        if weighted:
            x = x / (rows + 1).astype(jnp.float32)[:, None]
        return acc_D + jnp.sum(x, axis=0)

    acc_D = lax.fori_loop(0, chunk // block_l, tile, jnp.zeros((block_d,), jnp.float32))
    plgpu.store(out_ref.at[c, cols], acc_D, mask=cols < out_ref.shape[1])


def _aggregate_fwd_kernel(qbar_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, scale, chunk,
                          block_l, block_h, block_dh):
    # One chunk of keys, heads [h*HB, ...): online softmax of qbar . k_t, sum of p_t v_t.
    length = k_ref.shape[0]
    c = pl.program_id(1)
    heads = pl.program_id(2) * block_h + _ar(block_h)
    dims = _ar(block_dh)
    qbar_view, hd_ok = _hd(qbar_ref, None, heads, dims)
    qbar_HD = plgpu.load(qbar_view, mask=hd_ok, other=0.0)

    def tile(i, carry):
        m_H, l_H, acc_HD = carry
        rows = c * chunk + i * block_l + _ar(block_l)
        k_view, mask = _rhd(k_ref, rows, heads, dims)
        k = plgpu.load(k_view, mask=mask, other=0.0).astype(jnp.float32)
        s_TH = jnp.sum(k * qbar_HD[None], axis=-1) * scale
        s_TH = jnp.where((rows < length)[:, None], s_TH, -jnp.inf)
        m_new = jnp.maximum(m_H, jnp.max(s_TH, axis=0))
        alpha = jnp.exp(m_H - m_new)
        p_TH = jnp.exp(s_TH - m_new[None, :])
        v_view, _ = _rhd(v_ref, rows, heads, dims)
        v = plgpu.load(v_view, mask=mask, other=0.0).astype(jnp.float32)
        acc_HD = acc_HD * alpha[:, None] + jnp.sum(p_TH[:, :, None] * v, axis=0)
        return m_new, l_H * alpha + jnp.sum(p_TH, axis=0), acc_HD

    init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((block_h, block_dh), jnp.float32))
    m_H, l_H, acc_HD = lax.fori_loop(0, chunk // block_l, tile, init)
    h_ok = heads < m_ref.shape[1]
    plgpu.store(m_ref.at[c, heads], m_H, mask=h_ok)
    plgpu.store(l_ref.at[c, heads], l_H, mask=h_ok)
    acc_view, _ = _hd(acc_ref, c, heads, dims)
    plgpu.store(acc_view, acc_HD, mask=hd_ok)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


def _prefix_mean_bwd_kernel(dy_ref, carry_ref, dx_ref, *, chunk, block_l, block_d, dot):
    # dx_u = sum_{t >= u} dy_t / (t + 1): the forward walk run from the chunk's end; carry_ref
    # [C, D] f32: that sum over the chunks after c. dot (bf16 dy): dx = M @ dy with
    # M[u, t] = [t >= u] / (t + 1), M split into bf16 hi + lo (two tensor-core products,
    # about 16 bits of M), since dy is exact in bf16.
    length, width = dy_ref.shape
    c = pl.program_id(1)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    n_tiles = chunk // block_l
    triu = _ar(block_l)[None, :] >= _ar(block_l)[:, None]

    def tile(i, carry_D):
        if dot:
            rows = c * chunk + (n_tiles - 1 - i) * block_l + _ar(block_l)
            dy = _load(dy_ref, rows, cols, rows < length, 0.0)
            inv = 1.0 / (rows + 1).astype(jnp.float32)
            m = jnp.where(triu, inv[None, :], 0.0)
            m_hi = m.astype(dy.dtype)
            m_lo = (m - m_hi.astype(jnp.float32)).astype(dy.dtype)
            dx = _dot_f32(m_hi, dy) + _dot_f32(m_lo, dy) + carry_D[None, :]
            w = dy.astype(jnp.float32) * inv[:, None]
        else:                                   # rows reversed: a forward cumsum
            rows = c * chunk + (n_tiles - 1 - i) * block_l + (block_l - 1 - _ar(block_l))
            w = (_load_f32(dy_ref, rows, cols, rows < length, 0.0)
                 / (rows + 1).astype(jnp.float32)[:, None])
            dx = jnp.cumsum(w, axis=0) + carry_D[None, :]
        _store(dx_ref, rows, cols, rows < length, dx)
        return carry_D + jnp.sum(w, axis=0)

    carry_D = plgpu.load(carry_ref.at[c, cols], mask=cols < width, other=0.0)
    lax.fori_loop(0, n_tiles, tile, carry_D)


def _segment_max_bwd_kernel(arg_ref, dy_ref, dx_ref, *, size, group, chunk, block_d):
    # dx = (sum of dy over the segment) at the saved argmax, 0 elsewhere.
    length = dy_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    n_chunks = pl.cdiv(size, chunk)
    arg_GD = _load(arg_ref, segs, cols, segs < arg_ref.shape[0], -1)

    def total(c, acc_GD):
        _, rows, ok = _segment_rows(c, segs, size, chunk, length)
        return acc_GD + jnp.sum(_load_f32(dy_ref, rows, cols, ok, 0.0), axis=1)

    init = jnp.zeros((group, block_d), jnp.float32)
    total_GD = total(0, init) if n_chunks == 1 else lax.fori_loop(0, n_chunks, total, init)

    @pl.loop(0, n_chunks)
    def _(c):
        pos, rows, ok = _segment_rows(c, segs, size, chunk, length)
        hit = pos[None, :, None] == arg_GD[:, None, :]
        _store(dx_ref, rows, cols, ok, jnp.where(hit, total_GD[:, None, :], 0.0))


def _segment_cummax_bwd_kernel(y_ref, dy_ref, dx_ref, *, size, group, block_d, unroll):
    # Walk each segment backwards summing dy; the argmax positions are where the running max y
    # strictly increases (earliest wins ties), and each takes the sum of its run.
    length = dy_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)

    _cummax_grad_walk(y_ref, dx_ref, segs, cols, size, length, unroll,
                      lambda rows, ok: _load_f32(dy_ref, rows, cols, ok, 0.0))


def _cummax_grad_walk(m_ref, out_ref, segs, cols, size, length, unroll, grad_at):
    """Walk each segment backwards summing grad_at(rows, ok); where the running max in m_ref
    strictly increases (earliest wins ties: the argmax rows) write the sum of the run and
    restart it, elsewhere write 0. out_ref may be m_ref (row t is written after row t-1 is
    read)."""
    steps = min(size, length)                             # rows past L are all masked

    def step(r, acc):
        t = steps - 1 - r
        rows = segs * size + t
        ok = rows < length
        m = _load_f32(m_ref, rows, cols, ok, -jnp.inf)
        m_prev = _load_f32(m_ref, rows - 1, cols, ok & (t > 0), -jnp.inf)
        new = (m > m_prev) | (t == 0)
        acc = acc + grad_at(rows, ok)
        _store(out_ref, rows, cols, ok, jnp.where(new, acc, 0.0))
        return jnp.where(new, 0.0, acc)

    _row_loop(steps, step, jnp.zeros((segs.shape[0], cols.shape[0]), jnp.float32), unroll)


def _window_max_grad(x_ref, dy_ref, rows, cols, window, left):
    """Gradient of the window max at rows j: x_j is the argmax of the window of t_k = j + left - k
    (j at offset k in it) iff it beats (>) the k values before it and ties or beats (>=) the
    window - 1 - k values after it; dx_j sums dy over those t_k."""
    length = x_ref.shape[0]
    xj = _load_f32(x_ref, rows, cols, rows < length, -jnp.inf)
    beats_before, beats_after = [True], [True]            # [r]: beats all of the r nearest
    for r in range(1, window):
        before = _load_f32(x_ref, rows - r, cols, _in(rows - r, length), -jnp.inf)
        after = _load_f32(x_ref, rows + r, cols, _in(rows + r, length), -jnp.inf)
        beats_before.append(beats_before[-1] & (xj > before))
        beats_after.append(beats_after[-1] & (xj >= after))
    dx = jnp.zeros_like(xj)
    for k in range(window):
        t = rows + (left - k)
        dy = _load_f32(dy_ref, t, cols, _in(t, length), 0.0)
        dx = dx + jnp.where(beats_before[k] & beats_after[window - 1 - k], dy, 0.0)
    return dx


def _local_max_bwd_kernel(x_ref, dy_ref, dx_ref, *, window, left, block_l, block_d):
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    dx = _window_max_grad(x_ref, dy_ref, rows, cols, window, left)
    _store(dx_ref, rows, cols, rows < x_ref.shape[0], dx)


def _fuse_bwd_kernel(g_ref, s_ref, o_ref, dy_ref, ds_ref, do_ref, *dg_ref, block_l, block_d):
    # ds = dy * o, do = dy * (g + s); with g [B, 1, D] also per-tile partial sums of ds (dg).
    length = s_ref.shape[0]
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    ok = rows < length
    g = _load_g(g_ref, rows, cols, ok)
    s, o, dy = (_load_f32(r, rows, cols, ok, 0.0) for r in (s_ref, o_ref, dy_ref))
    ds = dy * o
    _store(ds_ref, rows, cols, ok, ds)
    _store(do_ref, rows, cols, ok, dy * (g + s))
    if dg_ref:
        (dg_ref,) = dg_ref
        plgpu.store(dg_ref.at[pl.program_id(1), cols], jnp.sum(ds, axis=0),
                    mask=cols < dg_ref.shape[1])


def _pool_fuse_bwd_kernel(g_ref, s_ref, o_ref, l_ref, dy_ref, ds_ref, do_ref, dl_ref, dg_ref, *,
                          size, group, chunk, block_d, window, left):
    # With s' the segment max and dy the output cotangent: ds = (sum over the segment of
    # dy * o) at the argmax, do = dy * (g + s'), dl = window-max gradient of dy, dg = dy * o.
    length = s_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    pos, rows, ok = _segment_rows(0, segs, size, chunk, length)
    s = _load_f32(s_ref, rows, cols, ok, -jnp.inf)
    s_max = jnp.max(s, axis=1, keepdims=True)
    arg = jnp.argmax(s, axis=1).astype(jnp.int32)
    dy = _load_f32(dy_ref, rows, cols, ok, 0.0)
    dy_o = dy * _load_f32(o_ref, rows, cols, ok, 0.0)
    total = jnp.sum(dy_o, axis=1, keepdims=True)
    _store(ds_ref, rows, cols, ok, jnp.where(pos[None, :, None] == arg[:, None, :], total, 0.0))
    _store(do_ref, rows, cols, ok, dy * (_load_g(g_ref, rows, cols, ok) + s_max))
    _store(dl_ref, rows, cols, ok, _window_max_grad(l_ref, dy_ref, rows, cols, window, left))
    if g_ref.shape[0] == 1:             # g is one row: this program's partial sum of dg
        plgpu.store(dg_ref.at[pl.program_id(1), cols], jnp.sum(total[:, 0], axis=0),
                    mask=cols < dg_ref.shape[1])
    else:
        _store(dg_ref, rows, cols, ok, dy_o)


def _pool_fuse_causal_bwd_kernel(g_ref, s_ref, o_ref, l_ref, dy_ref, ds_ref, do_ref, dl_ref,
                                 dg_ref, *, size, group, block_d, window, unroll, barrier):
    # Sweep 1, forward through each segment: the running max s' gives do = dy * (g + s') and is
    # parked in ds; dl and dg need no order. Sweep 2, backward: the argmax positions are the
    # strict increases of the parked s', and each takes the sum of dy * o over its run (read
    # back from dg when g has a length axis, as in the causal mixer).
    length = s_ref.shape[0]
    segs = pl.program_id(1) * group + _ar(group)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    steps = min(size, length)
    g_row = g_ref.shape[0] == 1

    def forward(t, carry):
        s_max, dg_acc = carry
        rows = segs * size + t
        ok = rows < length
        s_max = jnp.maximum(s_max, _load_f32(s_ref, rows, cols, ok, -jnp.inf))
        dy = _load_f32(dy_ref, rows, cols, ok, 0.0)
        _store(do_ref, rows, cols, ok, dy * (_load_g(g_ref, rows, cols, ok) + s_max))
        _store(ds_ref, rows, cols, ok, s_max)
        _store(dl_ref, rows, cols, ok,
               _window_max_grad(l_ref, dy_ref, rows, cols, window, window - 1))
        dy_o = dy * _load_f32(o_ref, rows, cols, ok, 0.0)
        if g_row:
            dg_acc = dg_acc + dy_o
        else:
            _store(dg_ref, rows, cols, ok, dy_o)
        return s_max, dg_acc

    init = (jnp.full((group, block_d), -jnp.inf, jnp.float32),
            jnp.zeros((group, block_d), jnp.float32))
    _, dg_acc = _row_loop(steps, forward, init, unroll)
    if g_row:
        plgpu.store(dg_ref.at[pl.program_id(1), cols], jnp.sum(dg_acc, axis=0),
                    mask=cols < dg_ref.shape[1])
    if barrier:                         # sweep 2 reads what other threads may have written to ds
        plgpu.debug_barrier()

    def dy_o(rows, ok):
        if g_row:
            return _load_f32(dy_ref, rows, cols, ok, 0.0) * _load_f32(o_ref, rows, cols, ok, 0.0)
        return _load_f32(dg_ref, rows, cols, ok, 0.0)   # dy * o, written by sweep 1: one read

    _cummax_grad_walk(ds_ref, ds_ref, segs, cols, size, length, unroll, dy_o)


def _aggregate_bwd_kernel(qbar_ref, dg_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref,
                          dqbar_ref, *, scale, chunk, block_l, block_h, block_dh):
    # p_t = exp(s_t - lse), ds_t = p_t (dg . v_t - dg . g): dv_t = p_t dg, dk_t = ds_t qbar scale,
    # and this chunk's part of dqbar = sum_t ds_t k_t scale.
    length = k_ref.shape[0]
    c = pl.program_id(1)
    heads = pl.program_id(2) * block_h + _ar(block_h)
    dims = _ar(block_dh)
    h_ok = heads < lse_ref.shape[0]
    qbar_view, hd_ok = _hd(qbar_ref, None, heads, dims)
    qbar_HD = plgpu.load(qbar_view, mask=hd_ok, other=0.0)
    dg_view, _ = _hd(dg_ref, None, heads, dims)
    dg_HD = plgpu.load(dg_view, mask=hd_ok, other=0.0)
    lse_H = plgpu.load(lse_ref.at[heads], mask=h_ok, other=0.0)
    delta_H = plgpu.load(delta_ref.at[heads], mask=h_ok, other=0.0)

    def tile(i, dqbar_HD):
        rows = c * chunk + i * block_l + _ar(block_l)
        k_view, mask = _rhd(k_ref, rows, heads, dims)
        v_view, _ = _rhd(v_ref, rows, heads, dims)
        k = plgpu.load(k_view, mask=mask, other=0.0).astype(jnp.float32)
        v = plgpu.load(v_view, mask=mask, other=0.0).astype(jnp.float32)
        s_TH = jnp.sum(k * qbar_HD[None], axis=-1) * scale
        p_TH = jnp.where((rows < length)[:, None], jnp.exp(s_TH - lse_H[None, :]), 0.0)
        ds_TH = p_TH * (jnp.sum(v * dg_HD[None], axis=-1) - delta_H[None, :])
        dv_view, _ = _rhd(dv_ref, rows, heads, dims)
        plgpu.store(dv_view, (p_TH[:, :, None] * dg_HD[None]).astype(dv_ref.dtype), mask=mask)
        dk_view, _ = _rhd(dk_ref, rows, heads, dims)
        plgpu.store(dk_view, (ds_TH[:, :, None] * qbar_HD[None] * scale).astype(dk_ref.dtype),
                    mask=mask)
        return dqbar_HD + jnp.sum(ds_TH[:, :, None] * k, axis=0) * scale

    dqbar_HD = lax.fori_loop(0, chunk // block_l, tile,
                             jnp.zeros((block_h, block_dh), jnp.float32))
    dq_view, _ = _hd(dqbar_ref, c, heads, dims)
    plgpu.store(dq_view, dqbar_HD, mask=hd_ok)

# ---------------------------------------------------------------------------------------------
# pallas_call wrappers and custom_vjp
# ---------------------------------------------------------------------------------------------


def _like(x, dtype=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


def _col_sums(x, chunk, cfg: _Cfg, weighted=False):
    """[B, C, D] float32 sums of x (or of x_t / (t + 1)) over chunks of `chunk` rows."""
    b, length, width = x.shape
    n_chunks = pl.cdiv(length, chunk)
    shape = (b, n_chunks, width)
    kernel = functools.partial(_col_sum_kernel, chunk=chunk, block_l=cfg.block_l,
                               block_d=cfg.block_d, weighted=weighted)
    return _call(kernel, cfg, grid=(b, n_chunks, pl.cdiv(width, cfg.block_d)),
                 in_specs=[_slab(x.shape)], out_specs=_slab(shape),
                 out_shape=jax.ShapeDtypeStruct(shape, jnp.float32), name="column_sums")(x)


def _prefix_mean_call(x, cfg: _Cfg, backward: bool):
    # cfg.group chunks of the length run in parallel; their carries come from a first pass of
    # chunk sums (one more read of x). cfg.dot: in-tile sums on the tensor cores (bf16 only).
    b, length, width = x.shape
    n_chunks = min(cfg.group, pl.cdiv(length, cfg.block_l))
    chunk = _common.round_up(pl.cdiv(length, n_chunks), cfg.block_l)
    n_chunks = pl.cdiv(length, chunk)
    if n_chunks == 1:
        carry = jnp.zeros((b, 1, width), jnp.float32)
    else:
        sums = _col_sums(x, chunk, cfg, weighted=backward)
        sums = jnp.flip(sums, 1) if backward else sums
        # Exclusive prefix over chunks (the sums before c, or after c backward), exact in the
        # sense that chunk c's carry never touches the sums of c and later.
        carry = jnp.cumsum(jnp.pad(sums[:, :-1], ((0, 0), (1, 0), (0, 0))), axis=1)
        carry = jnp.flip(carry, 1) if backward else carry
    kernel = _prefix_mean_bwd_kernel if backward else _prefix_mean_fwd_kernel
    kernel = functools.partial(kernel, chunk=chunk, block_l=cfg.block_l, block_d=cfg.block_d,
                               dot=cfg.dot and x.dtype == jnp.bfloat16 and cfg.block_l >= 16)
    return _call(kernel, cfg, grid=(b, n_chunks, pl.cdiv(width, cfg.block_d)),
                 in_specs=[_slab(x.shape), _slab(carry.shape)], out_specs=_slab(x.shape),
                 out_shape=_like(x), name="prefix_mean_bwd" if backward else "prefix_mean_fwd")(
                     x, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _prefix_mean_op(x, cfg):
    return _prefix_mean_call(x, cfg, backward=False)


def _prefix_mean_op_fwd(x, cfg):
    return _prefix_mean_call(x, cfg, backward=False), None


def _prefix_mean_op_bwd(cfg, _, dy):
    return (_prefix_mean_call(dy, cfg, backward=True),)


_prefix_mean_op.defvjp(_prefix_mean_op_fwd, _prefix_mean_op_bwd)


def _segment_grid(x, size, cfg: _Cfg, causal: bool):
    """(group, chunk, grid): programs own `group` segments; bidirectional tiles [G, chunk, TD]."""
    b, length, width = x.shape
    n_seg = pl.cdiv(length, size)
    if causal:
        group, chunk = min(cfg.group, pl.next_power_of_2(n_seg)), 1
    else:
        chunk = min(pl.next_power_of_2(size), cfg.block_l)
        group = min(max(1, cfg.block_l // chunk), pl.next_power_of_2(n_seg))
    return group, chunk, (b, pl.cdiv(n_seg, group), pl.cdiv(width, cfg.block_d))


def _segment_max_fwd_call(x, size, causal, cfg: _Cfg):
    group, chunk, grid = _segment_grid(x, size, cfg, causal)
    if causal:
        kernel = functools.partial(_segment_cummax_fwd_kernel, size=size, group=group,
                                   block_d=cfg.block_d, unroll=1 if cfg.interpret else 4)
        y = _call(kernel, cfg, grid=grid, in_specs=[_slab(x.shape)], out_specs=_slab(x.shape),
                  out_shape=_like(x), name="segment_cummax_fwd")(x)
        return y, y
    arg_shape = (x.shape[0], pl.cdiv(x.shape[1], size), x.shape[2])
    kernel = functools.partial(_segment_max_fwd_kernel, size=size, group=group, chunk=chunk,
                               block_d=cfg.block_d)
    return _call(kernel, cfg, grid=grid, in_specs=[_slab(x.shape)],
                 out_specs=[_slab(x.shape), _slab(arg_shape)],
                 out_shape=[_like(x), jax.ShapeDtypeStruct(arg_shape, jnp.int32)],
                 name="segment_max_fwd")(x)


def _segment_max_bwd_call(res, dy, size, causal, cfg: _Cfg):
    group, chunk, grid = _segment_grid(dy, size, cfg, causal)
    if causal:
        kernel = functools.partial(_segment_cummax_bwd_kernel, size=size, group=group,
                                   block_d=cfg.block_d, unroll=1 if cfg.interpret else 4)
        name = "segment_cummax_bwd"
    else:
        kernel = functools.partial(_segment_max_bwd_kernel, size=size, group=group, chunk=chunk,
                                   block_d=cfg.block_d)
        name = "segment_max_bwd"
    return _call(kernel, cfg, grid=grid, in_specs=[_slab(res.shape), _slab(dy.shape)],
                 out_specs=_slab(dy.shape), out_shape=_like(dy), name=name)(res, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _segment_max_op(x, size, causal, cfg):
    return _segment_max_fwd_call(x, size, causal, cfg)[0]


def _segment_max_op_fwd(x, size, causal, cfg):
    return _segment_max_fwd_call(x, size, causal, cfg)


def _segment_max_op_bwd(size, causal, cfg, res, dy):
    return (_segment_max_bwd_call(res, dy, size, causal, cfg),)


_segment_max_op.defvjp(_segment_max_op_fwd, _segment_max_op_bwd)


def _local_max_call(x, dy, window, causal, cfg: _Cfg):
    b, length, width = x.shape
    left = window - 1 if causal else window // 2
    kernel = _local_max_fwd_kernel if dy is None else _local_max_bwd_kernel
    kernel = functools.partial(kernel, window=window, left=left, block_l=cfg.block_l,
                               block_d=cfg.block_d)
    args = (x,) if dy is None else (x, dy)
    return _call(kernel, cfg, grid=(b, pl.cdiv(length, cfg.block_l), pl.cdiv(width, cfg.block_d)),
                 in_specs=[_slab(a.shape) for a in args], out_specs=_slab(x.shape),
                 out_shape=_like(x), name="local_max_fwd" if dy is None else "local_max_bwd")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _local_max_op(x, window, causal, cfg):
    return _local_max_call(x, None, window, causal, cfg)


def _local_max_op_fwd(x, window, causal, cfg):
    return _local_max_call(x, None, window, causal, cfg), x


def _local_max_op_bwd(window, causal, cfg, x, dy):
    return (_local_max_call(x, dy, window, causal, cfg),)


_local_max_op.defvjp(_local_max_op_fwd, _local_max_op_bwd)


def _fuse_grid(s, cfg: _Cfg):
    b, length, width = s.shape
    return (b, pl.cdiv(length, cfg.block_l), pl.cdiv(width, cfg.block_d))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fuse_op(g, s, o, l, cfg):
    kernel = functools.partial(_fuse_fwd_kernel, block_l=cfg.block_l, block_d=cfg.block_d)
    dtype = jnp.result_type(g, s, o, l)
    return _call(kernel, cfg, grid=_fuse_grid(s, cfg),
                 in_specs=[_slab(a.shape) for a in (g, s, o, l)], out_specs=_slab(s.shape),
                 out_shape=_like(s, dtype), name="ponet_fuse_fwd")(g, s, o, l)


def _fuse_op_fwd(g, s, o, l, cfg):
    return _fuse_op(g, s, o, l, cfg), (g, s, o, l)


def _fuse_op_bwd(cfg, res, dy):
    g, s, o, l = res
    grid = _fuse_grid(s, cfg)
    g_row = g.shape[1] != s.shape[1]
    out_shape = [_like(s), _like(o)]
    out_specs = [_slab(s.shape), _slab(o.shape)]
    if g_row:
        dg_shape = (s.shape[0], grid[1], s.shape[2])
        out_shape.append(jax.ShapeDtypeStruct(dg_shape, jnp.float32))
        out_specs.append(_slab(dg_shape))
    kernel = functools.partial(_fuse_bwd_kernel, block_l=cfg.block_l, block_d=cfg.block_d)
    ds, do, *dg = _call(kernel, cfg, grid=grid,
                        in_specs=[_slab(a.shape) for a in (g, s, o, dy)], out_specs=out_specs,
                        out_shape=out_shape, name="ponet_fuse_bwd")(g, s, o, dy)
    dg = jnp.sum(dg[0], axis=1, keepdims=True) if g_row else ds
    return dg.astype(g.dtype), ds, do, dy.astype(l.dtype)


_fuse_op.defvjp(_fuse_op_fwd, _fuse_op_bwd)


def _pool_fuse_call(g, s, o, l, dy, size, window, causal, cfg: _Cfg):
    """Forward (dy None): y; backward: (ds, do, dl, dg)."""
    group, chunk, grid = _segment_grid(s, size, cfg, causal)
    g_row = g.shape[1] != s.shape[1]
    common = dict(size=size, group=group, block_d=cfg.block_d, window=window)
    if causal:
        common["unroll"] = 1 if cfg.interpret else 4
        kernel = _pool_fuse_causal_fwd_kernel
        if dy is not None:
            kernel = functools.partial(_pool_fuse_causal_bwd_kernel, barrier=not cfg.interpret)
    else:
        common.update(chunk=chunk, left=window // 2)
        kernel = _pool_fuse_fwd_kernel if dy is None else _pool_fuse_bwd_kernel
    args = (g, s, o, l) if dy is None else (g, s, o, l, dy)
    if dy is None:
        out_shape = _like(s, jnp.result_type(g, s, o, l))
        out_specs = _slab(s.shape)
    else:
        dg_shape = (s.shape[0], grid[1], s.shape[2]) if g_row else s.shape
        out_shape = [_like(s), _like(o), _like(l),
                     jax.ShapeDtypeStruct(dg_shape, jnp.float32 if g_row else g.dtype)]
        out_specs = [_slab(s.shape)] * 3 + [_slab(dg_shape)]
    out = _call(functools.partial(kernel, **common), cfg, grid=grid,
                in_specs=[_slab(a.shape) for a in args], out_specs=out_specs,
                out_shape=out_shape, name="pool_fuse_bwd" if dy is not None else "pool_fuse_fwd")(
                    *args)
    if dy is None:
        return out
    ds, do, dl, dg = out
    dg = jnp.sum(dg, axis=1, keepdims=True) if g_row else dg
    return ds, do, dl, dg.astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pool_fuse_op(g, s, o, l, size, window, causal, cfg):
    return _pool_fuse_call(g, s, o, l, None, size, window, causal, cfg)


def _pool_fuse_op_fwd(g, s, o, l, size, window, causal, cfg):
    return _pool_fuse_op(g, s, o, l, size, window, causal, cfg), (g, s, o, l)


def _pool_fuse_op_bwd(size, window, causal, cfg, res, dy):
    g, s, o, l = res
    ds, do, dl, dg = _pool_fuse_call(g, s, o, l, dy, size, window, causal, cfg)
    return dg, ds, do, dl


_pool_fuse_op.defvjp(_pool_fuse_op_fwd, _pool_fuse_op_bwd)


def _aggregate_tiles(shape, cfg: _Cfg):
    """(block_h, block_dh, chunk, n_chunks): heads per program and keys per chunk."""
    b, length, h, dh = shape
    block_dh = pl.next_power_of_2(dh)
    block_h = min(pl.next_power_of_2(h), max(1, cfg.block_d // block_dh))
    n_target = max(1, pl.cdiv(4 * 132, b * pl.cdiv(h, block_h)))  # ~4 programs per H200 SM
    chunk = _common.round_up(max(pl.cdiv(length, n_target), cfg.block_l), cfg.block_l)
    return block_h, block_dh, chunk, pl.cdiv(length, chunk)


def _aggregate_fwd_call(q, k, v, cfg: _Cfg):
    b, length, h, dh = q.shape
    block_h, block_dh, chunk, n_chunks = _aggregate_tiles(q.shape, cfg)
    q_sums = _col_sums(rearrange(q, "b l h d -> b l (h d)"), chunk, cfg)
    qbar = rearrange(jnp.sum(q_sums, axis=1) / length, "b (h d) -> b h d", h=h)

    part_shapes = [(b, n_chunks, h), (b, n_chunks, h), (b, n_chunks, h, dh)]
    kernel = functools.partial(_aggregate_fwd_kernel, scale=dh ** -0.5, chunk=chunk,
                               block_l=cfg.block_l, block_h=block_h, block_dh=block_dh)
    m, l, acc = _call(kernel, cfg, grid=(b, n_chunks, pl.cdiv(h, block_h)),
                      in_specs=[_slab(qbar.shape), _slab(k.shape), _slab(v.shape)],
                      out_specs=[_slab(s) for s in part_shapes],
                      out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in part_shapes],
                      name="aggregate_fwd")(qbar, k, v)
    m_max = jnp.max(m, axis=1)
    w = jnp.exp(m - m_max[:, None])
    l_sum = jnp.sum(w * l, axis=1)
    g32 = jnp.sum(w[..., None] * acc, axis=1) / l_sum[..., None]
    return g32, qbar, m_max + jnp.log(l_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _aggregate_op(q, k, v, cfg):
    return _aggregate_fwd_call(q, k, v, cfg)[0].astype(v.dtype)


def _aggregate_op_fwd(q, k, v, cfg):
    g32, qbar, lse = _aggregate_fwd_call(q, k, v, cfg)
    return g32.astype(v.dtype), (jnp.zeros((0,), q.dtype), k, v, qbar, lse, g32)


def _aggregate_op_bwd(cfg, res, dg):
    q_dtype, k, v, qbar, lse, g32 = res
    b, length, h, dh = k.shape
    block_h, block_dh, chunk, n_chunks = _aggregate_tiles(k.shape, cfg)
    dg32 = dg.astype(jnp.float32)
    delta = jnp.sum(dg32 * g32, axis=-1)                 # sum_t p_t (dg . v_t) = dg . g
    dq_shape = (b, n_chunks, h, dh)
    kernel = functools.partial(_aggregate_bwd_kernel, scale=dh ** -0.5, chunk=chunk,
                               block_l=cfg.block_l, block_h=block_h, block_dh=block_dh)
    args = (qbar, dg32, lse, delta, k, v)
    dk, dv, dqbar = _call(kernel, cfg, grid=(b, n_chunks, pl.cdiv(h, block_h)),
                          in_specs=[_slab(a.shape) for a in args],
                          out_specs=[_slab(k.shape), _slab(v.shape), _slab(dq_shape)],
                          out_shape=[_like(k), _like(v),
                                     jax.ShapeDtypeStruct(dq_shape, jnp.float32)],
                          name="aggregate_bwd")(*args)
    dqbar = jnp.sum(dqbar, axis=1) / length
    dq = jnp.broadcast_to(dqbar[:, None], k.shape).astype(q_dtype.dtype)
    return dq, dk, dv


_aggregate_op.defvjp(_aggregate_op_fwd, _aggregate_op_bwd)

# ---------------------------------------------------------------------------------------------
# TPU variants (Mosaic). Blocks come through BlockSpecs into VMEM; rows past L in an edge block
# are masked with iota, segments and windows use padded copies (made only when L needs them).
# In-tile scans: cumsum as a triangular matmul, prefix max and the segmented sums as
# Hillis-Steele steps of pltpu.roll along the sublanes.
# ---------------------------------------------------------------------------------------------


def _tpu_call(kernel, interpret, *, grid, in_specs, out_specs, out_shape, semantics, name,
              scratch_shapes=()):
    # `name` becomes the custom call's kernel_name (profiles, tests/kernels/test_tpu_lowering.py)
    return pl.pallas_call(
        kernel, out_shape=out_shape, name=name,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=scratch_shapes),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if interpret else False)


def _tpu_block_d(width):
    """Channel tile: a multiple of 128 lanes dividing D, else all of D."""
    for td in (512, 256, 128):
        if width % td == 0:
            return td
    return width


def _tpu_block_l(length, block_l=256):
    return min(block_l, _common.round_up(length, 8))


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _prefix_mean_tpu_kernel(x_ref, y_ref, carry_ref, *, length, reverse):
    # Forward: y = (tril @ x + carry) / (t + 1). Backward (reverse): tiles from the end,
    # dx = triu @ (dy / (t + 1)) + carry.
    i, n = pl.program_id(2), pl.num_programs(2)
    tl = x_ref.shape[0]

    @pl.when(i == 0)
    def _():
        carry_ref[...] = jnp.zeros_like(carry_ref)

    tile = n - 1 - i if reverse else i
    pos = tile * tl + _iota(x_ref.shape, 0)
    x = jnp.where(pos < length, x_ref[...].astype(jnp.float32), 0.0)
    if reverse:
        x = x / (pos + 1).astype(jnp.float32)
    r, c = _iota((tl, tl), 0), _iota((tl, tl), 1)
    tri = ((c >= r) if reverse else (c <= r)).astype(jnp.float32)
    out = jnp.dot(tri, x, precision=lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32) + carry_ref[...]
    if not reverse:
        out = out / (pos + 1).astype(jnp.float32)
    y_ref[...] = out.astype(y_ref.dtype)
    carry_ref[...] += jnp.sum(x, axis=0, keepdims=True)


def _prefix_mean_tpu_call(x, interpret, reverse):
    b, length, width = x.shape
    td, tl = _tpu_block_d(width), _tpu_block_l(length)
    n = pl.cdiv(length, tl)
    index = ((lambda b_, j, i: (b_, n - 1 - i, j)) if reverse else (lambda b_, j, i: (b_, i, j)))
    spec = pl.BlockSpec((None, tl, td), index)
    kernel = functools.partial(_prefix_mean_tpu_kernel, length=length, reverse=reverse)
    return _tpu_call(kernel, interpret, grid=(b, width // td, n), in_specs=[spec],
                     out_specs=spec, out_shape=_like(x),
                     semantics=("parallel", "parallel", "arbitrary"),
                     name="prefix_mean_bwd_tpu" if reverse else "prefix_mean_tpu",
                     scratch_shapes=[pltpu.VMEM((1, td), jnp.float32)])(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _prefix_mean_tpu(x, interpret):
    return _prefix_mean_tpu_call(x, interpret, reverse=False)


_prefix_mean_tpu.defvjp(lambda x, interpret: (_prefix_mean_tpu_call(x, interpret, False), None),
                        lambda interpret, _, dy: (_prefix_mean_tpu_call(dy, interpret, True),))


def _scan_steps(n):
    k = 1
    while k < n:
        yield k
        k *= 2


def _segment_max_tpu_kernel(x_ref, *out_refs, causal):
    # x_ref [G, S, TD]: G whole segments. Bidirectional: max and its first argmax over S;
    # causal: prefix max over S by doubling steps.
    x = x_ref[...].astype(jnp.float32)
    size = x.shape[1]
    pos = _iota(x.shape, 1)
    if causal:
        (y_ref,) = out_refs
        for k in _scan_steps(size):
            x = jnp.where(pos >= k, jnp.maximum(x, pltpu.roll(x, k, 1)), x)
        y_ref[...] = x.astype(y_ref.dtype)
        return
    y_ref, arg_ref = out_refs
    m = jnp.max(x, axis=1, keepdims=True)
    arg_ref[...] = jnp.min(jnp.where(x == m, pos, size), axis=1, keepdims=True)     # [G, 1, TD]
    y_ref[...] = jnp.broadcast_to(m, x.shape).astype(y_ref.dtype)


def _segment_max_bwd_tpu_kernel(res_ref, dy_ref, dx_ref, *, causal):
    dy = dy_ref[...].astype(jnp.float32)
    size = dy.shape[1]
    pos = _iota(dy.shape, 1)
    if not causal:                      # res_ref: argmax [G, 1, TD]
        total = jnp.sum(dy, axis=1, keepdims=True)
        dx_ref[...] = jnp.where(pos == res_ref[...], total, 0.0).astype(dx_ref.dtype)
        return
    # res_ref: y [G, S, TD]. Records (argmax positions): strict increases of y. Each takes the
    # sum of dy up to the next record: acc_t = dy_t + [t+1 is no record] acc_{t+1}, solved as a
    # linear recurrence (acc_t = b_t + a_t acc_{t+1}) by doubling steps.
    y = res_ref[...].astype(jnp.float32)
    new = (pos == 0) | (y > pltpu.roll(y, 1, 1))
    a = jnp.where(pos + 1 < size, 1.0 - pltpu.roll(new.astype(jnp.float32), size - 1, 1), 0.0)
    acc = dy
    for k in _scan_steps(size):
        ahead = pos + k < size
        acc = jnp.where(ahead, acc + a * pltpu.roll(acc, size - k, 1), acc)
        a = jnp.where(ahead, a * pltpu.roll(a, size - k, 1), 0.0)
    dx_ref[...] = jnp.where(new, acc, 0.0).astype(dx_ref.dtype)


def _segment_layout(x, size, group, value, wp):
    """x [B, L, D] -> [B, n_seg (multiple of group), S, wp], padding the tail and the channels
    past D with `value`."""
    b, length, width = x.shape
    n_seg = _common.round_up(pl.cdiv(length, size), group)
    if n_seg * size != length or wp != width:
        x = jnp.pad(x, ((0, 0), (0, n_seg * size - length), (0, wp - width)),
                    constant_values=value)
    return x.reshape(b, n_seg, size, wp)


_SEGMENT_BLOCK_BYTES = 1 << 20


def _segment_tiles(size, width):
    """(segments per block, channel tile, padded width) of the TPU segment kernels: 8 segments
    while a block holds at most _SEGMENT_BLOCK_BYTES as f32 (the channel tile narrowed first,
    down to 128 lanes; channels padded to a multiple of 128 when a single segment of all of
    them would not fit), fewer (down to one) for long segments. Double-buffered blocks and the
    kernels' f32 temporaries then stay within a 16 MiB scoped VMEM (compiled up to S = 2048)."""
    rows = _common.round_up(size, 8)
    block = lambda lanes: rows * _common.round_up(lanes, 128) * 4
    wp = width if width % 128 == 0 or block(width) <= _SEGMENT_BLOCK_BYTES else (
        _common.round_up(width, 128))
    td = _tpu_block_d(wp)
    while td % 256 == 0 and 8 * block(td) > _SEGMENT_BLOCK_BYTES:
        td //= 2
    return max(1, min(8, _SEGMENT_BLOCK_BYTES // block(td))), td, wp


def _segment_max_tpu_call(x, size, causal, interpret):
    b, length, width = x.shape
    group, td, wp = _segment_tiles(size, width)
    x4 = _segment_layout(x, size, group, -jnp.inf, wp)
    grid = (b, x4.shape[1] // group, wp // td)
    spec = pl.BlockSpec((None, group, size, td), lambda b_, i, j: (b_, i, 0, j))
    # argmax as [B, n_seg, 1, wp]: its block's last two dims (1, td) are legal for any group
    arg_spec = pl.BlockSpec((None, group, 1, td), lambda b_, i, j: (b_, i, 0, j))
    out_specs = [spec] if causal else [spec, arg_spec]
    out_shape = [_like(x4)] + ([] if causal else [
        jax.ShapeDtypeStruct((b, x4.shape[1], 1, wp), jnp.int32)])
    outs = _tpu_call(functools.partial(_segment_max_tpu_kernel, causal=causal), interpret,
                     grid=grid, in_specs=[spec], out_specs=out_specs, out_shape=out_shape,
                     semantics=("parallel",) * 3, name="segment_max_tpu")(x4)
    y = outs[0].reshape(b, -1, wp)[:, :length, :width]
    return y, (y if causal else outs[1])


def _segment_max_bwd_tpu_call(res, dy, size, causal, interpret):
    b, length, width = dy.shape
    group, td, wp = _segment_tiles(size, width)
    dy4 = _segment_layout(dy, size, group, 0.0, wp)
    spec = pl.BlockSpec((None, group, size, td), lambda b_, i, j: (b_, i, 0, j))
    if causal:
        res, res_spec = _segment_layout(res, size, group, -jnp.inf, wp), spec
    else:
        res_spec = pl.BlockSpec((None, group, 1, td), lambda b_, i, j: (b_, i, 0, j))
    dx4 = _tpu_call(functools.partial(_segment_max_bwd_tpu_kernel, causal=causal), interpret,
                    grid=(b, dy4.shape[1] // group, wp // td), in_specs=[res_spec, spec],
                    out_specs=spec, out_shape=_like(dy4), semantics=("parallel",) * 3,
                    name="segment_max_bwd_tpu")(res, dy4)
    return dx4.reshape(b, -1, wp)[:, :length, :width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _segment_max_tpu(x, size, causal, interpret):
    return _segment_max_tpu_call(x, size, causal, interpret)[0]


_segment_max_tpu.defvjp(
    lambda x, size, causal, interpret: _segment_max_tpu_call(x, size, causal, interpret),
    lambda size, causal, interpret, res, dy: (
        _segment_max_bwd_tpu_call(res, dy, size, causal, interpret),))


def _local_max_tpu_kernel(*refs, window, left, halo, backward):
    # Each block holds rows [i*TL - halo, (i+1)*TL + halo) of the padded input (pad = -inf for
    # x, 0 for dy), so every shifted window is a static slice.
    if backward:
        x_ref, dy_ref, out_ref = refs
    else:
        x_ref, out_ref = refs
    tl = out_ref.shape[0]
    shifted = lambda ref, off: ref[pl.ds(halo + off, tl), :].astype(jnp.float32)
    if not backward:
        out = shifted(x_ref, -left)
        for m in range(1, window):
            out = jnp.maximum(out, shifted(x_ref, m - left))
        out_ref[...] = out.astype(out_ref.dtype)
        return
    xj = shifted(x_ref, 0)
    beats_before, beats_after = [True], [True]
    for r in range(1, window):
        beats_before.append(beats_before[-1] & (xj > shifted(x_ref, -r)))
        beats_after.append(beats_after[-1] & (xj >= shifted(x_ref, r)))
    dx = jnp.zeros_like(xj)
    for k in range(window):
        dx = dx + jnp.where(beats_before[k] & beats_after[window - 1 - k],
                            shifted(dy_ref, left - k), 0.0)
    out_ref[...] = dx.astype(out_ref.dtype)


def _local_max_tpu_call(x, dy, window, causal, interpret):
    b, length, width = x.shape
    left = window - 1 if causal else window // 2
    halo = _common.round_up(max(window - 1, 1), 8)
    td, tl = _tpu_block_d(width), _tpu_block_l(length)
    n = pl.cdiv(length, tl)
    pad = lambda a, v: jnp.pad(a, ((0, 0), (halo, n * tl - length + halo), (0, 0)),
                               constant_values=v)
    args = [pad(x, -jnp.inf)] + ([] if dy is None else [pad(dy, 0.0)])
    # Mosaic takes Element (offset) dims only with no Blocked dim beside them: the channel
    # tile is an Element block too, offset j * td (a literal 0 for one tile: Mosaic must prove
    # the offset a multiple of 128 lanes, which j * td with td = D < 128 is not).
    lanes = (lambda j: j * td) if width > td else (lambda j: 0)
    in_spec = pl.BlockSpec((None, pl.Element(tl + 2 * halo), pl.Element(td)),
                           lambda b_, i, j: (b_, i * tl, lanes(j)))
    kernel = functools.partial(_local_max_tpu_kernel, window=window, left=left, halo=halo,
                               backward=dy is not None)
    return _tpu_call(kernel, interpret, grid=(b, n, width // td), in_specs=[in_spec] * len(args),
                     out_specs=pl.BlockSpec((None, tl, td), lambda b_, i, j: (b_, i, j)),
                     out_shape=_like(x), semantics=("parallel",) * 3,
                     name="local_max_tpu" if dy is None else "local_max_bwd_tpu")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _local_max_tpu(x, window, causal, interpret):
    return _local_max_tpu_call(x, None, window, causal, interpret)


_local_max_tpu.defvjp(
    lambda x, window, causal, interpret: (_local_max_tpu_call(x, None, window, causal,
                                                              interpret), x),
    lambda window, causal, interpret, x, dy: (
        _local_max_tpu_call(x, dy, window, causal, interpret),))


def _fuse_tpu_kernel(g_ref, s_ref, o_ref, *refs, length, backward):
    g, s, o = (r[...].astype(jnp.float32) for r in (g_ref, s_ref, o_ref))
    if not backward:
        l_ref, y_ref = refs
        y_ref[...] = ((g + s) * o + l_ref[...].astype(jnp.float32)).astype(y_ref.dtype)
        return
    dy_ref, ds_ref, do_ref, *dg_ref = refs
    dy = dy_ref[...].astype(jnp.float32)
    ds = dy * o
    ds_ref[...] = ds.astype(ds_ref.dtype)
    do_ref[...] = (dy * (g + s)).astype(do_ref.dtype)
    if dg_ref:                          # g is one row: per-tile partial sums, edge rows masked
        pos = pl.program_id(1) * ds.shape[0] + _iota(ds.shape, 0)
        dg_ref[0][...] = jnp.sum(jnp.where(pos < length, ds, 0.0), axis=0, keepdims=True)


def _fuse_tpu_call(g, s, o, last, interpret, backward):
    b, length, width = s.shape
    td, tl = _tpu_block_d(width), _tpu_block_l(length)
    n = pl.cdiv(length, tl)
    spec = pl.BlockSpec((None, tl, td), lambda b_, i, j: (b_, i, j))
    g_row = g.shape[1] != length
    g_spec = pl.BlockSpec((None, 1, td), lambda b_, i, j: (b_, 0, j)) if g_row else spec
    out_specs, out_shape = [spec], [_like(s, jnp.result_type(g, s, o, last))]
    if backward:
        out_specs, out_shape = [spec, spec], [_like(s), _like(o)]
        if g_row:
            out_specs.append(pl.BlockSpec((None, None, 1, td), lambda b_, i, j: (b_, i, 0, j)))
            out_shape.append(jax.ShapeDtypeStruct((b, n, 1, width), jnp.float32))
    kernel = functools.partial(_fuse_tpu_kernel, length=length, backward=backward)
    return _tpu_call(kernel, interpret, grid=(b, n, width // td), in_specs=[g_spec] + [spec] * 3,
                     out_specs=out_specs, out_shape=out_shape, semantics=("parallel",) * 3,
                     name="ponet_fuse_bwd_tpu" if backward else "ponet_fuse_tpu")(g, s, o, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fuse_tpu(g, s, o, l, interpret):
    return _fuse_tpu_call(g, s, o, l, interpret, backward=False)[0]


def _fuse_tpu_bwd(interpret, res, dy):
    g, s, o, l = res
    ds, do, *dg = _fuse_tpu_call(g, s, o, dy, interpret, backward=True)
    dg = jnp.sum(dg[0], axis=1) if dg else ds
    return dg.astype(g.dtype), ds, do, dy.astype(l.dtype)


_fuse_tpu.defvjp(lambda g, s, o, l, interpret: (_fuse_tpu(g, s, o, l, interpret), (g, s, o, l)),
                 _fuse_tpu_bwd)


def _head_map(heads, dh, transpose=False):
    """E [H*Dh, H] with E[j, h] = (j // Dh == h), or E^T: per-head lane sums (x @ E) and
    per-head broadcasts to the lanes (y @ E^T) as matmuls, so the tiles stay 2-D."""
    shape = (heads, heads * dh) if transpose else (heads * dh, heads)
    lane, head = (1, 0) if transpose else (0, 1)
    return (_iota(shape, lane) // dh == _iota(shape, head)).astype(jnp.float32)


def _hdot(a, b):
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _aggregate_tpu_kernel(*refs, length, heads, scale, stage):
    # One [TL, H*Dh] tile of the length per program (the heads side by side on the lanes);
    # per-tile partials are combined in XLA. "qsum": column sums of q [1, H*Dh]; "fwd": softmax
    # partials m, l [1, H] and acc [1, H*Dh]; "bwd": dk, dv tiles and a dqbar part [1, H*Dh].
    if stage == "qsum":
        q_ref, out_ref = refs
        ok = pl.program_id(1) * q_ref.shape[0] + _iota((q_ref.shape[0], 1), 0) < length
        out_ref[...] = jnp.sum(jnp.where(ok, q_ref[...].astype(jnp.float32), 0.0), axis=0,
                               keepdims=True)
        return
    if stage == "fwd":
        qbar_ref, k_ref, v_ref, m_ref, l_ref, acc_ref = refs
    else:
        qbar_ref, dg_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, dq_ref = refs
    tl, width = k_ref.shape
    to_heads = _head_map(heads, width // heads)
    to_lanes = _head_map(heads, width // heads, transpose=True)
    ok = pl.program_id(1) * tl + _iota((tl, 1), 0) < length                      # [TL, 1]
    qbar = qbar_ref[...]                                                          # [1, H*Dh]
    k = jnp.where(ok, k_ref[...].astype(jnp.float32), 0.0)
    v = jnp.where(ok, v_ref[...].astype(jnp.float32), 0.0)
    s = _hdot(k * qbar, to_heads) * scale                                         # [TL, H]
    if stage == "fwd":
        s = jnp.where(ok, s, -jnp.inf)
        m = jnp.max(s, axis=0, keepdims=True)                                     # [1, H]
        p = jnp.exp(s - m)
        m_ref[...] = m
        l_ref[...] = jnp.sum(p, axis=0, keepdims=True)
        acc_ref[...] = jnp.sum(_hdot(p, to_lanes) * v, axis=0, keepdims=True)
        return
    dg = dg_ref[...]                                                              # [1, H*Dh]
    p = jnp.where(ok, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (_hdot(v * dg, to_heads) - delta_ref[...])                           # [TL, H]
    dv_ref[...] = (_hdot(p, to_lanes) * dg).astype(dv_ref.dtype)
    ds_lanes = _hdot(ds, to_lanes) * scale                                        # [TL, H*Dh]
    dk_ref[...] = (ds_lanes * qbar).astype(dk_ref.dtype)
    dq_ref[...] = jnp.sum(ds_lanes * k, axis=0, keepdims=True)


def _aggregate_tile(length, width):
    """Rows of a [TL, H*Dh] tile: 128, fewer for wide heads (an f32 tile of at most 512 KiB)."""
    rows = max(8, min(128, (1 << 17) // _common.round_up(width, 128)) // 8 * 8)
    return _tpu_block_l(length, rows)


def _aggregate_tpu_stage(stage, args, tiled, outs, heads, interpret):
    """One stage over grid (B, L tiles). tiled[i]: args[i] is [B, L, H*Dh], else a row [B, 1, X]
    read whole; outs: (shape, dtype, tiled), [B, L, H*Dh] if tiled else partials [B, n, 1, X]."""
    b, length, width = args[-1].shape
    tl = _aggregate_tile(length, width)
    tile = pl.BlockSpec((None, tl, width), lambda b_, i: (b_, i, 0))
    row = lambda a: pl.BlockSpec((None, 1, a.shape[-1]), lambda b_, i: (b_, 0, 0))
    part = lambda s: pl.BlockSpec((None, None, 1, s[-1]), lambda b_, i: (b_, i, 0, 0))
    kernel = functools.partial(_aggregate_tpu_kernel, length=length, heads=heads,
                               scale=(width // heads) ** -0.5, stage=stage)
    return _tpu_call(kernel, interpret, grid=(b, pl.cdiv(length, tl)),
                     in_specs=[tile if t else row(a) for a, t in zip(args, tiled, strict=True)],
                     out_specs=[tile if t else part(s) for s, _, t in outs],
                     out_shape=[jax.ShapeDtypeStruct(s, dt) for s, dt, _ in outs],
                     semantics=("parallel", "parallel"), name=f"aggregate_{stage}_tpu")(*args)


def _aggregate_tpu_fwd(q, k, v, interpret):
    b, length, h, dh = q.shape
    n = pl.cdiv(length, _aggregate_tile(length, h * dh))
    flat = lambda x: x.reshape(b, length, h * dh)
    f32 = jnp.float32
    (q_sums,) = _aggregate_tpu_stage("qsum", (flat(q),), (True,),
                                     [((b, n, 1, h * dh), f32, False)], h, interpret)
    qbar = jnp.sum(q_sums, axis=1) / length                                       # [B, 1, H*Dh]
    m, l, acc = _aggregate_tpu_stage(
        "fwd", (qbar, flat(k), flat(v)), (False, True, True),
        [((b, n, 1, h), f32, False), ((b, n, 1, h), f32, False),
         ((b, n, 1, h * dh), f32, False)], h, interpret)
    m, l, acc = m[:, :, 0], l[:, :, 0], acc[:, :, 0].reshape(b, n, h, dh)
    m_max = jnp.max(m, axis=1)
    w = jnp.exp(m - m_max[:, None])
    l_sum = jnp.sum(w * l, axis=1)
    g32 = jnp.sum(w[..., None] * acc, axis=1) / l_sum[..., None]                 # [B, H, Dh]
    lse = m_max + jnp.log(l_sum)                                                  # [B, H]
    return g32, (jnp.zeros((0,), q.dtype), k, v, qbar, lse, g32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _aggregate_tpu(q, k, v, interpret):
    return _aggregate_tpu_fwd(q, k, v, interpret)[0].astype(v.dtype)


def _aggregate_tpu_bwd(interpret, res, dg):
    q_dtype, k, v, qbar, lse, g32 = res
    b, length, h, dh = k.shape
    n = pl.cdiv(length, _aggregate_tile(length, h * dh))
    dg32 = dg.astype(jnp.float32)
    delta = jnp.sum(dg32 * g32, axis=-1)                                          # [B, H]
    flat = lambda x: x.reshape(b, length, h * dh)
    dk, dv, dqbar = _aggregate_tpu_stage(
        "bwd", (qbar, dg32.reshape(b, 1, h * dh), lse[:, None], delta[:, None], flat(k),
                flat(v)), (False,) * 4 + (True, True),
        [((b, length, h * dh), k.dtype, True), ((b, length, h * dh), v.dtype, True),
         ((b, n, 1, h * dh), jnp.float32, False)], h, interpret)
    dqbar = jnp.sum(dqbar[:, :, 0], axis=1).reshape(b, h, dh) / length
    return (jnp.broadcast_to(dqbar[:, None], k.shape).astype(q_dtype.dtype), dk.reshape(k.shape),
            dv.reshape(v.shape))


_aggregate_tpu.defvjp(lambda q, k, v, interpret: (
    lambda out: (out[0].astype(v.dtype), out[1]))(_aggregate_tpu_fwd(q, k, v, interpret)),
    _aggregate_tpu_bwd)


# ---------------------------------------------------------------------------------------------
# Public functions and dispatch
# ---------------------------------------------------------------------------------------------


def _check_x(name, x):
    _common.check_rank(name, x, 3, "[batch, length, channels]")
    _common.check_float(name, x)


def _kernel_backend(backend):
    """'reference', 'gpu' (Triton or interpret) or 'tpu' (Mosaic or TPU interpret), interpret?"""
    backend = _common.resolve_backend(backend)
    if backend == "reference":
        return "reference", False
    if backend == "tpu_interpret" or (backend == "pallas" and _common.platform() == "tpu"):
        return "tpu", backend == "tpu_interpret"
    return "gpu", backend == "interpret"


def segment_max(x, segment_size: int, *, causal: bool = False, backend=None,
                blocks: PoolBlocks | None = None):
    """Max over consecutive segments of `segment_size` tokens (prefix max when causal)."""
    _check_x("x", x)
    if segment_size < 1:
        raise ValueError(f"segment_size must be >= 1, got {segment_size}")
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return segment_max_reference(x, segment_size, causal=causal)
    if kind == "tpu":
        return _segment_max_tpu(x, segment_size, causal, interpret)
    return _segment_max_op(x, segment_size, causal,
                           _cfg("segment_cummax" if causal else "segment_max", blocks, interpret))


def local_max(x, window: int = 3, *, causal: bool = False, backend=None,
              blocks: PoolBlocks | None = None):
    """Sliding-window max (centred, odd window; trailing window when causal)."""
    _check_x("x", x)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not causal and window % 2 != 1:
        raise ValueError(f"window must be odd for bidirectional local max, got {window}")
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return local_max_reference(x, window, causal=causal)
    if kind == "tpu":
        return _local_max_tpu(x, window, causal, interpret)
    return _local_max_op(x, window, causal, _cfg("local_max", blocks, interpret))


def prefix_mean(x, *, backend=None, blocks: PoolBlocks | None = None):
    """Running mean over positions <= t."""
    _check_x("x", x)
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return prefix_mean_reference(x)
    if kind == "tpu":
        return _prefix_mean_tpu(x, interpret)
    return _prefix_mean_op(x, _cfg("prefix_mean", blocks, interpret))


def global_aggregate(q, k, v, *, backend=None, blocks: PoolBlocks | None = None):
    """Pooled-query attention over all keys: q/k/v [B, L, H, Dh] -> [B, H, Dh]."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(name, x, 4, "[batch, length, heads, head_dim]")
        _common.check_float(name, x)
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return global_aggregate_reference(q, k, v)
    if kind == "tpu":
        return _aggregate_tpu(q, k, v, interpret)
    return _aggregate_op(q, k, v, _cfg("aggregate", blocks, interpret))


def _check_fuse_args(g, s, o, l):
    for name, x in (("g", g), ("s", s), ("o", o), ("l", l)):
        _check_x(name, x)
    if not s.shape == o.shape == l.shape:
        raise ValueError(f"s, o, l must have the same shape, got {s.shape}, {o.shape}, {l.shape}")
    b, _, width = s.shape
    if g.shape not in (s.shape, (b, 1, width)):
        raise ValueError(f"g must have shape {s.shape} or {(b, 1, width)}, got {g.shape}")


def ponet_fuse(g, s, o, l, *, backend=None, blocks: PoolBlocks | None = None):
    """(g + s) * o + l; g may be [B, 1, D] (broadcast over the length).

    One decoding step may pass all four as [B, D].
    """
    if all(getattr(a, "ndim", None) == 2 for a in (g, s, o, l)):
        y = ponet_fuse(g[:, None], s[:, None], o[:, None], l[:, None], backend=backend,
                       blocks=blocks)
        return y[:, 0]
    _check_fuse_args(g, s, o, l)
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return ponet_fuse_reference(g, s, o, l)
    if kind == "tpu":
        return _fuse_tpu(g, s, o, l, interpret)
    return _fuse_op(g, s, o, l, _cfg("fuse", blocks, interpret))


def ponet_pool_fuse_reference(g, s, o, l, segment_size: int, window: int = 3, *,
                              causal: bool = False):
    return ponet_fuse_reference(g, segment_max_reference(s, segment_size, causal=causal), o,
                                local_max_reference(l, window, causal=causal))


def ponet_pool_fuse(g, s, o, l, segment_size: int, window: int = 3, *, causal: bool = False,
                    backend=None, blocks: PoolBlocks | None = None):
    """(g + segment_max(s)) * o + local_max(l) in one pass over memory (GPU).

    The same as ponet_fuse(g, segment_max(s, ...), o, local_max(l, ...)) without writing and
    re-reading the pooled s and l. On TPU, and bidirectionally with segments longer than a
    tile (blocks.block_l), it runs the three kernels one after the other.
    """
    _check_fuse_args(g, s, o, l)
    if segment_size < 1:
        raise ValueError(f"segment_size must be >= 1, got {segment_size}")
    if window < 1 or (not causal and window % 2 != 1):
        raise ValueError(f"window must be >= 1 (and odd when bidirectional), got {window}")
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return ponet_pool_fuse_reference(g, s, o, l, segment_size, window, causal=causal)
    cfg = _cfg("pool_fuse_causal" if causal else "pool_fuse", blocks, interpret)
    if kind == "tpu" or (not causal and pl.next_power_of_2(segment_size) > cfg.block_l):
        return ponet_fuse(g, segment_max(s, segment_size, causal=causal, backend=backend,
                                         blocks=blocks), o,
                          local_max(l, window, causal=causal, backend=backend, blocks=blocks),
                          backend=backend, blocks=blocks)
    return _pool_fuse_op(g, s, o, l, segment_size, window, causal, cfg)

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
        no length axis ([B, 1, D]); the result has the promoted dtype of the four inputs.

Kernels (GPU-style Pallas: Triton lowering on GPU, interpret mode on CPU). Each op is one pass
over memory forward and one backward, through jax.custom_vjp; arithmetic is in float32 and any
length works (rows past L and channels past D are masked inside the kernels):
  prefix_mean     forward: a program owns (batch, channel block) and walks the sequence in tiles,
                  an in-tile cumsum plus a float32 carry; backward: the same walk from the end
                  (dx_u = sum_{t >= u} dy_t / (t + 1)).
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
Block sizes are keyword arguments (`blocks=PoolBlocks(...)`); the defaults target an H200.

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
    tile; group: segments per program of the causal segment max; num_warps, num_stages: Triton.
    """

    block_l: int | None = None
    block_d: int | None = None
    group: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class _Cfg:
    interpret: bool
    block_l: int
    block_d: int
    group: int
    num_warps: int
    num_stages: int


_DEFAULTS = {  # op -> (block_l, block_d, group, num_warps, num_stages), tuned for an H200
    "prefix_mean": (64, 32, 1, 4, 3),
    "segment_max": (64, 64, 1, 4, 3),
    "segment_cummax": (1, 64, 16, 4, 3),
    "local_max": (32, 128, 1, 4, 3),
    "fuse": (32, 128, 1, 4, 3),
    "aggregate": (16, 256, 1, 4, 3),
}


def _cfg(op: str, blocks: PoolBlocks | None, interpret: bool) -> _Cfg:
    default = _DEFAULTS[op]
    given = dataclasses.astuple(blocks or PoolBlocks())
    vals = [d if g is None else g for g, d in zip(given, default, strict=True)]
    for name, v in zip(("block_l", "block_d", "group"), vals[:3], strict=True):
        if v < 1 or v & (v - 1):
            raise ValueError(f"blocks.{name} must be a power of two, got {v}")
    return _Cfg(interpret, *vals)


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


def _prefix_mean_fwd_kernel(x_ref, y_ref, *, block_l, block_d):
    # x_ref, y_ref: [L, D] of one batch row; the program owns channels [j*block_d, ...).
    length = x_ref.shape[0]
    cols = pl.program_id(1) * block_d + _ar(block_d)

    def tile(i, carry_D):
        rows = i * block_l + _ar(block_l)
        x = _load_f32(x_ref, rows, cols, rows < length, 0.0)
        csum = jnp.cumsum(x, axis=0) + carry_D[None, :]
        _store(y_ref, rows, cols, rows < length, csum / (rows + 1).astype(jnp.float32)[:, None])
        return carry_D + jnp.sum(x, axis=0)

    lax.fori_loop(0, pl.cdiv(length, block_l), tile, jnp.zeros((block_d,), jnp.float32))


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


def _local_max_fwd_kernel(x_ref, y_ref, *, window, left, block_l, block_d):
    # Window of output t: [t - left, t - left + window - 1], clipped to [0, L).
    length = x_ref.shape[0]
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
    best = None
    for m in range(window):
        r = rows + (m - left)
        x = _load_f32(x_ref, r, cols, _in(r, length), -jnp.inf)
        best = x if best is None else jnp.maximum(best, x)
    _store(y_ref, rows, cols, rows < length, best)


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


def _col_sum_kernel(x_ref, out_ref, *, chunk, block_l, block_d):
    # out_ref [C, D] f32: sums of x over the rows of chunk c = program_id(1).
    length = x_ref.shape[0]
    c = pl.program_id(1)
    cols = pl.program_id(2) * block_d + _ar(block_d)

    def tile(i, acc_D):
        rows = c * chunk + i * block_l + _ar(block_l)
        return acc_D + jnp.sum(_load_f32(x_ref, rows, cols, rows < length, 0.0), axis=0)

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


def _prefix_mean_bwd_kernel(dy_ref, dx_ref, *, block_l, block_d):
    # dx_u = sum_{t >= u} dy_t / (t + 1): the forward walk run from the end, rows reversed.
    length = dy_ref.shape[0]
    cols = pl.program_id(1) * block_d + _ar(block_d)
    n_tiles = pl.cdiv(length, block_l)

    def tile(i, carry_D):
        rows = (n_tiles - 1 - i) * block_l + (block_l - 1 - _ar(block_l))
        w = (_load_f32(dy_ref, rows, cols, rows < length, 0.0)
             / (rows + 1).astype(jnp.float32)[:, None])
        _store(dx_ref, rows, cols, rows < length, jnp.cumsum(w, axis=0) + carry_D[None, :])
        return carry_D + jnp.sum(w, axis=0)

    lax.fori_loop(0, n_tiles, tile, jnp.zeros((block_d,), jnp.float32))


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

    steps = min(size, length)                             # rows past L are all masked

    def step(r, acc_GD):
        s = steps - 1 - r
        rows = segs * size + s
        ok = rows < length
        y = _load_f32(y_ref, rows, cols, ok, -jnp.inf)
        y_prev = _load_f32(y_ref, rows - 1, cols, ok & (s > 0), -jnp.inf)
        new = (y > y_prev) | (s == 0)
        acc_GD = acc_GD + _load_f32(dy_ref, rows, cols, ok, 0.0)
        _store(dx_ref, rows, cols, ok, jnp.where(new, acc_GD, 0.0))
        return jnp.where(new, 0.0, acc_GD)

    _row_loop(steps, step, jnp.zeros((group, block_d), jnp.float32), unroll)


def _local_max_bwd_kernel(x_ref, dy_ref, dx_ref, *, window, left, block_l, block_d):
    # x_j is the argmax of the window of t_k = j + left - k (j at offset k in it) iff it beats
    # (>) the k values before it and ties or beats (>=) the window - 1 - k values after it.
    length = x_ref.shape[0]
    rows = pl.program_id(1) * block_l + _ar(block_l)
    cols = pl.program_id(2) * block_d + _ar(block_d)
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
    _store(dx_ref, rows, cols, rows < length, dx)


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


def _prefix_mean_call(x, cfg: _Cfg, backward: bool):
    b, _, width = x.shape
    kernel = _prefix_mean_bwd_kernel if backward else _prefix_mean_fwd_kernel
    return _call(functools.partial(kernel, block_l=cfg.block_l, block_d=cfg.block_d), cfg,
                 grid=(b, pl.cdiv(width, cfg.block_d)), in_specs=[_slab(x.shape)],
                 out_specs=_slab(x.shape), out_shape=_like(x),
                 name="prefix_mean_bwd" if backward else "prefix_mean_fwd")(x)


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
    q_BLD = rearrange(q, "b l h d -> b l (h d)")
    sums_shape = (b, n_chunks, h * dh)
    kernel = functools.partial(_col_sum_kernel, chunk=chunk, block_l=cfg.block_l,
                               block_d=cfg.block_d)
    q_sums = _call(kernel, cfg, grid=(b, n_chunks, pl.cdiv(h * dh, cfg.block_d)),
                   in_specs=[_slab(q_BLD.shape)], out_specs=_slab(sums_shape),
                   out_shape=jax.ShapeDtypeStruct(sums_shape, jnp.float32),
                   name="aggregate_qsum")(q_BLD)
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

def _no_tpu(*_):
    raise NotImplementedError("the Mosaic TPU variants of the pooling kernels are not written yet")


_segment_max_tpu = _local_max_tpu = _prefix_mean_tpu = _aggregate_tpu = _fuse_tpu = _no_tpu


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


def ponet_fuse(g, s, o, l, *, backend=None, blocks: PoolBlocks | None = None):
    """(g + s) * o + l; g may be [B, 1, D] (broadcast over the length).

    One decoding step may pass all four as [B, D].
    """
    if all(getattr(a, "ndim", None) == 2 for a in (g, s, o, l)):
        y = ponet_fuse(g[:, None], s[:, None], o[:, None], l[:, None], backend=backend,
                       blocks=blocks)
        return y[:, 0]
    for name, x in (("g", g), ("s", s), ("o", o), ("l", l)):
        _check_x(name, x)
    if not s.shape == o.shape == l.shape:
        raise ValueError(f"s, o, l must have the same shape, got {s.shape}, {o.shape}, {l.shape}")
    b, _, width = s.shape
    if g.shape not in (s.shape, (b, 1, width)):
        raise ValueError(f"g must have shape {s.shape} or {(b, 1, width)}, got {g.shape}")
    kind, interpret = _kernel_backend(backend)
    if kind == "reference":
        return ponet_fuse_reference(g, s, o, l)
    if kind == "tpu":
        return _fuse_tpu(g, s, o, l, interpret)
    return _fuse_op(g, s, o, l, _cfg("fuse", blocks, interpret))

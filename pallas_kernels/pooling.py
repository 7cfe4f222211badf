"""Pooling operations of PoNet (Tan et al. 2021, "PoNet: Pooling Network for Efficient Token
Mixing in Long Sequences"): references and the public dispatch.

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
        no length axis ([B, 1, D]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

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


def _check_x(name, x):
    _common.check_rank(name, x, 3, "[batch, length, channels]")
    _common.check_float(name, x)


def segment_max(x, segment_size: int, *, causal: bool = False, backend=None):
    """Max over consecutive segments of `segment_size` tokens (prefix max when causal)."""
    _check_x("x", x)
    if segment_size < 1:
        raise ValueError(f"segment_size must be >= 1, got {segment_size}")
    _common.resolve_backend(backend, has_kernel=False)
    return segment_max_reference(x, segment_size, causal=causal)


def local_max(x, window: int = 3, *, causal: bool = False, backend=None):
    """Sliding-window max (centred, odd window; trailing window when causal)."""
    _check_x("x", x)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    _common.resolve_backend(backend, has_kernel=False)
    return local_max_reference(x, window, causal=causal)


def prefix_mean(x, *, backend=None):
    """Running mean over positions <= t."""
    _check_x("x", x)
    _common.resolve_backend(backend, has_kernel=False)
    return prefix_mean_reference(x)


def global_aggregate(q, k, v, *, backend=None):
    """Pooled-query attention over all keys: q/k/v [B, L, H, Dh] -> [B, H, Dh]."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(name, x, 4, "[batch, length, heads, head_dim]")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    _common.resolve_backend(backend, has_kernel=False)
    return global_aggregate_reference(q, k, v)


def ponet_fuse(g, s, o, l, *, backend=None):
    """(g + s) * o + l; g may be [B, 1, D] (broadcast over the length)."""
    _common.resolve_backend(backend, has_kernel=False)
    return ponet_fuse_reference(g, s, o, l)

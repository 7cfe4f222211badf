"""Scaled dot-product attention: the pure-jnp reference and the public dispatch.

    o[b, i, h] = sum_j softmax_j(sm_scale * q[b, i, h] . k[b, j, g]) v[b, j, g],  g = h // (Hq // Hkv)

Shapes (batch-major, heads after length): q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], out [B, Lq, Hq, D].
Masks, all optional and combined:
  causal      query i sits at absolute position Lk - Lq + i (queries are the last Lq tokens) and
              sees keys j <= that position;
  window      sliding (local) window: query at position p sees keys p - window < j <= p (needs
              causal); window=None is unlimited;
  segment_ids [B, L] int (Lq == Lk): tokens see only keys of their own segment (packed sequences).
`decode_attention` is the single-step form used with a KV cache: q [B, T, Hq, D] against the first
`lengths[b]` entries of k/v caches [B, S, Hkv, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels import _common

MASK_VALUE = -1e30


def attention_mask(lq: int, lk: int, *, causal: bool, window: int | None,
                   segment_ids=None, q_offset=None):
    """Boolean mask [B or 1, Lq, Lk]: True where query i may attend to key j."""
    q_pos = jnp.arange(lq)[:, None] + (lk - lq if q_offset is None else q_offset)
    k_pos = jnp.arange(lk)[None, :]
    mask = jnp.ones((lq, lk), bool)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def attention_reference(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None):
    """Dense softmax attention in f32 (materialises the [B, H, Lq, Lk] scores)."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    q_BGRLD = rearrange(q.astype(jnp.float32), "b l (g r) d -> b g r l d", g=hkv)
    s = jnp.einsum("bgrqd,bkgd->bgrqk", q_BGRLD, k.astype(jnp.float32)) * sm_scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window,
                          segment_ids=segment_ids)
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    # Rows with no visible key (possible only with odd segment layouts) give zeros, not NaN.
    p = jnp.where(mask[:, None, None].any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bgrqk,bkgd->bgrqd", p, v.astype(jnp.float32))
    del hq
    return rearrange(o, "b g r l d -> b l (g r) d").astype(q.dtype)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, sm_scale=None, window=None):
    """q [B, T, Hq, D] are the last T of `lengths[b]` valid cache entries; causal among them."""
    t, s_max = q.shape[1], k_cache.shape[1]
    hkv, d = k_cache.shape[2], q.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    q_BGRTD = rearrange(q.astype(jnp.float32), "b t (g r) d -> b g r t d", g=hkv)
    s = jnp.einsum("bgrtd,bsgd->bgrts", q_BGRTD, k_cache.astype(jnp.float32)) * sm_scale
    q_pos = lengths[:, None, None] - t + jnp.arange(t)[None, :, None]     # [B, T, 1]
    k_pos = jnp.arange(s_max)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bgrts,bsgd->bgrtd", p, v_cache.astype(jnp.float32))
    return rearrange(o, "b g r t d -> b t (g r) d").astype(q.dtype)


def _check_attention_args(q, k, v, segment_ids, window, causal):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(name, x, 4, "[batch, length, heads, head_dim]")
        _common.check_float(name, x)
    b, lq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Lk, Hkv, D], got k {k.shape}, "
                         f"v {v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must have shape [{b}, Lk, Hkv, {d}] to match q {q.shape}, "
                         f"got {k.shape}")
    if hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[2]})")
    if segment_ids is not None:
        if lq != k.shape[1]:
            raise ValueError("segment_ids needs q and k of the same length, got "
                             f"{lq} and {k.shape[1]}")
        if segment_ids.shape != (b, lq):
            raise ValueError(f"segment_ids must have shape [{b}, {lq}], got {segment_ids.shape}")
    if window is not None:
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")


def flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None,
                    backend=None):
    """Attention of q [B, Lq, Hq, D] over k/v [B, Lk, Hkv, D]; returns [B, Lq, Hq, D]."""
    _check_attention_args(q, k, v, segment_ids, window, causal)
    backend = _common.resolve_backend(backend, has_kernel=False)
    return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                               sm_scale=sm_scale, window=window)


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, window=None, backend=None):
    """Attention of the newest T queries q [B, T, Hq, D] over a KV cache [B, S, Hkv, D]."""
    _common.check_rank("q", q, 4, "[batch, T, heads, head_dim]")
    _common.check_rank("k_cache", k_cache, 4, "[batch, max_length, kv_heads, head_dim]")
    backend = _common.resolve_backend(backend, has_kernel=False)
    return decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale,
                                      window=window)

"""PoNet pooling mixer (Tan et al. 2021, "PoNet: Pooling Network for Efficient Token Mixing in
Long Sequences"): O(L) token mixing by three pools fused with a multiplicative gate.

    q, k, v, s, l, o = x W  (six projections, d_model each)
    g = global aggregation,   s' = segment max-pool of s,   l' = local max-pool of l
    y = ((g + s') * o + l') W_out

Bidirectional (the paper): g = multi-head attention of the pooled query mean_t(q_t) over all keys
(one vector per sequence, broadcast to every token); s' = max over the token's segment of
`segment_size` tokens; l' = max over a centred window of `local_window` tokens.

Causal (for language models; differs from the paper, which sees the whole sequence): g_t is the
running mean of v over positions <= t (the pooled-query attention needs future tokens, so it is
replaced by the running mean); s'_t is the max over the current segment up to t; l'_t the max over
the trailing window [t - w + 1, t]. Decoding keeps the running sum, the segment max so far and the
last w - 1 local inputs: O(d_model) state per sequence.

Kernels (pallas_kernels.pooling, `impl` unset = Pallas on GPU/TPU, the jnp references on CPU):
g comes from `global_aggregate` (bidirectional) or `prefix_mean` (causal); with `fused_pool`
(the default) the two max pools and the fusion run as one kernel, `ponet_pool_fuse`, so the
pooled s and l never go through memory; `fused_pool: false` runs `segment_max`, `local_max` and
`ponet_fuse` one after the other (the same function; kept for measurement).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from mixers.base import ConfigError, Mixer, MixerConfig, _batch_axes, dense, shard_kernel


@dataclasses.dataclass(frozen=True)
class PoolingConfig(MixerConfig):
    n_heads: int = 4                 # heads of the bidirectional global aggregation
    segment_size: int = 32
    local_window: int = 3
    fused_pool: bool = True          # ponet_pool_fuse (one kernel) instead of three kernels

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        if self.n_heads < 1 or d_model % self.n_heads:
            raise ConfigError("n_heads", f"{self.n_heads} must divide d_model={d_model}")
        if self.segment_size < 1:
            raise ConfigError("segment_size", f"must be >= 1, got {self.segment_size}")
        if self.local_window < 1 or (not self.causal and self.local_window % 2 == 0):
            raise ConfigError("local_window", f"must be >= 1 (and odd when bidirectional), "
                                              f"got {self.local_window}")


class PoolingMixer(Mixer):
    """PoNet mixer. Args (PoolingConfig): n_heads, segment_size, local_window, fused_pool,
    causal, impl."""

    def __init__(self, cfg: PoolingConfig, *, d_model: int, rngs: nnx.Rngs, dtype=None):
        self.cfg, self.causal, self.d_model = cfg, cfg.causal, d_model
        self.in_proj = dense(d_model, 6 * d_model, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.out_proj = dense(d_model, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x, *, segment_ids=None, positions=None):
        if segment_ids is not None:
            raise ValueError("PoolingMixer does not support segment_ids (packed sequences) yet")
        cfg, impl = self.cfg, self.cfg.impl
        q, k, v, s, l, o = self._project(x)
        if self.causal:
            g = shard_kernel(pk.prefix_mean, x=v, backend=impl)
        else:
            heads = lambda t: t.reshape(*t.shape[:2], cfg.n_heads, -1)
            g = shard_kernel(pk.global_aggregate, q=heads(q), k=heads(k), v=heads(v),
                             backend=impl)
            g = g.reshape(x.shape[0], 1, -1)
        if cfg.fused_pool:
            y = shard_kernel(pk.ponet_pool_fuse, g=g, s=s, o=o, l=l,
                             segment_size=cfg.segment_size, window=cfg.local_window,
                             causal=self.causal, backend=impl)
        else:
            s = shard_kernel(pk.segment_max, x=s, segment_size=cfg.segment_size,
                             causal=self.causal, backend=impl)
            l = shard_kernel(pk.local_max, x=l, window=cfg.local_window, causal=self.causal,
                             backend=impl)
            y = shard_kernel(pk.ponet_fuse, g=g, s=s, o=o, l=l, backend=impl)
        return self.out_proj(y)

    def _project(self, x):
        """The six projections q, k, v, s, l, o of x, each [B, L, d_model]: six matmuls, one per
        column block of the in_proj weight, rather than one matmul and jnp.split (whose slices
        XLA copies before the kernels' custom calls, and whose gradient is a concatenation);
        projections a path does not use (q and k when causal) are never computed."""
        proj, d = self.in_proj, self.d_model
        kernel = proj.kernel[...]
        axes = _batch_axes(x.shape[0])
        if axes:                        # as Dense does: weights gathered, activations split
            kernel = jax.lax.with_sharding_constraint(kernel, jax.P())
        x, kernel, _ = proj.promote_dtype((x, kernel, None), dtype=proj.dtype)
        outs = []
        for i in range(6):
            y = jax.lax.dot_general(x, kernel[:, i * d:(i + 1) * d],
                                    (((x.ndim - 1,), (0,)), ((), ())), precision=proj.precision)
            outs.append(jax.lax.with_sharding_constraint(y, jax.P(axes)) if axes else y)
        return outs

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        if not self.causal:
            raise ValueError("bidirectional pooling (causal: false) cannot decode")
        d, w = self.d_model, self.cfg.local_window
        return {"v_sum": jnp.zeros((batch_size, d), jnp.float32),
                "seg_max": jnp.zeros((batch_size, d), dtype),
                "window": jnp.full((batch_size, w - 1, d), jnp.finfo(dtype).min, dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def decode(self, x, cache):
        _, _, v, s, l, o = (t[:, 0] for t in self._project(x))
        pos = cache["pos"]
        v_sum = cache["v_sum"] + v.astype(jnp.float32)
        g = (v_sum / (pos + 1).astype(jnp.float32)).astype(v.dtype)
        seg_max = jnp.where(pos % self.cfg.segment_size == 0, s,
                            jnp.maximum(cache["seg_max"].astype(s.dtype), s))
        window = jnp.concatenate([cache["window"].astype(l.dtype), l[:, None]], axis=1)
        y = shard_kernel(pk.ponet_fuse, g=g, s=seg_max, o=o, l=window.max(axis=1))
        new = {"v_sum": v_sum, "seg_max": seg_max.astype(cache["seg_max"].dtype),
               "window": window[:, 1:].astype(cache["window"].dtype), "pos": pos + 1}
        return self.out_proj(y[:, None]), new

"""Multi-head attention with GQA/MQA, RoPE, causal or bidirectional, optional sliding window.

x [B, L, d_model] -> q [B, L, H, Dh], k/v [B, L, Hkv, Dh] -> attention -> [B, L, d_model].
`impl` picks the kernel: None (Pallas flash attention on GPU/TPU, the jnp reference on CPU),
"flash"/"pallas", "interpret", "reference", "xla" or "cudnn" (both through
jax.nn.dot_product_attention). Cached decoding keeps k/v caches [B, S, Hkv, Dh].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from mixers.base import (
    ConfigError,
    Mixer,
    MixerConfig,
    check_heads,
    default_positions,
    dense,
    rope,
    shard_kernel,
)


@dataclasses.dataclass(frozen=True)
class AttentionConfig(MixerConfig):
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    window: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0

    @classmethod
    def valid_impls(cls):
        return ("flash", "pallas", "interpret", "tpu_interpret", "reference", "xla", "cudnn")

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        check_heads(self.n_heads, self.head_dim, d_model)
        kv = self.n_kv_heads or self.n_heads
        if kv < 1 or self.n_heads % kv:
            raise ConfigError("n_kv_heads", f"{kv} must divide n_heads={self.n_heads}")
        if self.window is not None and (self.window < 1 or not self.causal):
            raise ConfigError("window", "must be >= 1 and needs causal: true")
        if self.rope and (self.head_dim or d_model // self.n_heads) % 2:
            raise ConfigError("head_dim", "must be even for RoPE")


class Attention(Mixer):
    """Softmax attention. Args (AttentionConfig): n_heads, n_kv_heads (GQA; default n_heads),
    head_dim (default d_model // n_heads), causal, window (sliding, left), rope, rope_theta,
    impl."""

    def __init__(self, cfg: AttentionConfig, *, d_model: int, rngs: nnx.Rngs, dtype=None):
        self.cfg, self.causal = cfg, cfg.causal
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        hd = self.head_dim
        self.q_proj = dense(d_model, self.n_heads * hd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k_proj = dense(d_model, self.n_kv * hd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_proj = dense(d_model, self.n_kv * hd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.o_proj = dense(self.n_heads * hd, d_model, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def _qkv(self, x, positions):
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.n_kv, self.head_dim)
        if self.cfg.rope:
            q, k = rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta)
        return q, k, v

    def __call__(self, x, *, segment_ids=None, positions=None):
        positions = default_positions(x) if positions is None else positions
        q, k, v = self._qkv(x, positions)
        o = self._attend(q, k, v, segment_ids)
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def _attend(self, q, k, v, segment_ids):
        impl, cfg = self.cfg.impl, self.cfg
        if impl in ("xla", "cudnn"):
            mask = None
            if segment_ids is not None:
                mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            window = None if cfg.window is None else (cfg.window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                                local_window_size=window, implementation=impl)
        backend = "pallas" if impl == "flash" else impl
        return shard_kernel(pk.flash_attention, q=q, k=k, v=v, causal=self.causal,
                            segment_ids=segment_ids, window=cfg.window, backend=backend)

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        if not self.causal:
            raise ValueError("bidirectional attention (causal: false) cannot decode")
        shape = (batch_size, max_length, self.n_kv, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def decode(self, x, cache):
        """x [B, 1, d_model] at position cache['pos'] -> (y [B, 1, d_model], cache)."""
        pos = cache["pos"]
        positions = jnp.full(x.shape[:2], pos, jnp.int32)
        q, k, v = self._qkv(x, positions)
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, 1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, 1)
        lengths = jnp.full((x.shape[0],), pos + 1, jnp.int32)
        backend = None if self.cfg.impl in ("flash", "xla", "cudnn", None) else self.cfg.impl
        o = shard_kernel(pk.decode_attention, q=q, k_cache=kc.astype(q.dtype),
                         v_cache=vc.astype(q.dtype), lengths=lengths, window=self.cfg.window,
                         backend=backend)
        y = self.o_proj(o.reshape(*x.shape[:2], -1))
        return y, {"k": kc, "v": vc, "pos": pos + 1}

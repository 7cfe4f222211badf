"""Gated linear attention layer (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), following the paper's layer:

    q, k = x W_q, x W_k        [B, L, H, Dk]     (key_dim = expand_k * d_model)
    v    = x W_v               [B, L, H, Dv]     (value_dim = expand_v * d_model)
    log_g = log_sigmoid(x W_g1 W_g2 + b) / 16    (low-rank gate, temperature normaliser 16)
    o = GLA(q, k, v, log_g);  o = RMSNorm_head(o) * swish(x W_r);  y = o W_o

The recurrent state S [B, H, Dk, Dv] makes decoding O(1) per token. With causal: false the layer
is bidirectional: the sum of a forward and a reversed GLA with shared weights (for encoders).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from mixers.base import ConfigError, Mixer, MixerConfig, dense, shard_kernel


@dataclasses.dataclass(frozen=True)
class GLAConfig(MixerConfig):
    n_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        for key, dim in (("expand_k", self.expand_k * d_model),
                         ("expand_v", self.expand_v * d_model)):
            if dim != int(dim) or int(dim) % self.n_heads or dim < self.n_heads:
                raise ConfigError(key, f"{key} * d_model = {dim} must be a positive multiple of "
                                       f"n_heads={self.n_heads}")
        if self.gate_logit_normalizer <= 0:
            raise ConfigError("gate_logit_normalizer", "must be > 0")


class GatedLinearAttention(Mixer):
    """GLA layer. Args (GLAConfig): n_heads, expand_k, expand_v, gate_low_rank_dim,
    gate_logit_normalizer, causal (false = bidirectional sum of two directions), impl."""

    def __init__(self, cfg: GLAConfig, *, d_model: int, rngs: nnx.Rngs, dtype=None):
        self.cfg, self.causal = cfg, cfg.causal
        self.key_dim, self.value_dim = int(cfg.expand_k * d_model), int(cfg.expand_v * d_model)
        self.n_heads = cfg.n_heads
        kd, vd = self.key_dim, self.value_dim
        self.q_proj = dense(d_model, kd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k_proj = dense(d_model, kd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v_proj = dense(d_model, vd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.r_proj = dense(d_model, vd, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.g_down = dense(d_model, cfg.gate_low_rank_dim, ("embed", None), rngs=rngs,
                            dtype=dtype)
        self.g_up = dense(cfg.gate_low_rank_dim, kd, (None, "heads"), rngs=rngs, dtype=dtype,
                          use_bias=True)
        self.o_norm = nnx.RMSNorm(vd // cfg.n_heads, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.o_proj = dense(vd, d_model, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def _inputs(self, x):
        b, l, _ = x.shape
        h = self.n_heads
        q = self.q_proj(x).reshape(b, l, h, -1)
        k = self.k_proj(x).reshape(b, l, h, -1)
        v = self.v_proj(x).reshape(b, l, h, -1)
        gate = self.g_up(self.g_down(x)).astype(jnp.float32)
        log_g = (jax.nn.log_sigmoid(gate) / self.cfg.gate_logit_normalizer).reshape(b, l, h, -1)
        return q, k, v, log_g

    def _output(self, x, o_BLHV):
        o = self.o_norm(o_BLHV).reshape(*x.shape[:2], -1)
        return self.o_proj(o * jax.nn.swish(self.r_proj(x)))

    def __call__(self, x, *, segment_ids=None, positions=None):
        if segment_ids is not None:
            raise ValueError("GatedLinearAttention does not support segment_ids (packed "
                             "sequences) yet")
        q, k, v, log_g = self._inputs(x)
        gla = lambda q, k, v, log_g: shard_kernel(pk.gla, q=q, k=k, v=v,
                                                  log_g=log_g.astype(q.dtype),
                                                  backend=self.cfg.impl)
        o = gla(q, k, v, log_g)
        if not self.causal:
            flip = lambda t: jnp.flip(t, axis=1)
            o = o + flip(gla(flip(q), flip(k), flip(v), flip(log_g)))
        return self._output(x, o)

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        if not self.causal:
            raise ValueError("bidirectional GLA (causal: false) cannot decode")
        dk, dv = self.key_dim // self.n_heads, self.value_dim // self.n_heads
        return {"state": jnp.zeros((batch_size, self.n_heads, dk, dv), jnp.float32)}

    def decode(self, x, cache):
        q, k, v, log_g = self._inputs(x)
        o, state = shard_kernel(pk.gla_step, q=q[:, 0], k=k[:, 0], v=v[:, 0],
                                log_g=log_g[:, 0], state=cache["state"])
        return self._output(x, o[:, None]), {"state": state}

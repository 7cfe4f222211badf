"""Mamba-1 block (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"):

    x, z = split(x W_in)                       [B, L, d_inner] each (d_inner = expand * d_model)
    x = silu(causal_depthwise_conv1d(x))       kernel d_conv (4)
    dt_low, B, C = split(x W_x)                dt_rank, N, N
    delta = dt_low W_dt   (+ dt bias, softplus, inside the scan)
    y = selective_scan(x, delta, A = -exp(A_log), B, C, D, z)  (gated by silu(z))
    out = y W_out

Init as the paper's code: A_log = log(1..N) per channel (S4D-real), D = 1, dt bias the inverse
softplus of dt ~ logUniform(dt_min, dt_max). Decoding keeps the conv window [B, d_conv-1, d_inner]
and the SSM state [B, d_inner, N] (f32). With causal: false it runs a forward and a reversed scan
with shared weights and sums them (a bidirectional encoder variant).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from mixers.base import ConfigError, Mixer, MixerConfig, causal_conv1d, dense, shard_kernel

_WEIGHTS = ("A", "D", "delta_bias")          # kernel arguments without a batch axis


@dataclasses.dataclass(frozen=True)
class MambaConfig(MixerConfig):
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None          # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        for key in ("d_state", "d_conv", "expand"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError("dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, "
                                        f"{self.dt_max}")


class Mamba(Mixer):
    """Mamba-1 block. Args (MambaConfig): d_state, d_conv, expand, dt_rank, dt_min, dt_max,
    dt_init_floor, causal (false = bidirectional sum of two scans), impl."""

    def __init__(self, cfg: MambaConfig, *, d_model: int, rngs: nnx.Rngs, dtype=None):
        self.cfg, self.causal = cfg, cfg.causal
        d_inner = cfg.expand * d_model
        self.d_inner, n = d_inner, cfg.d_state
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.in_proj = dense(d_model, 2 * d_inner, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        conv_init = nnx.initializers.uniform(2 / math.sqrt(cfg.d_conv))
        self.conv_w = nnx.Param(conv_init(rngs.params(), (cfg.d_conv, d_inner)) - 1 /
                                math.sqrt(cfg.d_conv))
        self.conv_b = nnx.Param(jnp.zeros((d_inner,)))
        self.x_proj = dense(d_inner, self.dt_rank + 2 * n, ("mlp", None), rngs=rngs, dtype=dtype)
        std = self.dt_rank ** -0.5
        dt_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -std, std)
        self.dt_proj = dense(self.dt_rank, d_inner, (None, "mlp"), rngs=rngs, dtype=dtype,
                             init=dt_init)
        u = jax.random.uniform(rngs.params(), (d_inner,))
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))        # inverse softplus
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32),
                                                        (d_inner, n))))
        self.D = nnx.Param(jnp.ones((d_inner,)))
        self.out_proj = dense(d_inner, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def _ssm_inputs(self, x_BLI):
        n = self.cfg.d_state
        dt_low, b, c = jnp.split(self.x_proj(x_BLI), [self.dt_rank, self.dt_rank + n], axis=-1)
        return self.dt_proj(dt_low), b, c

    def _scan(self, x, delta, b, c, z):
        return shard_kernel(pk.selective_scan, u=x, delta=delta, A=-jnp.exp(self.A_log[...]),
                            B=b, C=c, D=self.D[...], z=z, delta_bias=self.dt_bias[...],
                            delta_softplus=True, backend=self.cfg.impl, replicated=_WEIGHTS)

    def __call__(self, x, *, segment_ids=None, positions=None):
        if segment_ids is not None:
            raise ValueError("Mamba does not support segment_ids (packed sequences) yet")
        xz = self.in_proj(x)
        xi, z = jnp.split(xz, 2, axis=-1)
        conv, _ = causal_conv1d(xi, self.conv_w[...], self.conv_b[...])
        xc = jax.nn.silu(conv)
        delta, b, c = self._ssm_inputs(xc)
        y = self._scan(xc, delta, b, c, z)
        if not self.causal:
            flip = lambda t: jnp.flip(t, axis=1)
            conv_r, _ = causal_conv1d(flip(xi), self.conv_w[...], self.conv_b[...])
            xr = jax.nn.silu(conv_r)
            delta_r, b_r, c_r = self._ssm_inputs(xr)
            y = y + flip(self._scan(xr, delta_r, b_r, c_r, flip(z)))
        return self.out_proj(y)

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        if not self.causal:
            raise ValueError("bidirectional Mamba (causal: false) cannot decode")
        return {"conv": jnp.zeros((batch_size, self.cfg.d_conv - 1, self.d_inner), dtype),
                "ssm": jnp.zeros((batch_size, self.d_inner, self.cfg.d_state), jnp.float32)}

    def decode(self, x, cache):
        xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
        conv, conv_state = causal_conv1d(xi, self.conv_w[...], self.conv_b[...], cache["conv"])
        xc = jax.nn.silu(conv)
        delta, b, c = self._ssm_inputs(xc)
        y, ssm = shard_kernel(
            pk.selective_state_update, state=cache["ssm"], u=xc[:, 0], delta=delta[:, 0],
            A=-jnp.exp(self.A_log[...]), B=b[:, 0], C=c[:, 0], D=self.D[...], z=z[:, 0],
            delta_bias=self.dt_bias[...], delta_softplus=True, replicated=_WEIGHTS)
        return self.out_proj(y[:, None].astype(x.dtype)), {"conv": conv_state.astype(
            cache["conv"].dtype), "ssm": ssm}

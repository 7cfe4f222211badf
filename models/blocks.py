"""Pre-norm residual blocks: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)).

Shapes: x [B, L, d_model] in and out. The block owns its mixer's cache (`init_cache`, `decode`).
"""

from __future__ import annotations

import jax
from flax import nnx

from mixers import build_mixer
from mixers.base import axis_metadata, dense


class SwiGLU(nnx.Module):
    """y = (silu(x W_gate) * x W_up) W_down, hidden size `hidden`."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.gate = dense(d_model, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = dense(d_model, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = dense(hidden, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rms_norm(d_model: int, *, rngs: nnx.Rngs, dtype=None, eps: float = 1e-5) -> nnx.RMSNorm:
    return nnx.RMSNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs,
                       scale_metadata=axis_metadata("embed"))


class Block(nnx.Module):
    """One residual layer: a mixer built from `spec` and an optional SwiGLU MLP."""

    def __init__(self, spec: dict, *, d_model: int, mlp_hidden: int, rngs: nnx.Rngs,
                 dtype=None, path: str = "mixer"):
        self.mixer_norm = rms_norm(d_model, rngs=rngs, dtype=dtype)
        self.mixer = build_mixer(spec, d_model=d_model, rngs=rngs, dtype=dtype, path=path)
        self.mlp = self.mlp_norm = nnx.data(None)
        if mlp_hidden > 0:
            self.mlp_norm = rms_norm(d_model, rngs=rngs, dtype=dtype)
            self.mlp = SwiGLU(d_model, mlp_hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x, *, segment_ids=None, positions=None):
        x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def init_cache(self, batch_size, max_length, dtype):
        return self.mixer.init_cache(batch_size, max_length, dtype)

    def decode(self, x, cache):
        y, cache = self.mixer.decode(self.mixer_norm(x), cache)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, cache

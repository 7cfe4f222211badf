"""The Mixer contract and the small layers every mixer shares.

A mixer maps x [B, L, d_model] -> [B, L, d_model] and takes the keyword arguments
`segment_ids` ([B, L] int, packed sequences) and `positions` ([B, L] int, absolute positions).
Mixers that can decode also offer `init_cache(batch_size, max_length, dtype)` and
`decode(x [B, 1, d_model], cache) -> (y [B, 1, d_model], cache)`, one token per call.

Parameters carry logical axis names ("embed", "heads", "mlp", ...) in their variable metadata, so
a mesh can shard them by rules (training.sharding) and they cost nothing on one device. Pallas
kernels are not partitioned by XLA: every mixer calls its kernels through `shard_kernel`, which
runs them inside jax.shard_map over the batch axes of the current mesh (a no-op without one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

IMPLS = ("pallas", "interpret", "tpu_interpret", "reference")
BATCH_AXES = ("data", "fsdp")       # mesh axes that split the batch (training.sharding)


class Mixer(nnx.Module):
    """Base class of every sequence mixer; see the module docstring for the contract."""

    causal: bool = True

    def __call__(self, x, *, segment_ids=None, positions=None):
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not support cached decoding")

    def decode(self, x, cache: dict):
        raise NotImplementedError(f"{type(self).__name__} does not support cached decoding")


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Fields shared by every mixer spec. `impl` picks the kernel path (None = fastest)."""

    causal: bool = True
    impl: str | None = None

    def validate(self, d_model: int) -> None:
        """Raise ValueError(key, message) pairs; the registry prefixes the key path."""
        if self.impl is not None and self.impl not in self.valid_impls():
            raise ConfigError("impl", f"must be one of {self.valid_impls()} or unset, "
                                      f"got {self.impl!r}")

    @classmethod
    def valid_impls(cls) -> tuple[str, ...]:
        return IMPLS


def check_heads(n_heads: int, head_dim: int | None, d_model: int) -> None:
    """n_heads >= 1 and, unless head_dim is given, a divisor of d_model."""
    if n_heads < 1:
        raise ConfigError("n_heads", f"must be >= 1, got {n_heads}")
    if head_dim is None and d_model % n_heads:
        raise ConfigError("n_heads", f"{n_heads} does not divide d_model={d_model}")


class ConfigError(ValueError):
    """A bad config value; `key` is the offending key relative to the section being built."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class Dense(nnx.Linear):
    """nnx.Linear that, under a mesh, gathers its weights where they are used and keeps its
    output split over the batch: with FSDP the weights move, the activations stay put."""

    def __call__(self, inputs, out_sharding=None):
        axes = _batch_axes(inputs.shape[0]) if inputs.ndim > 1 else None
        if not axes:
            return super().__call__(inputs, out_sharding)
        whole = lambda w: None if w is None else jax.lax.with_sharding_constraint(w[...], jax.P())
        inputs, kernel, bias = self.promote_dtype(
            (inputs, whole(self.kernel), whole(self.bias)), dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return jax.lax.with_sharding_constraint(y, jax.P(axes))


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
          rngs: nnx.Rngs, dtype: Any = None, use_bias: bool = False, init=None) -> Dense:
    """A linear layer with a logical-axis annotation on its kernel (and bias)."""
    init = init or nnx.initializers.lecun_normal()
    return Dense(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs,
                 kernel_init=init, kernel_metadata=axis_metadata(*axes),
                 bias_metadata=axis_metadata(axes[1]))


def axis_metadata(*axes: str | None) -> dict:
    """Variable metadata naming logical axes; sharding is applied later, by training.sharding."""
    return {"out_sharding": axes, "eager_sharding": False}


def _batch_axes(batch: int) -> tuple[str, ...] | None:
    """The batch axes of the current mesh (jax.set_mesh) that split `batch` evenly; None when
    no mesh is set (or inside a shard_map over them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes, size = [], 1
    for axis in BATCH_AXES:
        if axis in mesh.axis_names and axis not in mesh.manual_axes and \
                batch % (size * mesh.shape[axis]) == 0:
            axes.append(axis)
            size *= mesh.shape[axis]
    return tuple(axes) or None


def shard_kernel(fn, /, *, replicated: tuple[str, ...] = (), **kwargs):
    """`fn(**kwargs)` (a pallas_kernels function), run per device over the batch.

    With a mesh set by `jax.set_mesh` (the Trainer sets one), the call runs inside jax.shard_map
    over the mesh's batch axes (BATCH_AXES): every array argument is split along its leading
    (batch) axis, except those named in `replicated` (weights such as Mamba's A), which every
    device receives whole; every output is split along its leading axis. Batch axes whose size
    does not divide the batch are left out (the kernel then runs replicated over them). Other
    arguments (flags, sizes, backend) pass through. Without a mesh, and for the pure-jnp
    reference (`backend="reference"`, or unset on CPU), this is `fn(**kwargs)`.
    """
    names = [k for k, v in kwargs.items() if isinstance(v, jax.Array)]
    static = {k: v for k, v in kwargs.items() if k not in names}
    axes = _batch_axes(next(kwargs[k].shape[0] for k in names if k not in replicated))
    backend = kwargs.get("backend")
    if not axes or backend == "reference" or (backend is None and jax.default_backend() == "cpu"):
        return fn(**kwargs)          # the jnp reference: XLA partitions it by itself
    split, mesh = jax.P(axes), jax.sharding.get_abstract_mesh()
    # A `replicated` argument goes in as one copy per device (a broadcast split over the batch
    # axes): its gradient is then the sum of the copies' gradients, taken by XLA outside the
    # shard_map, instead of a psum in shard_map's transpose (which XLA:CPU fails to compile).
    copies = math.prod(mesh.shape[a] for a in axes)
    args = [jnp.broadcast_to(kwargs[k], (copies, *kwargs[k].shape)) if k in replicated
            else kwargs[k] for k in names]

    def per_device(*arrays):
        arrays = [x[0] if k in replicated else x for k, x in zip(names, arrays, strict=True)]
        return fn(**dict(zip(names, arrays, strict=True)), **static)

    # check_vma=False: the kernels build per-device values (zero states, scan carries) that
    # are not marked as varying over the mesh.
    return jax.shard_map(per_device, mesh=mesh, in_specs=split, out_specs=split,
                         check_vma=False)(*args)


def default_positions(x):
    """[B, L] int32 positions 0..L-1."""
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


def rope(x_BLHD, positions_BL, theta: float = 10000.0):
    """Rotary position embedding (Su et al. 2021), rotating halves of the head dimension."""
    d = x_BLHD.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
    angle = positions_BL[..., None, None].astype(jnp.float32) * freq      # [B, L, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHD.dtype)


def causal_conv1d(x_BLC, kernel_KC, bias_C=None, state_BKC=None):
    """Depthwise causal convolution: y_t = sum_j kernel[j] * x_{t - K + 1 + j}.

    `state_BKC` [B, K-1, C] holds the inputs before x (zeros when None). Returns
    (y [B, L, C], new_state [B, K-1, C]): the last K-1 inputs, for the next call.
    """
    k = kernel_KC.shape[0]
    if state_BKC is None:
        state_BKC = jnp.zeros((x_BLC.shape[0], k - 1, x_BLC.shape[2]), x_BLC.dtype)
    xp = jnp.concatenate([state_BKC.astype(x_BLC.dtype), x_BLC], axis=1)
    length = x_BLC.shape[1]
    y = sum(xp[:, j:j + length] * kernel_KC[j].astype(x_BLC.dtype) for j in range(k))
    if bias_C is not None:
        y = y + bias_C.astype(x_BLC.dtype)
    return y, xp[:, xp.shape[1] - (k - 1):]


def segment_positions(segment_ids):
    """Position inside each packed segment: [B, L] int32 (restarts at 0 at every new id)."""
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    idx = jnp.arange(segment_ids.shape[1])[None]
    last_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return (idx - last_start).astype(jnp.int32)

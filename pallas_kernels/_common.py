"""Helpers shared by every kernel family: backend choice, padding, argument checks.

Backends (the `backend=` argument of every public kernel function):
  None         -> the fastest for the platform: Pallas on GPU/TPU, the reference on CPU.
  "pallas"     -> the Pallas kernel compiled for the current platform (GPU or TPU).
  "interpret"  -> the Pallas kernel in interpret mode (runs anywhere; used by CPU tests).
  "tpu_interpret" -> the Mosaic TPU kernel in TPU interpret mode (pltpu.InterpretParams), CPU.
  "reference"  -> the pure-jnp reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BACKENDS = ("pallas", "interpret", "tpu_interpret", "reference")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def platform() -> str:
    """The default JAX platform: 'gpu', 'tpu' or 'cpu'."""
    return jax.default_backend()


def resolve_backend(backend: str | None, *, has_kernel: bool = True) -> str:
    """Map a user's `backend` argument to one of BACKENDS.

    `has_kernel=False` marks a kernel family whose Pallas kernel does not exist yet: `None`
    then falls back to the reference, and an explicit Pallas backend is an error.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {(None,) + BACKENDS}")
    if backend is None:
        if has_kernel and platform() in ("gpu", "tpu"):
            return "pallas"
        return "reference"
    if backend != "reference" and not has_kernel:
        raise ValueError(f"backend={backend!r}: this kernel has no Pallas implementation yet; "
                         "use backend='reference' or None")
    if backend == "pallas" and platform() not in ("gpu", "tpu"):
        raise ValueError("backend='pallas' needs a GPU or TPU; on CPU use backend='interpret' "
                         "or 'reference'")
    return backend


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pad `x` along `axis` at the end so its size is a multiple of `multiple`."""
    size = x.shape[axis]
    extra = round_up(size, multiple) - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """Raise ValueError unless `x` has `rank` dimensions (`layout` names them)."""
    if not hasattr(x, "shape") or x.ndim != rank:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {shape}")


def check_float(name: str, x) -> None:
    """Raise ValueError unless `x` is float32, bfloat16 or float16."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_dim(name: str, x, axis: int, expected: int, layout: str) -> None:
    """Raise ValueError unless x.shape[axis] == expected."""
    if x.shape[axis] != expected:
        raise ValueError(f"{name} must have shape {layout} with dimension {axis} equal to "
                         f"{expected}, got {tuple(x.shape)}")


def lse_attention_vjp(forward, backward):
    """Softmax attention as a jax.custom_vjp from forward(q, k, v, idx, cfg) -> (o, lse) and
    backward(q, k, v, idx, o, lse, do, cfg) -> (dq, dk, dv): the backward recomputes P from
    the saved log-sum-exp (FlashAttention-2). `idx` (segment ids, row indices) gets no
    gradient; `cfg` is static (hashable). Used by the flash attention kernels (GPU, TPU) and
    ProbSparse's active rows."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attend(q, k, v, idx, cfg):
        return forward(q, k, v, idx, cfg)[0]

    def fwd_rule(q, k, v, idx, cfg):
        o, lse = forward(q, k, v, idx, cfg)
        return o, (q, k, v, idx, o, lse)

    def bwd_rule(cfg, res, do):
        q, k, v, idx, o, lse = res
        return (*backward(q, k, v, idx, o, lse, do, cfg), None)

    attend.defvjp(fwd_rule, bwd_rule)
    return attend

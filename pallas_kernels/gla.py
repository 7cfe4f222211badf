"""Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"): references and the public dispatch.

Per batch and head, with state S [Dk, Dv] kept in float32:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

Shapes: q/k [B, L, H, Dk], v [B, L, H, Dv], log_g [B, L, H, Dk] (log forget gate, <= 0),
initial/final state [B, H, Dk, Dv] float32, output [B, L, H, Dv] in the dtype of v.

Two references: `gla_recurrent_reference` runs the recurrence step by step (the ground truth of
the tests); `gla_chunked_reference` is the chunkwise form (intra-chunk attention-like matmuls plus
an inter-chunk state recurrence) that makes long sequences usable on CPU. In the chunked form every
exponent is a difference b_t - b_s of cumulative log gates with s <= t, hence <= 0: nothing
overflows however strong the decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels import _common


def gla_recurrent_reference(q, k, v, log_g, *, scale=None, initial_state=None):
    """Step-by-step recurrence. Returns (o [B, L, H, Dv], final_state [B, H, Dk, Dv])."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def step(state_BHKV, xs):
        q_t, k_t, v_t, g_t = (x.astype(jnp.float32) for x in xs)
        state_BHKV = (jnp.exp(g_t)[..., None] * state_BHKV
                      + k_t[..., :, None] * v_t[..., None, :])
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state_BHKV)
        return state_BHKV, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_g))
    final, o_LBHV = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o_LBHV, 0, 1).astype(v.dtype), final


def gla_chunked_reference(q, k, v, log_g, *, scale=None, initial_state=None, chunk_size=16):
    """Chunkwise form in jnp. Returns (o [B, L, H, Dv], final_state [B, H, Dk, Dv])."""
    b, length, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    c = chunk_size
    # Padding with log_g = 0 and k = v = 0 leaves the state unchanged past the end.
    q, k, v, log_g = (_common.pad_axis(x.astype(jnp.float32), 1, c) for x in (q, k, v, log_g))
    to_chunks = lambda x: rearrange(x, "b (n c) h d -> n b h c d", c=c)
    q_N, k_N, v_N, g_N = map(to_chunks, (q, k, v, log_g))
    b_N = jnp.cumsum(g_N, axis=3)                          # cumulative log gate in the chunk
    b_last = b_N[:, :, :, -1:, :]                          # [N, B, H, 1, Dk]

    # Intra-chunk: A[t, s] = sum_d q_td k_sd exp(b_td - b_sd) for s <= t.
    causal = jnp.tril(jnp.ones((c, c), bool))
    diff = b_N[:, :, :, :, None, :] - b_N[:, :, :, None, :, :]       # [N, B, H, C, C, Dk]
    decay = jnp.exp(jnp.where(causal[..., None], diff, -jnp.inf))
    a = jnp.einsum("nbhtd,nbhsd,nbhtsd->nbhts", q_N, k_N, decay)
    o_intra = jnp.einsum("nbhts,nbhsv->nbhtv", a, v_N)

    q_in = q_N * jnp.exp(b_N)                              # reads the state entering the chunk
    k_out = k_N * jnp.exp(b_last - b_N)                    # writes the state leaving the chunk

    def step(state_BHKV, xs):
        q_in_c, k_out_c, v_c, b_last_c = xs
        o_inter = jnp.einsum("bhtk,bhkv->bhtv", q_in_c, state_BHKV)
        state_BHKV = (jnp.exp(b_last_c[:, :, 0, :, None]) * state_BHKV
                      + jnp.einsum("bhtk,bhtv->bhkv", k_out_c, v_c))
        return state_BHKV, o_inter

    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    final, o_inter = jax.lax.scan(step, s0, (q_in, k_out, v_N, b_last))
    o = scale * (o_intra + o_inter)
    o = rearrange(o, "n b h c v -> b (n c) h v")[:, :length]
    return o.astype(v.dtype), final


def gla_step(q, k, v, log_g, state, *, scale=None):
    """One decoding step: q/k/log_g [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv] f32.

    Returns (o [B, H, Dv], new_state). Exactly one step of the recurrence.
    """
    dk = q.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    state = jnp.exp(f32(log_g))[..., None] * state + f32(k)[..., :, None] * f32(v)[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", f32(q), state)
    return o.astype(v.dtype), state


def _check_gla_args(q, k, v, log_g, initial_state):
    for name, x in (("q", q), ("k", k), ("v", v), ("log_g", log_g)):
        _common.check_rank(name, x, 4, "[batch, length, heads, dim]")
        _common.check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape} [B, L, H, Dk], got {k.shape}")
    if log_g.shape != q.shape:
        raise ValueError(f"log_g must have the shape of q {q.shape} [B, L, H, Dk], "
                         f"got {log_g.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [{', '.join(map(str, q.shape[:3]))}, Dv], "
                         f"got {v.shape}")
    if initial_state is not None:
        b, _, h, dk = q.shape
        expected = (b, h, dk, v.shape[-1])
        if initial_state.shape != expected:
            raise ValueError(f"initial_state must have shape [B, H, Dk, Dv] = {expected}, "
                             f"got {initial_state.shape}")


def gla(q, k, v, log_g, *, scale=None, initial_state=None, return_state=False, backend=None):
    """Gated linear attention; see the module docstring. Returns o or (o, final_state)."""
    _check_gla_args(q, k, v, log_g, initial_state)
    backend = _common.resolve_backend(backend, has_kernel=False)
    o, final = gla_chunked_reference(q, k, v, log_g, scale=scale, initial_state=initial_state)
    return (o, final) if return_state else o

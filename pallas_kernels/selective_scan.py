"""Mamba-1 selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"): references and the public dispatch.

Per batch, channel d and state index n, with state h [B, Dn, N] kept in float32:

    delta_t = softplus(delta_t + delta_bias)      (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,       then  y_t *= silu(z_t)  when z is given

Shapes: u/delta/z [B, L, Dn]; A [Dn, N]; B/C [B, L, N] or grouped [B, L, G, N] (channel d uses
group d // (Dn // G)); D/delta_bias [Dn]; state [B, Dn, N] f32; y [B, L, Dn] in the dtype of u.

`selective_scan_reference(method=...)`: "scan" steps through time with lax.scan (the ground truth
of the tests); "associative" runs lax.associative_scan over the whole length (materialises
[B, L, Dn, N]); "chunked" (default) runs an associative scan inside chunks of 64 and carries the
state between chunks with lax.scan, so memory stays O(B * 64 * Dn * N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, repeat

from pallas_kernels import _common


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Cast to f32, apply bias/softplus, expand groups to channels: B/C -> [B, L, Dn, N]."""
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    u, delta, A, B, C, D, z = map(f32, (u, delta, A, B, C, D, z))
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    dn = u.shape[-1]
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    groups = B.shape[2]
    B = repeat(B, "b l g n -> b l (g r) n", r=dn // groups)
    C = repeat(C, "b l g n -> b l (g r) n", r=dn // groups)
    return u, delta, A, B, C, D, z


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * jax.nn.silu(z)
    return y.astype(dtype)


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def selective_scan_reference(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                             delta_softplus=False, initial_state=None, method="chunked",
                             chunk_size=64):
    """Returns (y [B, L, Dn], final_state [B, Dn, N] f32)."""
    dtype = u.dtype
    u, delta, A, B, C, D, z = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    bsz, length, dn = u.shape
    h0 = (jnp.zeros((bsz, dn, A.shape[1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    if method == "scan":
        def step(h_BDN, xs):
            u_t, dt_t, b_t, c_t = xs
            h_BDN = jnp.exp(dt_t[..., None] * A) * h_BDN + (dt_t * u_t)[..., None] * b_t
            return h_BDN, jnp.einsum("bdn,bdn->bd", h_BDN, c_t)
        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C))
        final, y = jax.lax.scan(step, h0, xs)
        return _finish(jnp.moveaxis(y, 0, 1), u, D, z, dtype), final

    if method == "associative":
        a = jnp.exp(delta[..., None] * A)                              # [B, L, Dn, N]
        bx = (delta * u)[..., None] * B
        bx = bx.at[:, 0].add(a[:, 0] * h0)
        _, h = jax.lax.associative_scan(_combine, (a, bx), axis=1)
        y = jnp.einsum("bldn,bldn->bld", h, C)
        return _finish(y, u, D, z, dtype), h[:, -1]

    if method != "chunked":
        raise ValueError(f"method must be 'scan', 'associative' or 'chunked', got {method!r}")
    c = chunk_size
    # Padding with delta = 0 makes exp(0 * A) = 1 and adds nothing: the state passes unchanged.
    pad = lambda x: _common.pad_axis(x, 1, c)
    to_chunks = lambda x: rearrange(pad(x), "b (n c) ... -> n b c ...", c=c)
    u_N, dt_N, B_N, C_N = map(to_chunks, (u, delta, B, C))

    def chunk(h_BDN, xs):
        u_c, dt_c, b_c, c_c = xs
        a = jnp.exp(dt_c[..., None] * A)
        bx = (dt_c * u_c)[..., None] * b_c
        bx = bx.at[:, 0].add(a[:, 0] * h_BDN)
        _, h = jax.lax.associative_scan(_combine, (a, bx), axis=1)
        return h[:, -1], jnp.einsum("bcdn,bcdn->bcd", h, c_c)

    final, y = jax.lax.scan(chunk, h0, (u_N, dt_N, B_N, C_N))
    y = rearrange(y, "n b c d -> b (n c) d")[:, :length]
    return _finish(y, u, D, z, dtype), final


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """One decoding step: state [B, Dn, N] f32, u/delta/z [B, Dn], B/C [B, N] or [B, G, N].

    Returns (y [B, Dn], new_state).
    """
    y, new_state = selective_scan_reference(
        u[:, None], delta[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], delta_bias=delta_bias,
        delta_softplus=delta_softplus, initial_state=state, method="scan")
    return y[:, 0], new_state


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    _common.check_rank("u", u, 3, "[batch, length, channels]")
    _common.check_float("u", u)
    bsz, length, dn = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {u.shape} [B, L, Dn], got {delta.shape}")
    _common.check_rank("A", A, 2, "[channels, d_state]")
    if A.shape[0] != dn:
        raise ValueError(f"A must have shape [Dn={dn}, N], got {A.shape}")
    n = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.ndim not in (3, 4) or x.shape[:2] != (bsz, length) or x.shape[-1] != n:
            raise ValueError(f"{name} must have shape [B={bsz}, L={length}, N={n}] or "
                             f"[B, L, G, N], got {x.shape}")
        if x.ndim == 4 and dn % x.shape[2]:
            raise ValueError(f"{name} groups G={x.shape[2]} must divide Dn={dn}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {B.shape} and {C.shape}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and x.shape != (dn,):
            raise ValueError(f"{name} must have shape [Dn={dn}], got {x.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {u.shape}, got {z.shape}")
    if initial_state is not None and initial_state.shape != (bsz, dn, n):
        raise ValueError(f"initial_state must have shape [B, Dn, N] = {(bsz, dn, n)}, "
                         f"got {initial_state.shape}")


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_state=False, backend=None):
    """Mamba-1 selective scan; see the module docstring. Returns y or (y, final_state)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = _common.resolve_backend(backend, has_kernel=False)
    y, final = selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus,
                                        initial_state=initial_state)
    return (y, final) if return_state else y

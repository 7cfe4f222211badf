"""Mamba-1 selective scan forward on Hopper through Pallas's Mosaic GPU lowering.

One warpgroup (128 threads) per program, one channel per thread with all N states of the
channel in that thread's registers (the Lane semantics' [128] arrays in the WG_STRIDED layout:
one element per thread), so that y_t = <C_t, h_t> is thread-local. Grid (batch, Dn / 128); time
runs through `plgpu.emit_pipeline` over chunks of `chunk` steps: each chunk's u/delta(/z) rows
[chunk, 128] and its B/C rows [chunk, 2N] arrive by TMA into shared memory, `stages` chunks
ahead, and each step reads B_t[n], C_t[n] as scalars from shared memory (one address for the
whole warp: a broadcast `ld.shared`), not from L2 as the Triton kernels must. y rows go to a
shared-memory tile stored by TMA. The training forward also stores the state every `ck_every`
steps ([B, Lp / ck_every, N, Dp] f32, the checkpoint layout of the Triton backward in
`selective_scan.py`, which consumes them). Notes and measurements:
docs/kernels/selective_scan.md ("Session 6").

Limits (the caller falls back to the Triton kernels otherwise): Dn a multiple of 128 when B/C
are grouped (Dn / G too), float inputs; any L (padded to the chunk; padded steps get delta 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common

_WG = 128                     # threads of a warpgroup = channels per program
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def supported(dn: int, groups: int) -> bool:
    """Whether the Mosaic GPU forward takes these shapes (else the Triton kernels run)."""
    if groups == 1:
        return True
    return dn % groups == 0 and (dn // groups) % _WG == 0


def _softplus(x, approx):
    """softplus(x) = ln2 * log2(1 + 2^(x log2 e)), identity above 20; for e < 2^-6 the series
    e - e^2/2 + e^3/3 (1 + e would drop e's low bits). With approx_math the exp2/log2 are
    ex2/lg2.approx.ftz (one MUFU op each)."""
    del approx   # the kernel's compiler params decide
    e = jnp.exp2(jnp.minimum(x, 20.0) * _LOG2E)
    big = jnp.log2(1.0 + e) * _LN2
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return jnp.where(x > 20.0, x, jnp.where(e < 2.0 ** -6, small, big))


def _fwd_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, save_ckpt,
              ck_every, stages):
    """The kernel of one (batch, 128-channel block) program; see the module docstring. A
    hand-written pipeline over chunks (emit_pipeline's predicated output copies do not run in
    GPU interpret mode): chunk c's inputs land in slot c % stages by TMA, issued `stages`
    chunks ahead; its outputs leave from the same slot of the output buffers by TMA."""
    has_z = "z" in opts
    seq_in = ["u", "dt", "bc", *(["z"] if has_z else [])]
    outs = ["y", *(["ck"] if save_ckpt else [])]
    names = ["u", "dt", "a", "bc", *opts, "y", "hT", *(["ck"] if save_ckpt else []),
             "a_s", "p_s", "h_s", "bar", *[k + "_s" for k in seq_in + outs], "in_bar"]
    r = dict(zip(names, refs, strict=True))
    f32 = jnp.float32
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("j")
    cols = pl.ds(j * _WG, _WG)
    groups = r["bc"].shape[1]
    g = j * _WG * groups // r["u"].shape[2]      # the group of this channel block

    def fetch(c, slot):      # chunk c's input rows into `slot` (one barrier for all of them)
        rows = pl.ds(c * chunk, chunk)
        for k in seq_in:
            src = r["bc"].at[b, g, rows] if k == "bc" else r[k].at[b, rows, cols]
            plgpu.copy_gmem_to_smem(src, r[k + "_s"].at[slot], r["in_bar"].at[slot])

    for s in range(min(stages, n_chunks)):
        fetch(s, s)
    # one-time parameters: A^T log2(e) [N, 128], D, bias [128] rows and h0 [N, 128]
    plgpu.copy_gmem_to_smem(r["a"].at[:, cols], r["a_s"], r["bar"].at[0])
    vec_names = [k for k in ("d", "bias") if k in opts]
    for i, k in enumerate(vec_names):
        plgpu.copy_gmem_to_smem(r[k].at[cols], r["p_s"].at[i], r["bar"].at[1 + i])
    if "h0" in opts:
        plgpu.copy_gmem_to_smem(r["h0"].at[b, :, cols], r["h_s"], r["bar"].at[3])
    plgpu.barrier_wait(r["bar"].at[0])
    a2 = [r["a_s"][n] for n in range(n_state)]
    vec = {}
    for i, k in enumerate(vec_names):
        plgpu.barrier_wait(r["bar"].at[1 + i])
        vec[k] = r["p_s"][i]
    if "h0" in opts:
        plgpu.barrier_wait(r["bar"].at[3])
        h0 = tuple(r["h_s"][n] for n in range(n_state))
    else:
        h0 = tuple(jnp.zeros((_WG,), f32) for _ in range(n_state))

    def chunk_body(c, carry):
        slot = jax.lax.rem(c, stages)
        u_s, dt_s, bc_s = (r[k + "_s"].at[slot] for k in ("u", "dt", "bc"))
        z_s = r["z_s"].at[slot] if has_z else None
        y_s = r["y_s"].at[slot]
        ck_s = r["ck_s"].at[slot] if save_ckpt else None
        plgpu.barrier_wait(r["in_bar"].at[slot])
        # the output slot's previous store (chunk c - stages) must have read it
        plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
        h = list(carry)
        for t in range(chunk):
            if save_ckpt and t % ck_every == 0:
                for n in range(n_state):
                    ck_s[t // ck_every, n] = h[n]
            u = u_s[t].astype(f32)
            x = dt_s[t].astype(f32)
            if "bias" in vec:
                x = x + vec["bias"]
            dt = _softplus(x, True) if softplus else x
            if padded:
                dt = jnp.where(c * chunk + t < length, dt, 0.0)
            dtu = dt * u
            y = None
            for n in range(n_state):
                e = jnp.exp2(dt * a2[n])
                h[n] = e * h[n] + dtu * bc_s[t, n]
                hc = h[n] * bc_s[t, n_state + n]
                y = hc if y is None else y + hc
            if "d" in vec:
                y = y + vec["d"] * u
            if has_z:
                zz = z_s[t].astype(f32)
                y = y * (zz / (1.0 + jnp.exp2(zz * -_LOG2E)))
            y_s[t] = y.astype(y_s.dtype)
        plgpu.commit_smem()   # every thread is done with the input slot and wrote its outputs
        plgpu.copy_smem_to_gmem(y_s, r["y"].at[b, pl.ds(c * chunk, chunk), cols],
                                commit_group=False)
        if save_ckpt:
            per = chunk // ck_every
            plgpu.copy_smem_to_gmem(ck_s, r["ck"].at[b, pl.ds(c * per, per), :, cols],
                                    commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(c + stages < n_chunks)
        def _():
            fetch(c + stages, slot)
        return tuple(h)

    h = jax.lax.fori_loop(0, n_chunks, chunk_body, h0)
    for n in range(n_state):
        r["h_s"][n] = h[n]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r["h_s"], r["hT"].at[b, :, cols])
    plgpu.wait_smem_to_gmem(0)


def forward(u, delta, A, B, C, D, z, delta_bias, h0, *, softplus, save_ckpt, chunk=16,
            ck_every=4, stages=2, interpret=False):
    """Runs the Mosaic GPU forward; returns (y [B, L, Dn], final [B, Dn, N] f32, ckpts or
    None): ckpts [B, Lp / ck_every, N, Dp] f32, the state before every ck_every-th step."""
    f32 = jnp.float32
    bsz, length, dn = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[2]
    if not supported(dn, groups):
        raise ValueError(f"selective_scan_mgpu: Dn={dn} with G={groups} groups is not a "
                         f"multiple of {_WG} channels per group")
    dp = _common.round_up(dn, _WG)
    lp = _common.round_up(length, chunk)
    seq = lambda x: _common.pad_axis(_common.pad_axis(x, 1, chunk), 2, _WG)
    vec = lambda x: _common.pad_axis(x.astype(f32), 0, _WG)
    # B and C as one [B, G, Lp, 2N'] f32 array (2N' = 2N rounded up to 4: a TMA row is
    # at least 16 bytes)
    bc = jnp.concatenate([B.astype(f32), C.astype(f32)], -1)
    bc = _common.pad_axis(_common.pad_axis(bc, 1, chunk), 3, 4)
    bc = jnp.swapaxes(bc, 1, 2)
    a2 = _common.pad_axis(A.astype(f32).T * _LOG2E, 1, _WG)
    arrays = [seq(u), seq(delta), a2, bc]
    opts = []
    for name, x in (("z", z), ("d", D), ("bias", delta_bias), ("h0", h0)):
        if x is None:
            continue
        opts.append(name)
        if name == "z":
            arrays.append(seq(x))
        elif name == "h0":
            arrays.append(_common.pad_axis(jnp.swapaxes(x.astype(f32), 1, 2), 2, _WG))
        else:
            arrays.append(vec(x))
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), u.dtype),
                 jax.ShapeDtypeStruct((bsz, n, dp), f32)]
    if save_ckpt:
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp // ck_every, n, dp), f32))
    n_chunks = lp // chunk
    stages = min(stages, n_chunks)
    seq_bufs = [plgpu.SMEM((stages, chunk, _WG), x.dtype) for x in (u, delta)]
    seq_bufs.append(plgpu.SMEM((stages, chunk, bc.shape[-1]), f32))
    if z is not None:
        seq_bufs.append(plgpu.SMEM((stages, chunk, _WG), z.dtype))
    seq_bufs.append(plgpu.SMEM((stages, chunk, _WG), u.dtype))
    if save_ckpt:
        seq_bufs.append(plgpu.SMEM((stages, chunk // ck_every, n, _WG), f32))
    scratch = [plgpu.SMEM((n, _WG), f32), plgpu.SMEM((2, _WG), f32), plgpu.SMEM((n, _WG), f32),
               plgpu.Barrier(num_barriers=4), *seq_bufs,
               plgpu.Barrier(num_arrivals=3 + (z is not None), num_barriers=stages)]
    body = functools.partial(
        _fwd_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks,
        length=length, padded=lp != length, softplus=softplus, save_ckpt=save_ckpt,
        ck_every=ck_every, stages=stages)
    outs = plgpu.kernel(
        body, out_type=out_shape, grid=(bsz, dp // _WG), grid_names=("b", "j"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="selective_scan_fwd_mgpu" + ("_ck" if save_ckpt else ""))(*arrays)
    y = outs[0][:, :length, :dn]
    final = jnp.swapaxes(outs[1][:, :, :dn], 1, 2)
    return y, final, (outs[2] if save_ckpt else None)

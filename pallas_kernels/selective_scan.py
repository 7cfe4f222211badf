"""Mamba-1 selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"): references, fused Pallas kernels (forward, backward, decode step) and dispatch.

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

Kernels (notes and measurements: docs/kernels/selective_scan.md):
- GPU-style (Triton lowering; `backend="interpret"` on CPU): grid (batch, channel blocks), one
  warp per program with two lanes per channel (each holding half of the N states), the state
  in registers, B_t/C_t as one lane row per step shuffled out per state, time in unrolled
  chunks; the training forward keeps only the state at each chunk start and the backward
  recomputes a chunk from it before its reverse scan (`selective_scan_pallas`). Gradients of
  every input through jax.custom_vjp, reduced without atomics (dB/dC by a lane butterfly per
  step and per-block partial sums).
- Mosaic TPU (`backend="tpu_interpret"`, or "pallas" on a TPU): grid (batch, channel blocks,
  chunks), the state in VMEM scratch (`selective_scan_tpu`).
- `selective_state_update`: one decoding step on a [block_d, N] tile, state updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, repeat
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

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


def selective_state_update_reference(state, u, delta, A, B, C, *, D=None, z=None,
                                     delta_bias=None, delta_softplus=False):
    """One decoding step in jnp; see `selective_state_update`."""
    y, new_state = selective_scan_reference(
        u[:, None], delta[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], delta_bias=delta_bias,
        delta_softplus=delta_softplus, initial_state=state, method="scan")
    return y[:, 0], new_state


# ---------------------------------------------------------------------------------------------
# GPU-style Pallas kernels (Triton lowering on GPU; interpret mode on CPU).
#
# Grid (batch, channel blocks). A program owns `block_d` channels of one batch row and keeps
# their state as N separate [block_d] f32 vectors, so a thread holds whole state rows: the sum
# over N that gives y_t is thread-local and the [block_d, N] discretised terms never leave
# registers. Time runs in a fori_loop over chunks of `chunk` steps, each chunk unrolled in
# Python; the chunk's [block_d] rows are loaded one chunk ahead (see `_load_chunk`).
# The training forward stores the state at every chunk start (`ck`); the backward walks the
# chunks in reverse, recomputes the chunk's states from its checkpoint and runs the reverse scan.
# exp(dt * A) is computed as exp2(dt * A * log2(e)): one MUFU instruction on NVIDIA GPUs.

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_OPTIONAL = ("z", "d", "bias", "h0")


def optional_inputs(z, D, delta_bias, h0, *, seq, vec, state):
    """The optional inputs that are given, in kernel order (`_OPTIONAL`), as (name, array)
    pairs in kernel layouts: z through `seq`, D and delta_bias through `vec`, h0 through
    `state` (shared by the Triton and the Mosaic GPU wrappers)."""
    how = {"z": seq, "d": vec, "bias": vec, "h0": state}
    return [(name, how[name](x)) for name, x in zip(_OPTIONAL, (z, D, delta_bias, h0),
                                                    strict=True) if x is not None]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel configuration (hashable: it is a nondiff argument of the custom_vjp)."""
    softplus: bool
    chunk: int = 8            # steps per chunk of the training forward and the backward
    fwd_chunk: int = 16       # steps per chunk of the inference forward (no checkpoints)
    block_d: int = 32         # channels per program (rounded down to fit groups)
    num_warps: int = 1
    ahead: int = 0            # forward: B/C scalars load this many steps before their use
    bwd_ahead: int = 0        # the same in the backward
    lane_reduce: bool = False  # backward: dB/dC reduced by one lane butterfly per step
    fast_exp: bool = False    # ex2/lg2.approx.ftz for the decays and softplus (see _softplus)
    split: int = 1            # forward: lanes per channel (each owns N / split states); 0: 4
                              # when that grid fits one wave (_auto_fwd_split), else 2
    bwd_split: int = 1        # the same in the backward (needs lane_reduce); 0: 2 when the
                              # split grid fits one wave (_auto_bwd_split), else 1
    keep_decay: bool = False  # backward: the recompute's decays stay in registers for the
                              # reverse pass (one exp per element instead of two)
    bc_rows: bool | str = False  # B_t/C_t as one [32]-lane row per step (loaded a chunk ahead
                              # with u/delta), each lane's values taken by shfl.idx; "fwd" or
                              # "bwd": in that kernel only
    xor_reduce: bool = False  # backward, N = 16: states permuted per lane so that the dB/dC
                              # butterfly needs no selects (see _xor_reduce)
    poly_exp: int = 0         # forward: this many of a lane's states take exp2 as a polynomial
                              # on the FMA pipes instead of the MUFU (_exp2_poly)
    share_dt: bool | str = False  # forward, split S: each lane part computes delta (bias,
                              # softplus) for one step of S and the others take it by shuffle;
                              # "auto": not in a training forward of `chunk`-step chunks
    dbc_bf16: bool = False    # backward: the per-block dB/dC partials in bf16 when B and C are
                              # bf16 (half the bytes; summed in f32 outside)
    bwd_share: bool = False   # backward, split S: per-channel work once per channel-step
                              # (delta by shuffle, the step's end reduce-scattered over parts)
    ck_unroll: bool | str | int = False  # training forward unrolled over fwd_chunk steps
                              # like the inference forward, checkpoints still every `chunk`;
                              # "auto": while its grid fits one wave (_auto_ck_unroll); an
                              # int: over that many steps instead of fwd_chunk
    ck_copy: bool = False     # training forward: checkpoints stored from copies of the state;
                              # with state_tile: stored row by row out of the tile
    bwd_tile: bool = False    # backward in state_tile's layout (N = 16; _bwd_tile_kernel)
    state_tile: bool = False  # forward: one lane per channel holding all N states as an
                              # [N, 32] tile, B/C rows broadcast to the lanes (_fwd_tile_kernel);
                              # the B/C rows load `ahead` steps early
    mgpu: bool | str = False  # forward through the Mosaic GPU kernel (selective_scan_mgpu: one
                              # channel per thread, B/C rows by TMA into shared memory): "fwd"
                              # the inference forward only, True the training forward too;
                              # "auto": True on a Hopper GPU (not in interpret mode)
    mgpu_chunk: int = 16      # steps per TMA chunk of the Mosaic GPU forward
    mgpu_split: int = 1       # its inference forward: 2 threads per channel (N / 2 states
                              # each); the training forward takes mgpu_bwd_split
    mgpu_stages: int = 2      # chunks in flight (shared-memory slots) of the Mosaic GPU kernels
    mgpu_bwd: bool = False    # with mgpu=True: the backward through Mosaic GPU too (N <= 16,
                              # chunk 4; selective_scan_mgpu.backward)
    mgpu_keep: bool = True    # its reverse steps reuse the recompute's decays (64 registers)
    mgpu_bwd_split: int = 1   # its threads per channel, and the training forward's; 0:
                              # 1 where _mgpu_one_per_sm or the pair backward runs, else 2
    mgpu_vec: bool = True     # Mosaic kernels: B/C by ld.shared.v4 (inline_mgpu), else scalars
    mgpu_ck_unsplit: bool = False  # the Mosaic training forward with one thread per channel
                              # whatever the backward's split (its checkpoints read as parts)
    mgpu_unroll: int = 0      # Mosaic forward (one thread per channel): a loop over groups of
                              # this many unrolled steps per chunk (0: the whole chunk unrolled)
    mgpu_yacc: int = 1        # Mosaic forward: y_t = <C_t, h_t> in this many partial sums
    mgpu_bwd_loop: bool | int | str = False  # Mosaic backward: a chunk's 4-step sub-chunks as
                              # a loop (an int: that many sub-chunks unrolled per iteration);
                              # "auto": for the one-thread backward
    mgpu_pair: bool | str = False  # Mosaic inference forward with two lanes per channel in
                              # one warp (selective_scan_mgpu.forward_pair; N even); "train":
                              # the training forward too (its checkpoints in the one-thread
                              # layout); "auto": "train" where _mgpu_one_per_sm, else False
    mgpu_pair_chunk: int = 32  # steps per chunk of the pair inference forward
    mgpu_pair_inf: tuple | None = None  # session 9: the pair inference forward's options
                              # ((name, value) pairs: ahead, cross, ybuf, poly, idx, sp1,
                              # ydefer, rawp, bcin) through
                              # selective_scan_mgpu._fwd_pair_inf_body; None:
                              # _fwd_pair_body (v8). selective_scan_pallas's default (v10):
                              # sp1 + ydefer 16 (session 9 call 2: -5.6 % / -6.0 %) + rawp +
                              # ybuf 3 (session 10: -2.1 to -3.4 % at 2k, -0.9 % at 8k)
    mgpu_pair_train_opts: tuple | None = None  # the pair TRAINING forward's opt-in options
                              # ((name, value) pairs: ydefer, sp1, rawp; selective_scan_mgpu.
                              # _fwd_pair_body); None: as in v9; selective_scan_pallas's
                              # default (v10): ydefer 8 (session 10: -2.8 % fwd+bwd)
    mgpu_bwd_ahead: bool = False  # Mosaic backward: the next sub-chunk's recompute overlaps
                              # this one's dB/dC sums (between their two barriers)
    mgpu_poly: int = 0        # Mosaic forward: this many of a thread's states take exp2 as an
                              # FMA-pipe polynomial instead of the MUFU
    mgpu_skew: bool = False   # Mosaic forward with mgpu_unroll: the next group's first step
                              # prepared (delta, decays, B/C) at the end of a group
    mgpu_pair_parts: int = 2  # lanes per channel of the pair inference forward (2 or 4)
    mgpu_pair_train_parts: int = 2  # and of the pair training forward (mgpu_pair="train")
    mgpu_pair_train_chunk: int = 0  # steps per chunk of the pair training forward (0:
                              # mgpu_chunk, the backward's; a multiple of it)
    mgpu_bwd_pair: bool | int = False  # Mosaic backward with two (True or 2; 4: four) lanes
                              # per channel in one warp (selective_scan_mgpu.backward_pair)
                              # where the one-thread backward would run and it takes the shape
    mgpu_bwd_rowsum: bool | str | int = False  # Mosaic backwards: each thread's dB/dC row summed by
                              # vector loads in registers (_row_sums: no [128, 4] round trip
                              # and its barrier; the barrier moves before the next red stores);
                              # "auto": in the one-thread and pair backwards, not the two-thread
    mgpu_ck_pair: bool | str = False  # the pair training forward's checkpoints in the ck2 layout
                              # [B, Lp / 4, N / 2, Dp, 2] (conflict-free stores and pair reads,
                              # one 8-byte load per 2 states in the one-thread backward) where
                              # the backward is the Mosaic one-thread or pair one (_mgpu_ck2);
                              # "direct": stored from registers by st.global (no shared memory)
    mgpu_bwd_keep_b: bool = False  # Mosaic pair backward: the recompute's B_t stay in
                              # registers for the reverse steps (a third fewer B/C loads)
    mgpu_ck_late: bool = False  # Mosaic pair training forward: a checkpoint's stores after the
                              # step group that follows it (no wait for the store to read h)
    mgpu_bwd_pad_rows: bool = False  # Mosaic pair backward: input step rows of 5 tiles (no
                              # 2-way bank conflict between the lane parts' rows)
    mgpu_bwd_pair_ahead: bool = False  # Mosaic pair backward: each sub-chunk's recompute in
                              # the previous one's row-sum phase (mgpu_bwd_ahead: the others)
    mgpu_bwd_direct_out: bool = False  # Mosaic pair backward: du / ddelta (dz) stored from
                              # registers by st.global (no shared-memory tiles, no TMA)
    mgpu_bwd_warp_red: bool = False  # Mosaic pair backward: dB/dC summed over each half-warp's
                              # 16 channels by shuffles, one row per warp and step through
                              # shared memory (double-buffered: one barrier per sub-chunk)
    mgpu_bwd_pair_chunk: int = 0  # steps per TMA chunk of the Mosaic pair backward (a
                              # multiple of chunk; 0: mgpu_chunk); halved there until it fits
    mgpu_bwd_rawp: bool = False  # Mosaic pair backward: A, D, bias as they are, laid out per
                              # thread by the kernel (as mgpu_pair_inf's rawp; with
                              # mgpu_pair_train_opts rawp no XLA layout kernels are left)
    mgpu_bwd_dbc_add: bool = False  # Mosaic pair backward: dB/dC rows summed over the
                              # programs by TMA reduce-add into one [B, G, Lp, 32] f32 buffer
                              # (no [B, Dp / 64, Lp, 32] block rows summed by XLA; the f32 sum
                              # order then varies run to run: dB / dC not bitwise reproducible;
                              # False: the fixed-order XLA sum). selective_scan_pallas's
                              # default (v12): True (session 12: -2.3 to -3.1 % fwd+bwd)
    mgpu_bwd_perm: bool = False  # Mosaic pair backward (warp_red, N 16): each thread's
                              # state slots permuted by its lane bits, so that two of the
                              # dB/dC butterfly's four levels need no selects.
                              # selective_scan_pallas's default (v13): True
    mgpu_bwd_red_early: bool = False  # with mgpu_bwd_perm: the butterfly stops after its
                              # select-free levels; 4 partial sums per lane through `red`
    interpret: bool = False


def _ptx_unary(op, x):
    return plgpu.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _ptx_add_zero(x):
    """x + 0 (-0 becomes +0) as an opaque add.f32: a copy of x in a new register."""
    return plgpu.elementwise_inline_asm(
        "add.rn.f32 $0, $1, 0f00000000;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _exp2(x, asm):
    """2^x; `asm` (Triton only) is the bare ex2.approx.ftz (one MUFU instruction) instead of
    libdevice's exp2f, which adds a denormal range check and two multiplies around it."""
    return _ptx_unary("ex2", x) if asm else jnp.exp2(x)


# 2^f on [-0.5, 0.5], degree 5, fitted to the relative error: <= 2.4e-7 evaluated in f32 (the
# MUFU's ex2.approx is within 2 ulp).
_EXP2_POLY = (1.0, 0.6931469440460205, 0.24022120237350464, 0.05550713092088699,
              0.009675503708422184, 0.0013276360696181655)
_ROUND_MAGIC = 12582912.0     # 1.5 * 2^23: x + magic rounds x to an integer in the low bits


def _exp2_poly(x, asm):
    """2^x for x <= 0 on the FMA and integer pipes (FlashAttention-4's trick for the MUFU
    bound): t = x + 1.5 * 2^23 holds round(x) in its low mantissa bits, f = x - round(x), 2^f
    by Horner, and round(x) goes into the exponent as bits(t) << 23 (= round(x) << 23 mod
    2^32). About 11 instructions instead of one MUFU op. Clamped at -125 (2^-125 instead of
    the MUFU's flush to 0 below 2^-126). `asm` (Triton): (t - magic) goes through an opaque
    mov so that no compiler folds it to x; otherwise (interpret mode, where XLA does fold it)
    round(x) is jnp.round."""
    x = jnp.maximum(x, -125.0)
    if asm:
        t = x + _ROUND_MAGIC
        r = plgpu.elementwise_inline_asm(
            "mov.b32 $0, $1;", args=[t], constraints="=f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(t.shape, t.dtype)])[0] - _ROUND_MAGIC
        shift = jax.lax.shift_left(jax.lax.bitcast_convert_type(t, jnp.int32), 23)
    else:
        r = jnp.round(x)
        shift = jax.lax.shift_left(r.astype(jnp.int32), 23)
    f = x - r
    p = jnp.full_like(f, _EXP2_POLY[-1])
    for c in _EXP2_POLY[-2::-1]:
        p = p * f + c
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(p, jnp.int32) + shift,
                                        jnp.float32)


def _softplus(x, fast=False, asm=False):
    # log1p(exp(x)) overflows for large x; like mamba-ssm, switch to the identity above 20.
    if not fast:   # libdevice expf + log1pf: ~30 instructions
        return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))
    # ~12 instructions, two of them MUFU: log1p(e) = ln2 log2(1 + e), and for e < 2^-6 (where
    # 1 + e would drop e's low bits) the series e - e^2/2 + e^3/3 (relative error < 2^-20).
    e = _exp2(jnp.minimum(x, 20.0) * _LOG2E, asm)
    one_e = 1.0 + e
    big = (_ptx_unary("lg2", one_e) if asm else jnp.log2(one_e)) * _LN2
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return jnp.where(x > 20.0, x, jnp.where(e < 2.0 ** -6, small, big))


def _delta_step(raw, bias, i, *, softplus, length, padded, fast=False, asm=False):
    """delta_t for one step from the raw row: returns (delta [bd] f32, pre-softplus value)."""
    x = raw.astype(jnp.float32)
    if bias is not None:
        x = x + bias
    dt = _softplus(x, fast, asm) if softplus else x
    if padded:   # padded steps get delta = 0: exp(0) = 1 and no input, the state passes through
        dt = jnp.where(i < length, dt, 0.0)
    return dt, x


def _name_refs(refs, names):
    return dict(zip(names, refs, strict=True))


_LANES = 32   # one warp: the lane reduction below needs block_d == 32 and num_warps == 1


def _shfl_xor(x, mask, interpret):
    """x from lane `lane ^ mask` of the warp (one element of the [32] vector per lane)."""
    if interpret:
        lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        return jnp.take(x, lane ^ mask)
    return plgpu.elementwise_inline_asm(
        f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, 0xffffffff;", args=[x],
        constraints="=f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _shfl_idx(x, src, interpret):
    """x from lane src[lane] of the warp (src: a [32] int32 vector)."""
    if interpret:
        return jnp.take(x, src)
    return plgpu.elementwise_inline_asm(
        "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", args=[x, src],
        constraints="=f,f,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _load_chunk(refs, names, c, chunk, cols=slice(None)):
    """The state-independent [bd] rows of chunk c, one tuple per name. They are loaded a chunk
    ahead: a load cannot move above a store that may alias it, so loads issued inside the step
    loop (after the previous step's stores) would expose the full memory latency every step."""
    return tuple(tuple(refs[k][c * chunk + t, cols] for t in range(chunk)) for k in names)


def _load_bc(r, i, states):
    """B_t[n] and C_t[n] of step i for n in `states` (ints: warp-uniform scalar loads; or
    [lanes] index vectors in the split forward)."""
    return tuple(r["b"][i, n] for n in states), tuple(r["c"][i, n] for n in states)


def _lane_map(bd, n_state, split):
    """Lanes of a program of `bd` channels: returns (lane, cols, part, states). split > 1: lane
    e holds channel cols = e % bd and states part * K + k (part = e // bd, K = N / split);
    split = 1: every lane one channel and all N states (cols a full slice, part None)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (bd * split,), 0)
    if split == 1:
        return lane, slice(None), None, list(range(n_state))
    part = lane // bd
    return lane, lane % bd, part, [part * (n_state // split) + k for k in range(n_state // split)]


def _bc_sources(lane, states, n_state):
    """bc_rows: the lanes (column of the [32] B/C row) that each state's B and C come from."""
    src_b = [n + jnp.zeros_like(lane) for n in states]
    return src_b, [n + n_state for n in src_b]


def _load_bc_rows(r, c, chunk):
    """bc_rows: the chunk's [32] B/C rows, one per step."""
    return tuple(r["bc"][c * chunk + t, :] for t in range(chunk))


def _fwd_kernel(*refs, n_state, chunk, n_chunks, length, padded, softplus, opts, save_ckpt,
                ck_every, ck_copy,
                ahead, fast_exp, split, poly_exp, share_dt, interpret):
    # u/dt/z/y [Lp, bd]; a [N, bd]; b/c [Lp, N] f32; d/bias [bd]; h0/hT [N, bd]; ck [nC, N, bd]
    # split > 1: the program's vectors have bd * split = 32 lanes; lane e holds channel e % bd
    # and its states (e // bd) * K + k, k < K = N / split; y sums the lanes' parts by shuffles.
    # "bc" in opts (bc_rows): instead of b/c, one bc [Lp, 32] f32 ref, row i = B_i (columns
    # 0..N-1), C_i (N..2N-1), zeros; lane e loads column e and the states' values are shuffled
    # out of that row (no per-state loads, no B/C window: the rows come a chunk ahead).
    bc_rows = "bc" in opts
    names = ["u", "dt", "a", *(["bc"] if bc_rows else ["b", "c"]),
             *[k for k in _OPTIONAL if k in opts], "y", "hT"]
    r = _name_refs(refs, names + (["ck"] if save_ckpt else []))
    f32 = jnp.float32
    bd = r["u"].shape[-1]
    n_k = n_state // split
    asm = fast_exp and not interpret
    width = bd * split
    lane, cols, part, states = _lane_map(bd, n_state, split)
    if bc_rows:
        ahead = 0
        src_b, src_c = _bc_sources(lane, states, n_state)
        load_bc_rows = functools.partial(_load_bc_rows, r, chunk=chunk)
    last = n_chunks * chunk - 1
    a2 = [r["a"][n, cols] * _LOG2E for n in states]
    d = r["d"][cols] if "d" in r else None
    bias = r["bias"][cols] if "bias" in r else None
    # share_dt (split > 1, chunk % split == 0): lanes of part p load the delta row of step
    # g * split + p of each group g of `split` steps, compute its delta once, and every step
    # takes its delta from the part that computed it (one shfl.idx instead of ~14 instructions).
    share = share_dt and split > 1 and chunk % split == 0
    seq_names = ["u"] + ([] if share else ["dt"]) + (["z"] if "z" in r else [])
    ri = {k: j for j, k in enumerate(seq_names)}
    if "h0" in r:
        h0 = tuple(r["h0"][n, cols] for n in states)
    else:
        h0 = tuple(jnp.zeros((width,), f32) for _ in states)

    def load_rows(c):
        rows = _load_chunk(r, seq_names, c, chunk, cols)
        if share:
            rows += (tuple(r["dt"][c * chunk + g * split + part, cols]
                           for g in range(chunk // split)),)
        return rows

    def chunk_body(c, carry):
        h, rows, window = list(carry[0]), carry[1], list(carry[2])
        next_rows = load_rows(jnp.minimum(c + 1, n_chunks - 1))
        if bc_rows:    # the window slot carries this chunk's bc rows
            next_window = load_bc_rows(jnp.minimum(c + 1, n_chunks - 1))
        # ck_copy: the checkpoint is stored from a copy (an add of +0 the compiler cannot
        # drop), so that the state's own registers, overwritten by the next step, do not wait
        # for the store to read them.
        ck_val = _ptx_add_zero if ck_copy and not interpret else (lambda v: v)
        if save_ckpt:
            ck_c = c if ck_every == chunk else c * (chunk // ck_every)
            for k, n in enumerate(states):
                r["ck"][ck_c, n, cols] = ck_val(h[k])
        ys = []
        for t in range(chunk):
            i = c * chunk + t
            if save_ckpt and t and t % ck_every == 0:   # ck_unroll: more checkpoints a chunk
                for k, n in enumerate(states):
                    r["ck"][c * (chunk // ck_every) + t // ck_every, n, cols] = ck_val(h[k])
            if bc_rows:
                b_t = [_shfl_idx(window[t], src, interpret) for src in src_b]
                c_t = [_shfl_idx(window[t], src, interpret) for src in src_c]
            elif ahead:  # B/C scalars of step i + ahead load now, `ahead` steps before their use
                window.append(_load_bc(r, jnp.minimum(i + ahead, last), states))
                b_t, c_t = window.pop(0)
            else:
                b_t, c_t = _load_bc(r, i, states)
            u = rows[0][t].astype(f32)
            if share:
                g, j = divmod(t, split)
                if j == 0:   # this lane's step of the group: c * chunk + g * split + part
                    sp, _ = _delta_step(rows[-1][g], bias, c * chunk + g * split + part,
                                        softplus=softplus, length=length, padded=padded,
                                        fast=fast_exp, asm=asm)
                dt = _shfl_idx(sp, j * bd + cols, interpret)
            else:
                dt, _ = _delta_step(rows[ri["dt"]][t], bias, i, softplus=softplus,
                                    length=length, padded=padded, fast=fast_exp, asm=asm)
            dtu = dt * u
            y = jnp.zeros_like(u)
            for k in range(n_k):
                e = _exp2_poly(dt * a2[k], asm) if k < poly_exp else _exp2(dt * a2[k], asm)
                h[k] = e * h[k] + dtu * b_t[k]
                y = y + h[k] * c_t[k]
            m = bd
            while m < width:
                y = y + _shfl_xor(y, m, interpret)
                m *= 2
            if d is not None:
                y = y + d * u
            if "z" in r:
                z = rows[ri["z"]][t].astype(f32)
                y = y * (z * jax.nn.sigmoid(z))
            ys.append(y)
        for t in range(chunk):      # stores last, so that no load of this chunk waits on them
            r["y"][c * chunk + t, cols] = ys[t].astype(r["y"].dtype)
        return tuple(h), next_rows, (next_window if bc_rows else tuple(window))

    if bc_rows:
        window = load_bc_rows(0)
    else:
        window = tuple(_load_bc(r, min(i, last), states) for i in range(ahead))
    h, _, _ = jax.lax.fori_loop(0, n_chunks, chunk_body, (h0, load_rows(0), window))
    for k, n in enumerate(states):
        r["hT"][n, cols] = h[k]


def _fwd_tile_kernel(*refs, n_state, chunk, n_chunks, length, padded, softplus, opts,
                     save_ckpt, ck_every, ck_rows, ahead, fast_exp, interpret):
    """state_tile forward: one channel per lane with all N states in that lane, the state an
    [N, bd] tile (Triton's default layout for it with one warp: lane e owns column e, so the
    sum over states is lane-local), B_t and C_t [N] rows broadcast to every lane. A row has
    fewer elements than the warp has lanes, so Triton may re-load it in the broadcast layout
    (each lane the whole row, vector loads of one address) instead of shuffling it: about 0.5
    load per element instead of the split layout's 2 shuffles, and the per-channel work
    (softplus, D, gate, stores) once per channel instead of once per lane part. The B/C rows
    load `ahead` steps before their use (a rolling window carried across chunks); u/delta/z rows
    a chunk ahead; y stored at the chunk end."""
    # u/dt/z/y [Lp, bd]; a [N, bd]; b/c [Lp, N] f32; d/bias [bd]; h0/hT [N, bd]; ck [nC, N, bd]
    names = ["u", "dt", "a", "b", "c", *[k for k in _OPTIONAL if k in opts], "y", "hT"]
    r = _name_refs(refs, names + (["ck"] if save_ckpt else []))
    f32 = jnp.float32
    bd = r["u"].shape[-1]
    asm = fast_exp and not interpret
    rows_n = jax.lax.broadcasted_iota(jnp.int32, (n_state, bd), 0)

    def tile(vecs):      # N [bd] rows -> [N, bd] tile, built by selects (no 2D load anchors)
        out = jnp.zeros((n_state, bd), f32)
        for n, v in enumerate(vecs):
            out = jnp.where(rows_n == n, v[None, :], out)
        return out

    a2 = tile([r["a"][n, :] * _LOG2E for n in range(n_state)])
    h0 = tile([r["h0"][n, :] for n in range(n_state)]) if "h0" in r else jnp.zeros(
        (n_state, bd), f32)
    d = r["d"][...] if "d" in r else None
    bias = r["bias"][...] if "bias" in r else None
    seq_names = ["u", "dt"] + (["z"] if "z" in r else [])
    last = n_chunks * chunk - 1

    def load_bc(i):
        return r["b"][i, :], r["c"][i, :]

    def store_ck(j, h):
        if not ck_rows:    # one [N, bd] store: Triton converts the tile's layout (shared memory)
            r["ck"][j, :, :] = h
            return
        for n in range(n_state):   # row n taken out of the lane's registers (selects on
            # constant row indices and adds of -0: nothing left after LLVM folds them)
            r["ck"][j, n, :] = jnp.sum(jnp.where(rows_n == n, h, -0.0), axis=0)

    def chunk_body(c, carry):
        h, rows, window = carry[0], carry[1], list(carry[2])
        next_rows = _load_chunk(r, seq_names, jnp.minimum(c + 1, n_chunks - 1), chunk)
        ys = []
        for t in range(chunk):
            i = c * chunk + t
            if save_ckpt and t % ck_every == 0:   # ck_every < chunk: ck_unroll
                store_ck(c * (chunk // ck_every) + t // ck_every, h)
            if ahead:
                window.append(load_bc(jnp.minimum(i + ahead, last)))
                b_t, c_t = window.pop(0)
            else:
                b_t, c_t = load_bc(i)
            u = rows[0][t].astype(f32)
            dt, _ = _delta_step(rows[1][t], bias, i, softplus=softplus, length=length,
                                padded=padded, fast=fast_exp, asm=asm)
            e = _exp2(dt[None, :] * a2, asm)
            h = e * h + (dt * u)[None, :] * b_t[:, None]
            y = jnp.sum(h * c_t[:, None], axis=0)
            if d is not None:
                y = y + d * u
            if "z" in r:
                z = rows[2][t].astype(f32)
                y = y * (z * jax.nn.sigmoid(z))
            ys.append(y)
        for t in range(chunk):
            r["y"][c * chunk + t, :] = ys[t].astype(r["y"].dtype)
        return h, next_rows, tuple(window)

    window = tuple(load_bc(min(i, last)) for i in range(ahead))
    h, _, _ = jax.lax.fori_loop(0, n_chunks, chunk_body,
                                (h0, _load_chunk(r, seq_names, 0, chunk), window))
    r["hT"][...] = h


def _lanes_sum(x, bd, width, interpret):
    """Sums a [width] vector over the lanes that hold parts of the same channel (lanes
    e, e + bd, e + 2 bd, ...): log2(width / bd) shuffles; every part gets the same bits."""
    m = bd
    while m < width:
        x = x + _shfl_xor(x, m, interpret)
        m *= 2
    return x


def _lane_reduce_scatter(vals, lane, interpret, unit=1):
    """len(vals) = P [32]-vectors in (P a power of 2 <= 32), one out: lane e holds the sum of
    vals[e % P] over the lanes that agree with e above bit log2(P) (over all 32 when P = 32).
    A recursive-halving butterfly: P - 1 shuffles for P sums per lane group (instead of
    log2(P) shuffles per sum). unit > 1 (a power of 2): the same over lane bits log2(unit)
    and up: lane e holds the sum of vals[(e // unit) % P] over the lanes e ^ (k * unit)."""
    m = len(vals) // 2
    while m:
        hi = (lane & (m * unit)) != 0
        half = len(vals) // 2
        vals = [jnp.where(hi, vals[q + half], vals[q])
                + _shfl_xor(jnp.where(hi, vals[q], vals[q + half]), m * unit, interpret)
                for q in range(half)]
        m //= 2
    return vals[0]


def _xor_reduce(qb, qc, lane, bd, interpret):
    """dB/dC sums over the bd channels of a lane part without selects (xor_reduce; 2K = bd).
    Register k of lane e holds state k ^ s, s = (e >> 1) % K (see _bwd_kernel), so at the level
    of lane bit b (masks bd/2 .. 2) the value a lane keeps in slot j and the one its partner
    sends from slot j + half are the same state: slot j + shfl(slot j + half), one shuffle and
    one add per value. Then each lane holds the dB and dC sums of state s; the last level
    (mask 1) keeps dB on even lanes and dC on odd ones: lane e ends with column e of
    [part, state s, (dB, dC)]."""
    m = bd // 2
    while len(qb) > 1:
        half = len(qb) // 2
        qb = [qb[j] + _shfl_xor(qb[j + half], m, interpret) for j in range(half)]
        qc = [qc[j] + _shfl_xor(qc[j + half], m, interpret) for j in range(half)]
        m //= 2
    odd = (lane & 1) != 0
    return jnp.where(odd, qc[0], qb[0]) + _shfl_xor(jnp.where(odd, qb[0], qc[0]), 1, interpret)


def _bwd_kernel(*refs, n_state, chunk, n_chunks, length, padded, softplus, opts, ahead,
                lane_reduce, fast_exp, split, keep_decay, xor_reduce, share, interpret):
    # Reverse scan. g_t = dL/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}; with q = g_t a_t h_{t-1}:
    # dA += dt_t q, d(delta_t) = u_t <g_t, B_t> + <A, q>, du_t = dt_t <g_t, B_t> + D dy_t,
    # dB_t = sum_d g_t dt_t u_t, dC_t = sum_d dy_t h_t (per program; summed over blocks outside).
    # dbc [Lp, Q] holds dB_t in columns 0..N-1 and dC_t in N..2N-1 (Q = 2N, or padded to a
    # multiple of 32 when the lanes reduce them: lane q then stores column q in one row store).
    # split > 1 (lane_reduce only): as in the forward, lane e holds channel e % bd and states
    # (e // bd) * K + k, K = N / split; <g, B>, <A, q> and y add the parts by shuffles, and the
    # butterfly reduces the 2K values of each part over the part's bd channels: pass j stores
    # the 32-column row j, column p * bd + q = value j * bd + q of part p (see _backward).
    # "bc" in opts (bc_rows): B/C as [Lp, 32] rows as in the forward; a chunk's rows load a
    # chunk ahead, the recompute and the reverse step shuffle the states' values out of them.
    # share (split S > 1, S | chunk): the per-channel work is done once per channel-step, not
    # S times: in each group of S steps, part p computes delta (bias, softplus) of step g S + p
    # (the others take it by shfl.idx), and after the group's reverse steps the lane partials
    # of <g, B>, <A, q> (and y with z) are reduce-scattered over the parts, so that part p
    # finishes step g S + p alone (du, ddelta, dz, their stores; D and bias sums per part,
    # added over the parts at the end).
    bc_rows = "bc" in opts
    in_names = ["u", "dt", "a", *(["bc"] if bc_rows else ["b", "c"]),
                *[k for k in ("z", "d", "bias") if k in opts], "ck", "dy", "dhT"]
    out_names = ["du", "ddt", *(["dz"] if "z" in opts else []), "dbc", "da",
                 *(["dd"] if "d" in opts else []), *(["dbias"] if "bias" in opts else []), "dh0"]
    r = _name_refs(refs, in_names + out_names)
    f32 = jnp.float32
    bd = r["u"].shape[-1]
    n_k = n_state // split
    width = bd * split
    lane, cols, part, states = _lane_map(bd, n_state, split)
    if xor_reduce:   # register k holds state k ^ s of the part (see _xor_reduce)
        perm = (lane >> 1) % n_k
        cols, states = lane % bd, [(lane // bd) * n_k + (k ^ perm) for k in range(n_k)]
    A = [r["a"][n, cols] for n in states]
    d = r["d"][cols] if "d" in r else None
    bias = r["bias"][cols] if "bias" in r else None
    asm = fast_exp and not interpret
    step = functools.partial(_delta_step, bias=bias, softplus=softplus, length=length,
                             padded=padded, fast=fast_exp, asm=asm)
    seq_names = ["u", "dt", "dy"] + (["z"] if "z" in r else [])
    if share:    # the per-step dt rows are not needed; each part loads its steps' rows
        seq_names.remove("dt")
        grp_names = ["u", "dt", "dy"] + (["z"] if "z" in r else [])
    ri = {k: j for j, k in enumerate(seq_names)}
    zeros = jnp.zeros((width,), f32)
    n_q = r["dbc"].shape[-1]
    lsum = functools.partial(_lanes_sum, bd=bd, width=width, interpret=interpret)

    def load_ck(c):
        return tuple(r["ck"][c, n, cols] for n in states)

    def load_rows(c):
        rows = _load_chunk(r, seq_names, c, chunk, cols)
        if share:   # rows[-1][g][name]: the row of step g * split + part
            rows += (tuple({k: r[k][c * chunk + g * split + part, cols] for k in grp_names}
                           for g in range(chunk // split)),)
        return rows

    def load_b(i):
        return tuple(r["b"][i, n] for n in states)

    if bc_rows:
        ahead = 0
        src_b, src_c = _bc_sources(lane, states, n_state)
        load_bc_rows = functools.partial(_load_bc_rows, r, chunk=chunk)

        def shfl_bc(row, srcs):
            return tuple(_shfl_idx(row, src, interpret) for src in srcs)

    def chunk_body(k, carry):
        dh, da, dd, dbias, rows, h, wb, wbc = carry
        dh, da, h, wb, wbc = list(dh), list(da), list(h), list(wb), list(wbc)
        c = n_chunks - 1 - k
        # The next chunk's rows and checkpoint load before this chunk's first store.
        next_rows = load_rows(jnp.maximum(c - 1, 0))
        next_ck = load_ck(jnp.maximum(c - 1, 0))
        if bc_rows:      # wb carries this chunk's bc rows, wbc is empty
            bc_cur, wb = wb, load_bc_rows(jnp.maximum(c - 1, 0))
        hs, steps, decays, grp, parts = [h], [], [], [], {}
        for t in range(chunk):                       # recompute the chunk's states
            i = c * chunk + t
            if bc_rows:
                b_t = shfl_bc(bc_cur[t], src_b)
            elif ahead:  # B of the recompute step `ahead` later (in the next chunk, c - 1)
                nxt = (c * chunk + t + ahead if t + ahead < chunk
                       else jnp.maximum(c - 1, 0) * chunk + t + ahead - chunk)
                wb.append(load_b(nxt))
                b_t = wb.pop(0)
            else:
                b_t = load_b(i)
            if share:
                g, j = divmod(t, split)
                if j == 0:   # this part's step of the group: delta and the pre-softplus x
                    grp.append(step(rows[-1][g]["dt"], i=c * chunk + g * split + part))
                dt, x = _shfl_idx(grp[g][0], j * bd + cols, interpret), None
            else:
                dt, x = step(rows[ri["dt"]][t], i=i)
            steps.append((dt, x))                    # reused by the reverse pass
            dtl = dt * _LOG2E
            dtu = dt * rows[0][t].astype(f32)
            a_t = [_exp2(dtl * A[n], asm) for n in range(n_k)]
            if keep_decay:
                decays.append(a_t)
            h = [a_t[n] * h[n] + dtu * b_t[n] for n in range(n_k)]
            hs.append(h)
        for t in reversed(range(chunk)):
            i = c * chunk + t
            if bc_rows:  # the B shuffles are the recompute's (the same pure asm: CSE)
                b_t, c_t = shfl_bc(bc_cur[t], src_b), shfl_bc(bc_cur[t], src_c)
            elif ahead:  # B/C of the reverse step `ahead` later (i - ahead)
                wbc.append(_load_bc(r, jnp.maximum(i - ahead, 0), states))
                b_t, c_t = wbc.pop(0)
            else:
                b_t, c_t = _load_bc(r, i, states)
            u = rows[ri["u"]][t].astype(f32)
            dt, x = steps[t]
            dtl = dt * _LOG2E
            dtu = dt * u
            dout = rows[ri["dy"]][t].astype(f32)
            h_prev, h_t = hs[t], hs[t + 1]
            if "z" in r and share:
                z = rows[ri["z"]][t].astype(f32)
                dy = dout * z * jax.nn.sigmoid(z)
                parts.setdefault("y", {})[t] = sum(h_t[n] * c_t[n] for n in range(n_k))
            elif "z" in r:
                z = rows[ri["z"]][t].astype(f32)
                sz = jax.nn.sigmoid(z)
                y = lsum(sum(h_t[n] * c_t[n] for n in range(n_k)))
                if d is not None:
                    y = y + d * u
                r["dz"][i, cols] = (dout * y * sz * (1.0 + z * (1.0 - sz))).astype(
                    r["dz"].dtype)
                dy = dout * z * sz
            else:
                dy = dout
            gb, saq = zeros, zeros
            qb, qc = [], []
            for n in range(n_k):
                g = dh[n] + c_t[n] * dy
                qb.append(g * dtu)
                qc.append(dy * h_t[n])
                a_n = decays[t][n] if keep_decay else _exp2(dtl * A[n], asm)
                dh[n] = a_n * g          # q = g a h_prev = dh_{t-1} h_prev: one multiply
                q = dh[n] * h_prev[n]
                da[n] = da[n] + dt * q
                saq = saq + A[n] * q
                gb = gb + g * b_t[n]
            if not share:
                gb, saq = lsum(gb), lsum(saq)
            dbc_type = r["dbc"].dtype
            if xor_reduce:
                r["dbc"][i, :] = _xor_reduce(qb, qc, lane, bd, interpret).astype(dbc_type)
            elif lane_reduce:
                vals = qb + qc
                vals += [zeros] * (n_q // _LANES * bd - len(vals))
                for j in range(n_q // _LANES):
                    r["dbc"][i, j * _LANES:(j + 1) * _LANES] = _lane_reduce_scatter(
                        vals[j * bd:(j + 1) * bd], lane, interpret).astype(dbc_type)
            else:
                for n in range(n_state):
                    r["dbc"][i, n] = jnp.sum(qb[n]).astype(dbc_type)
                    r["dbc"][i, n_state + n] = jnp.sum(qc[n]).astype(dbc_type)
            if share:
                parts.setdefault("gb", {})[t] = gb
                parts.setdefault("saq", {})[t] = saq
                g_, j_ = divmod(t, split)
                if j_ == 0:   # the group's steps are done: part p finishes step g * split + p
                    dd, dbias = finish_part(g_, grp[g_], rows[-1][g_], parts, dd, dbias,
                                            c * chunk + g_ * split + part)
                continue
            du = dt * gb
            if d is not None:
                du = du + d * dy
                dd = dd + dy * u
            r["du"][i, cols] = du.astype(r["du"].dtype)
            ddt = u * gb + saq
            if softplus:
                ddt = ddt * jax.nn.sigmoid(x)
            if padded:
                ddt = jnp.where(i < length, ddt, 0.0)
            dbias = dbias + ddt
            r["ddt"][i, cols] = ddt.astype(r["ddt"].dtype)
        return (tuple(dh), tuple(da), dd, dbias, next_rows, next_ck, tuple(wb), tuple(wbc))

    def finish_part(g, delta_x, row, parts, dd, dbias, i):
        """share: the per-channel end of step i = g * split + part in the lanes of `part`."""
        total = {k: _lane_reduce_scatter([v[g * split + j] for j in range(split)], lane,
                                         interpret, unit=bd) for k, v in parts.items()}
        dt, x = delta_x
        u, dout = row["u"].astype(f32), row["dy"].astype(f32)
        if "z" in r:
            z = row["z"].astype(f32)
            sz = jax.nn.sigmoid(z)
            y = total["y"] + d * u if d is not None else total["y"]
            r["dz"][i, cols] = (dout * y * sz * (1.0 + z * (1.0 - sz))).astype(r["dz"].dtype)
            dy = dout * z * sz
        else:
            dy = dout
        du = dt * total["gb"]
        if d is not None:
            du = du + d * dy
            dd = dd + dy * u
        r["du"][i, cols] = du.astype(r["du"].dtype)
        ddt = u * total["gb"] + total["saq"]
        if softplus:
            ddt = ddt * jax.nn.sigmoid(x)
        if padded:
            ddt = jnp.where(i < length, ddt, 0.0)
        r["ddt"][i, cols] = ddt.astype(r["ddt"].dtype)
        return dd, dbias + ddt

    dh0 = tuple(r["dhT"][n, cols] for n in states)
    last = n_chunks - 1
    wb = tuple(load_b(last * chunk + t if t < chunk else max(last - 1, 0) * chunk + t - chunk)
               for t in range(ahead))
    if bc_rows:
        wb = load_bc_rows(last)
    wbc = tuple(_load_bc(r, max(n_chunks * chunk - 1 - t, 0), states) for t in range(ahead))
    init = (dh0, tuple(zeros for _ in range(n_k)), zeros, zeros,
            load_rows(last), load_ck(last), wb, wbc)
    dh, da, dd, dbias, *_ = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    if share:    # each part summed D and bias terms over its own steps
        dd, dbias = lsum(dd), lsum(dbias)
    for k, n in enumerate(states):
        r["dh0"][n, cols] = dh[k]
        r["da"][n, cols] = da[k]
    if "dd" in r:
        r["dd"][cols] = dd
    if "dbias" in r:
        r["dbias"][cols] = dbias


def _tile_shfl_xor(x, mask, interpret):
    """_shfl_xor of an [R, 32] tile whose lane e holds column e (state_tile's layout)."""
    if interpret:
        lane = jnp.arange(x.shape[-1], dtype=jnp.int32)
        return jnp.take(x, lane ^ mask, axis=-1)
    return _shfl_xor(x, mask, interpret)


def _tile_reduce_scatter(qb, qc, lane, interpret):
    """bwd_tile: the dB and dC sums of an [N, 32] tile pair over the warp's 32 channels (lane
    e = column e), N = 16: a recursive-halving butterfly over tiles, one row block of the tile
    kept and the other sent at each level (16 + 8 + 4 + 2 + 1 = 31 shuffles). Lane e ends with
    column e of [dB_0..dB_15, dC_0..dC_15]."""
    hi = ((lane & 16) != 0)[None, :]
    v = jnp.where(hi, qc, qb) + _tile_shfl_xor(jnp.where(hi, qb, qc), 16, interpret)
    m = 8
    while v.shape[0] > 1:
        lo, up = jnp.split(v, 2, axis=0)
        bit = ((lane & m) != 0)[None, :]
        v = jnp.where(bit, up, lo) + _tile_shfl_xor(jnp.where(bit, lo, up), m, interpret)
        m //= 2
    return v.reshape(v.shape[1:])


def _bwd_tile_kernel(*refs, n_state, chunk, n_chunks, length, padded, softplus, opts,
                     fast_exp, keep_decay, interpret):
    """bwd_tile: the backward in state_tile's layout (one lane per channel, the N = 16 states
    of a lane as an [N, 32] tile, B/C rows broadcast by vector loads), so that the per-channel
    work runs once per channel-step and B/C cost no shuffles; dB/dC by _tile_reduce_scatter.
    Per chunk (in reverse): recompute the chunk's states from its checkpoint, then the
    reverse steps (keep_decay: with the recompute's decays; ptxas merges identical ex2
    instructions even from separate asm strings); every store of the chunk waits until its
    end, so that no load of the chunk (B/C rows) is held behind a store."""
    in_names = ["u", "dt", "a", "b", "c", *[k for k in ("z", "d", "bias") if k in opts],
                "ck", "dy", "dhT"]
    out_names = ["du", "ddt", *(["dz"] if "z" in opts else []), "dbc", "da",
                 *(["dd"] if "d" in opts else []), *(["dbias"] if "bias" in opts else []), "dh0"]
    r = _name_refs(refs, in_names + out_names)
    f32 = jnp.float32
    bd = r["u"].shape[-1]
    asm = fast_exp and not interpret
    rows_n = jax.lax.broadcasted_iota(jnp.int32, (n_state, bd), 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (bd,), 0)

    def tile(vecs):      # N [bd] rows -> [N, bd] tile (selects on constant rows: folded)
        out = jnp.zeros((n_state, bd), f32)
        for n, v in enumerate(vecs):
            out = jnp.where(rows_n == n, v[None, :], out)
        return out

    def rows_of(t):      # the [bd] rows of a tile, for row stores
        return [jnp.sum(jnp.where(rows_n == n, t, -0.0), axis=0) for n in range(n_state)]

    A = tile([r["a"][n, :] for n in range(n_state)])
    d = r["d"][...] if "d" in r else None
    bias = r["bias"][...] if "bias" in r else None
    step = functools.partial(_delta_step, bias=bias, softplus=softplus, length=length,
                             padded=padded, fast=fast_exp, asm=asm)
    seq_names = ["u", "dt", "dy"] + (["z"] if "z" in r else [])
    zeros = jnp.zeros((bd,), f32)
    # Without keep_decay the reverse pass takes its decays again, as exp2 of dt * log2(e)'
    # with log2(e)' one ulp under log2(e) (within 1e-7 of the recompute's values): an input
    # ptxas cannot match to the recompute's ex2, so it cannot merge them and keep 64
    # registers of decays.
    log2e_again = float(np.nextafter(np.float32(_LOG2E), np.float32(0)))

    def load_ck(c):
        return tile([r["ck"][c, n, :] for n in range(n_state)])

    def chunk_body(k, carry):
        dh, da, dd, dbias, rows, h = carry
        c = n_chunks - 1 - k
        next_rows = _load_chunk(r, seq_names, jnp.maximum(c - 1, 0), chunk)
        next_ck = load_ck(jnp.maximum(c - 1, 0))
        hs, steps, decays = [h], [], []
        for t in range(chunk):                       # recompute the chunk's states
            i = c * chunk + t
            dt, x = step(rows[1][t], i=i)
            steps.append((dt, x))
            a_t = _exp2((dt * _LOG2E)[None, :] * A, asm)
            decays.append(a_t)
            h = a_t * h + (dt * rows[0][t].astype(f32))[None, :] * r["b"][i, :][:, None]
            hs.append(h)
        out = []
        for t in reversed(range(chunk)):
            i = c * chunk + t
            b_t, c_t = r["b"][i, :][:, None], r["c"][i, :][:, None]
            u = rows[0][t].astype(f32)
            dt, x = steps[t]
            dout = rows[2][t].astype(f32)
            h_prev, h_t = hs[t], hs[t + 1]
            dz = None
            if "z" in r:
                z = rows[3][t].astype(f32)
                sz = jax.nn.sigmoid(z)
                y = jnp.sum(h_t * c_t, axis=0)
                if d is not None:
                    y = y + d * u
                dz = dout * y * sz * (1.0 + z * (1.0 - sz))
                dy = dout * z * sz
            else:
                dy = dout
            g = dh + c_t * dy[None, :]
            a_n = decays[t] if keep_decay else _exp2((dt * log2e_again)[None, :] * A, asm)
            dh = a_n * g                 # q = g a h_prev = dh_{t-1} h_prev: one multiply
            q = dh * h_prev
            da = da + dt[None, :] * q
            saq = jnp.sum(A * q, axis=0)
            gb = jnp.sum(g * b_t, axis=0)
            dbc = _tile_reduce_scatter(g * (dt * u)[None, :], dy[None, :] * h_t, lane, interpret)
            du = dt * gb
            if d is not None:
                du = du + d * dy
                dd = dd + dy * u
            ddt = u * gb + saq
            if softplus:
                ddt = ddt * jax.nn.sigmoid(x)
            if padded:
                ddt = jnp.where(i < length, ddt, 0.0)
            dbias = dbias + ddt
            out.append((i, du, ddt, dz, dbc))
        for i, du, ddt, dz, dbc in out:      # the chunk's stores last
            r["du"][i, :] = du.astype(r["du"].dtype)
            r["ddt"][i, :] = ddt.astype(r["ddt"].dtype)
            if dz is not None:
                r["dz"][i, :] = dz.astype(r["dz"].dtype)
            r["dbc"][i, :] = dbc.astype(r["dbc"].dtype)
        return dh, da, dd, dbias, next_rows, next_ck

    last = n_chunks - 1
    init = (tile([r["dhT"][n, :] for n in range(n_state)]), jnp.zeros((n_state, bd), f32),
            zeros, zeros, _load_chunk(r, seq_names, last, chunk), load_ck(last))
    dh, da, dd, dbias, _, _ = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    for n, (row_dh, row_da) in enumerate(zip(rows_of(dh), rows_of(da), strict=True)):
        r["dh0"][n, :] = row_dh
        r["da"][n, :] = row_da
    if "dd" in r:
        r["dd"][...] = dd
    if "dbias" in r:
        r["dbias"][...] = dbias


# ---------------------------------------------------------------------------------------------
# Layout glue and custom_vjp.
#
# Kernel layouts: sequences [B, Lp, Dp] (Lp a multiple of the chunk, Dp of block_d when G == 1);
# A^T [N, Dp] f32; B/C [B, Lp, G, N] f32; states [B, N, Dp] f32 (a state row per n is contiguous).

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Layout:
    bsz: int
    length: int
    dn: int
    n: int
    groups: int
    bd: int
    dp: int
    lp: int
    chunk: int

    @property
    def n_chunks(self) -> int:
        return self.lp // self.chunk

    @property
    def n_blocks(self) -> int:
        return self.dp // self.bd


def _layout(u, A, B, chunk, block_d) -> _Layout:
    bsz, length, dn = u.shape
    groups = 1 if B.ndim == 3 else B.shape[2]
    if groups == 1:
        bd = min(block_d, _next_pow2(dn))
    else:    # a block must not straddle two groups: the largest power of 2 dividing Dn / G
        per_group, bd = dn // groups, 1
        while bd * 2 <= block_d and per_group % (bd * 2) == 0:
            bd *= 2
    dp = _common.round_up(dn, bd)
    return _Layout(bsz, length, dn, A.shape[1], groups, bd, dp,
                   _common.round_up(length, chunk), chunk)


def _kernel_inputs(lay: _Layout, u, delta, A, B, C, D, z, delta_bias, h0, bc_rows=False):
    """Pad and transpose to kernel layouts; returns (arrays, block specs, opts). bc_rows: B
    and C as one [B, Lp, G, 32] array (B in columns 0..N-1, C in N..2N-1; 2N <= 32)."""
    f32 = jnp.float32
    bd, lp, n = lay.bd, lay.lp, lay.n
    per_group = lay.dn // lay.groups
    seq = lambda x: _common.pad_axis(_common.pad_axis(x, 1, lay.chunk), 2, bd)
    vec = lambda x: _common.pad_axis(x.astype(f32), 0, bd)
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    bc = lambda x: _common.pad_axis(x.astype(f32), 1, lay.chunk)
    seq_spec = pl.BlockSpec((None, lp, bd), lambda b, j: (b, 0, j))
    a_spec = pl.BlockSpec((n, bd), lambda b, j: (0, j))
    arrays = [seq(u), seq(delta), _common.pad_axis(A.astype(f32).T, 1, bd)]
    specs = [seq_spec, seq_spec, a_spec]
    if bc_rows:
        arrays.append(_common.pad_axis(jnp.concatenate([bc(B), bc(C)], -1), 3, _LANES))
        specs.append(pl.BlockSpec((None, lp, None, _LANES),
                                  lambda b, j: (b, 0, j * bd // per_group, 0)))
    else:
        arrays += [bc(B), bc(C)]
        specs += [pl.BlockSpec((None, lp, None, n),
                               lambda b, j: (b, 0, j * bd // per_group, 0))] * 2
    opts = ["bc"] if bc_rows else []
    spec_of = {"z": seq_spec, "d": pl.BlockSpec((bd,), lambda b, j: (j,)),
               "h0": pl.BlockSpec((None, n, bd), lambda b, j: (b, 0, j))}
    spec_of["bias"] = spec_of["d"]
    state = lambda x: _common.pad_axis(jnp.swapaxes(x.astype(f32), 1, 2), 2, bd)
    for name, x in optional_inputs(z, D, delta_bias, h0, seq=seq, vec=vec, state=state):
        opts.append(name)
        arrays.append(x)
        specs.append(spec_of[name])
    return arrays, specs, tuple(opts)


def _split_layout(u, A, B, chunk, split, cfg, kernel):
    """(layout, split, bc_rows) of the forward (kernel="fwd") or backward ("bwd"): `split`
    lanes per channel where 32 // split channels make a block (split | N, one warp), else 1;
    B/C as lane rows (cfg.bc_rows) where the block fills the 32 lanes and 2N <= 32."""
    if split > 1:
        lay = _layout(u, A, B, chunk, _LANES // split)
        if lay.bd * split != _LANES or lay.n % split or cfg.num_warps != 1:
            split = 1
    if split == 1:
        lay = _layout(u, A, B, chunk, cfg.block_d)
    bc_rows = (cfg.bc_rows in (True, kernel) and lay.bd * split == _LANES
               and 2 * lay.n <= _LANES and cfg.num_warps == 1)
    return lay, split, bc_rows


def _call(kernel, lay, cfg, in_specs, out_shape, out_specs, name):
    return pl.pallas_call(
        kernel, grid=(lay.bsz, lay.n_blocks), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=cfg.interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1))


def _param_grads(outs, dn, A, D, delta_bias, h0, row_axes):
    """A backward kernel's gradients of A, D, delta_bias and h0, popped from `outs` in that order
    (those given): the per-program partial sums of dA ([rows, N, Dp]) and of dD / dbias added
    over `row_axes` in a fixed order here (deterministic, no atomics), cropped to dn channels."""
    da = jnp.swapaxes(outs.pop(0).sum(0), 0, 1)[:dn].astype(A.dtype)
    dd = outs.pop(0).sum(row_axes)[:dn].astype(D.dtype) if D is not None else None
    dbias = (outs.pop(0).sum(row_axes)[:dn].astype(delta_bias.dtype)
             if delta_bias is not None else None)
    dh0 = (jnp.swapaxes(outs.pop(0)[:, :, :dn], 1, 2).astype(h0.dtype)
           if h0 is not None else None)
    return da, dd, dbias, dh0


def _scan_with_vjp(forward, backward):
    """The scan as a jax.custom_vjp: forward(u, ..., h0, cfg, save_ckpt) -> (y, final, ck) (the
    checkpoints only for the backward), backward(cfg, residuals, y_bar, final_bar)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
    def scan(u, delta, A, B, C, D, z, delta_bias, h0, cfg):
        y, final, _ = forward(u, delta, A, B, C, D, z, delta_bias, h0, cfg, save_ckpt=False)
        return y, final

    def scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, cfg):
        y, final, ck = forward(u, delta, A, B, C, D, z, delta_bias, h0, cfg, save_ckpt=True)
        return (y, final), (u, delta, A, B, C, D, z, delta_bias, h0, ck)

    scan.defvjp(scan_fwd, lambda cfg, res, cts: backward(cfg, res, *cts))
    return scan


def _forward(u, delta, A, B, C, D, z, delta_bias, h0, cfg: _Config, save_ckpt: bool):
    """Runs the forward kernel; returns (y [B, L, Dn], final [B, Dn, N] f32, ckpts or None)."""
    mg = _mgpu_mode(cfg)
    use_mgpu = mg is True or (mg == "fwd" and not save_ckpt)
    if use_mgpu and cfg.mgpu_chunk % cfg.chunk == 0:
        from pallas_kernels import selective_scan_mgpu as mgpu
        groups = 1 if B.ndim == 3 else B.shape[2]
        # the pair forward: inference, and (mgpu_pair="train") the training forward whose
        # checkpoints ([B, Lp / 4, N, Dp]) the one-thread Mosaic backward or Triton's read
        pair = _mgpu_pair_mode(cfg, u)
        parts = cfg.mgpu_pair_train_parts if save_ckpt else cfg.mgpu_pair_parts
        pair_ck = (pair == "train" and cfg.chunk % parts == 0
                   and (not _mgpu_bwd_ok(cfg, u, A, B) or _mgpu_bwd_split(cfg, u, A, B) == 1
                        or cfg.mgpu_ck_unsplit))
        if (pair and (not save_ckpt or pair_ck)
                and mgpu.pair_supported(u.shape[2], groups, A.shape[1], parts)):
            ck_opts = {k: v for k, v in (("ck2", _mgpu_ck2(cfg, u, A, B)),
                                         ("direct", cfg.mgpu_ck_pair == "direct"),
                                         ("late", cfg.mgpu_ck_late)) if v}
            ck_arg = ck_opts if save_ckpt and ck_opts else save_ckpt   # _ck_options
            # the inference forward in chunks of mgpu_pair_chunk (32: session 7 call 2)
            return mgpu.forward_pair(u, delta, A, B, C, D, z, delta_bias, h0,
                                     softplus=cfg.softplus,
                                     chunk=((cfg.mgpu_pair_train_chunk or cfg.mgpu_chunk)
                                            if save_ckpt else cfg.mgpu_pair_chunk),
                                     stages=cfg.mgpu_stages, save_ckpt=ck_arg,
                                     ck_every=cfg.chunk, parts=parts, y_acc=cfg.mgpu_yacc,
                                     interpret=cfg.interpret,
                                     inf_opts=None if save_ckpt else cfg.mgpu_pair_inf,
                                     train_opts=cfg.mgpu_pair_train_opts if save_ckpt else None)
        if mgpu.supported(u.shape[2], groups):
            # the training forward's split is the Mosaic backward's (it reads that checkpoint
            # layout as it is; the Triton backward takes the unsplit one)
            to_mgpu_bwd = _mgpu_bwd_ok(cfg, u, A, B)
            if save_ckpt:
                split = (_mgpu_bwd_split(cfg, u, A, B)
                         if to_mgpu_bwd and not cfg.mgpu_ck_unsplit else 1)
            else:
                split = cfg.mgpu_split
            if A.shape[1] % 2:
                split = 1
            return mgpu.forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus=cfg.softplus,
                                save_ckpt=save_ckpt, chunk=cfg.mgpu_chunk, ck_every=cfg.chunk,
                                stages=cfg.mgpu_stages, split=split, parted_ck=to_mgpu_bwd,
                                vec_bc=cfg.mgpu_vec, unroll=cfg.mgpu_unroll or None,
                                y_acc=cfg.mgpu_yacc, poly=cfg.mgpu_poly,
                                skew=cfg.mgpu_skew, interpret=cfg.interpret)
    chunk = cfg.chunk if save_ckpt else cfg.fwd_chunk
    ck_every = chunk
    ck_unroll = cfg.ck_unroll
    if ck_unroll == "auto":
        ck_unroll = _auto_ck_unroll(u.shape[0], u.shape[2])
    body = cfg.fwd_chunk if ck_unroll is True else ck_unroll   # an int: that many steps
    if save_ckpt and ck_unroll and body % cfg.chunk == 0:
        chunk = body    # unrolled like the inference forward, checkpoints as before
    split = cfg.split or _auto_fwd_split(u.shape[0], u.shape[2])
    lay, split, bc_rows = _split_layout(u, A, B, chunk, split, cfg, "fwd")
    n_st = A.shape[1]
    tile = cfg.state_tile and cfg.num_warps == 1 and n_st == _next_pow2(n_st) <= 32
    if tile:    # one lane per channel (split 1), B/C as [N] rows
        lay = _layout(u, A, B, chunk, cfg.block_d)
        split, bc_rows = 1, False
    arrays, specs, opts = _kernel_inputs(lay, u, delta, A, B, C, D, z, delta_bias, h0, bc_rows)
    state_spec = pl.BlockSpec((None, lay.n, lay.bd), lambda b, j: (b, 0, j))
    out_shape = [jax.ShapeDtypeStruct((lay.bsz, lay.lp, lay.dp), u.dtype),
                 jax.ShapeDtypeStruct((lay.bsz, lay.n, lay.dp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, lay.lp, lay.bd), lambda b, j: (b, 0, j)), state_spec]
    if save_ckpt:
        n_ck = lay.lp // ck_every
        out_shape.append(jax.ShapeDtypeStruct((lay.bsz, n_ck, lay.n, lay.dp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, n_ck, lay.n, lay.bd), lambda b, j: (b, 0, 0, j)))
    if tile:
        kernel = functools.partial(
            _fwd_tile_kernel, n_state=lay.n, chunk=lay.chunk, n_chunks=lay.n_chunks,
            length=lay.length, padded=lay.lp != lay.length, softplus=cfg.softplus, opts=opts,
            save_ckpt=save_ckpt, ck_every=ck_every, ck_rows=cfg.ck_copy,
            ahead=min(cfg.ahead, lay.lp),
            fast_exp=cfg.fast_exp, interpret=cfg.interpret)
    else:
        kernel = functools.partial(
            _fwd_kernel, n_state=lay.n, chunk=lay.chunk, n_chunks=lay.n_chunks,
            length=lay.length, padded=lay.lp != lay.length, softplus=cfg.softplus, opts=opts,
            save_ckpt=save_ckpt, ck_every=ck_every, ck_copy=cfg.ck_copy,
            ahead=min(cfg.ahead, lay.lp), fast_exp=cfg.fast_exp, split=split,
            poly_exp=cfg.poly_exp,
            # share_dt "auto": in the inference forward, and in the training forward only
            # when it runs the 16-step chunks (slower with 4-step ones: session 4)
            share_dt=(cfg.share_dt is True or (cfg.share_dt == "auto"
                                               and (not save_ckpt or chunk != ck_every))),
            interpret=cfg.interpret)
    outs = _call(kernel, lay, cfg, specs, out_shape, out_specs, "selective_scan_fwd")(*arrays)
    y = outs[0][:, :lay.length, :lay.dn]
    final = jnp.swapaxes(outs[1][:, :, :lay.dn], 1, 2)
    return y, final, (outs[2] if save_ckpt else None)


# Warps of the split backward (bc_rows + xor_reduce: 222 registers in the SASS) that fit on one
# multiprocessor: 65536 registers / (224 * 32) = 9.
_SPLIT_BWD_WARPS_PER_SM = 9


# Warps of the v4 forward (127-128 registers in the SASS) that fit on one multiprocessor.
_FWD_WARPS_PER_SM = 16

# Warps of the 16-step training forward (ck_unroll: 168 registers in XLA's Triton, session 4).
_CKU_WARPS_PER_SM = 12


def _auto_ck_unroll(bsz, dn):
    """ck_unroll="auto": the 16-step training forward while its B * Dn / 16 one-warp programs
    fit in one wave (at 8x2048x4096 it needs 1.3 waves and was slower than the 4-step one)."""
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return bsz * -(-dn // 16) <= _CKU_WARPS_PER_SM * sms


def _auto_fwd_split(bsz, dn):
    """split=0: 4 lanes per channel in the forward while its B * Dn / 8 one-warp programs fit
    in one wave (four warps per scheduler), else 2."""
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return 4 if bsz * -(-dn // 8) <= _FWD_WARPS_PER_SM * sms else 2


def _auto_bwd_split(bsz, dn):
    """2 lanes per channel in the backward while its B * Dn / 16 one-warp programs fit in one
    wave (two warps per scheduler instead of one); past that the unsplit backward (fewer
    instructions per channel) already has two warps per scheduler."""
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return 2 if bsz * -(-dn // 16) <= _SPLIT_BWD_WARPS_PER_SM * sms else 1


def _mgpu_one_per_sm(bsz, dn):
    """Whether the one-thread Mosaic kernels' B * Dn / 128 programs fit one per SM (one warp
    per scheduler): then the pair forward (two warps per scheduler) and the looped one-thread
    backward measured faster (session 7 call 2: 8x2048x2048 and 8x8192x2048), past it (Dn
    4096 at B 8) slower than v6.1."""
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return bsz * -(-dn // 128) <= sms


def _mgpu_pair_mode(cfg: _Config, u):
    """cfg.mgpu_pair with "auto" resolved: "train" (inference and training forward) where
    the one-thread grid fits one program per SM, else False."""
    if cfg.mgpu_pair == "auto":
        return "train" if _mgpu_one_per_sm(u.shape[0], u.shape[2]) else False
    return cfg.mgpu_pair


def _mgpu_bwd_split(cfg: _Config, u, A, B) -> int:
    """cfg.mgpu_bwd_split with 0 ("auto") resolved: 1 (the looped one-thread backward, or the
    pair backward where it runs) where the one-thread grid fits one program per SM or the pair
    backward takes the shape, else 2 (v6.1's two-thread backward). Session 11 call 1: at Dn
    4096, B 8 (two programs per SM) the pair backward after the one-thread training forward
    took fwd+bwd 2.091 -> 1.870 ms (L 2048) and 8.235 -> 7.291 ms (L 8192)."""
    if cfg.mgpu_bwd_split == 0:
        pair = _pair_bwd_tiles(cfg, u, A, B) > 0
        return 1 if pair or _mgpu_one_per_sm(u.shape[0], u.shape[2]) else 2
    return cfg.mgpu_bwd_split


def _pair_bwd_tiles(cfg: _Config, u, A, B) -> int:
    """cfg.mgpu_bwd_pair's lanes per channel if the pair backward's tiling takes the shape
    (N, Dn, groups), else 0; _mgpu_bwd_pair_parts adds the conditions of the run."""
    from pallas_kernels import selective_scan_mgpu as mgpu
    parts = 2 if cfg.mgpu_bwd_pair is True else cfg.mgpu_bwd_pair
    groups = 1 if B.ndim == 3 else B.shape[2]
    return parts if parts and mgpu.pair_supported(u.shape[2], groups, A.shape[1], parts) else 0


def _mgpu_bwd_loop(cfg: _Config, u, A, B):
    """cfg.mgpu_bwd_loop with "auto" resolved: the sub-chunk loop for the one-thread backward."""
    if cfg.mgpu_bwd_loop == "auto":
        return _mgpu_bwd_split(cfg, u, A, B) == 1
    return cfg.mgpu_bwd_loop


def _is_hopper() -> bool:
    """A GPU of compute capability 9.x or newer (TMA, which the Mosaic GPU kernels use; they
    use no wgmma, so Blackwell takes them too: verified on Hopper only)."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or not cc:
        return False
    return int(str(cc).split(".")[0]) >= 9


def _mgpu_mode(cfg: _Config):
    """cfg.mgpu with "auto" resolved: the Mosaic GPU kernels (forward and backward) on a
    Hopper GPU when not in interpret mode, else the Triton kernels."""
    if cfg.mgpu == "auto":
        return not cfg.interpret and _is_hopper()
    return cfg.mgpu


def _mgpu_bwd_ok(cfg: _Config, u, A, B) -> bool:
    """Whether the Mosaic GPU backward runs (then the training forward is the Mosaic one)."""
    from pallas_kernels import selective_scan_mgpu as mgpu
    return (_mgpu_mode(cfg) is True and cfg.mgpu_bwd and cfg.mgpu_chunk % cfg.chunk == 0
            and mgpu.supported(u.shape[2], 1 if B.ndim == 3 else B.shape[2])
            and mgpu.bwd_supported(A.shape[1], cfg.chunk)
            and (_mgpu_bwd_split(cfg, u, A, B) == 1 or A.shape[1] % 2 == 0))


def _mgpu_bwd_pair_parts(cfg: _Config, u, A, B) -> int:
    """The lanes per channel of the Mosaic pair backward where it runs (0: it does not)."""
    parts = _pair_bwd_tiles(cfg, u, A, B)
    if (parts and _mgpu_bwd_ok(cfg, u, A, B) and _mgpu_bwd_split(cfg, u, A, B) == 1
            and (cfg.mgpu_bwd_pair_chunk or cfg.mgpu_chunk) % cfg.chunk == 0):
        return parts
    return 0


def _mgpu_ck2(cfg: _Config, u, A, B) -> bool:
    """Whether the checkpoints take the ck2 layout (cfg.mgpu_ck_pair): the training forward is
    the pair one (two lanes) and the backward the Mosaic one-thread or pair (two lanes) one;
    _forward and _backward both ask this."""
    from pallas_kernels import selective_scan_mgpu as mgpu
    groups = 1 if B.ndim == 3 else B.shape[2]
    return bool(cfg.mgpu_ck_pair and _mgpu_bwd_ok(cfg, u, A, B)
                and _mgpu_bwd_split(cfg, u, A, B) == 1
                and _mgpu_bwd_pair_parts(cfg, u, A, B) in (0, 2)
                and _mgpu_pair_mode(cfg, u) == "train" and cfg.mgpu_pair_train_parts == 2
                and cfg.chunk % 2 == 0 and mgpu.pair_supported(u.shape[2], groups, A.shape[1]))


def _backward(cfg: _Config, res, y_bar, final_bar):
    u, delta, A, B, C, D, z, delta_bias, h0, ck = res
    if _mgpu_bwd_ok(cfg, u, A, B):    # the checkpoints come from the Mosaic training forward
        from pallas_kernels import selective_scan_mgpu as mgpu
        parts = _mgpu_bwd_pair_parts(cfg, u, A, B)
        ck2 = _mgpu_ck2(cfg, u, A, B)     # the pair training forward's ck2 layout
        if parts:
            return mgpu.backward_pair(res, y_bar, final_bar, softplus=cfg.softplus,
                                      chunk=cfg.mgpu_bwd_pair_chunk or cfg.mgpu_chunk,
                                      ck_every=cfg.chunk,
                                      stages=cfg.mgpu_stages,
                                      bwd_loop=_mgpu_bwd_loop(cfg, u, A, B) is not False,
                                      parts=parts,
                                      rowsum=(cfg.mgpu_bwd_rowsum if type(cfg.mgpu_bwd_rowsum)
                                              is int else cfg.mgpu_bwd_rowsum is not False),
                                      ck_pair=ck2, keep_b=cfg.mgpu_bwd_keep_b,
                                      pad_rows=cfg.mgpu_bwd_pad_rows,
                                      ahead=cfg.mgpu_bwd_pair_ahead,
                                      direct_out=cfg.mgpu_bwd_direct_out,
                                      warp_red=cfg.mgpu_bwd_warp_red,
                                      dbc_add=cfg.mgpu_bwd_dbc_add,
                                      rawp=cfg.mgpu_bwd_rawp,
                                      perm=cfg.mgpu_bwd_perm,
                                      red_early=cfg.mgpu_bwd_red_early,
                                      interpret=cfg.interpret)
        return mgpu.backward(res, y_bar, final_bar, softplus=cfg.softplus,
                             chunk=cfg.mgpu_chunk, ck_every=cfg.chunk, stages=cfg.mgpu_stages,
                             keep_decay=cfg.mgpu_keep, split=_mgpu_bwd_split(cfg, u, A, B),
                             vec_bc=cfg.mgpu_vec, bwd_loop=_mgpu_bwd_loop(cfg, u, A, B),
                             bwd_ahead=cfg.mgpu_bwd_ahead,
                             rowsum=(_mgpu_bwd_split(cfg, u, A, B) == 1
                                     if cfg.mgpu_bwd_rowsum == "auto" else cfg.mgpu_bwd_rowsum),
                             ck2=ck2, interpret=cfg.interpret)
    split = cfg.bwd_split if cfg.lane_reduce and cfg.num_warps == 1 else 1
    if split == 0:
        split = _auto_bwd_split(u.shape[0], u.shape[2])
    lay, split, bc_rows = _split_layout(u, A, B, cfg.chunk, split, cfg, "bwd")
    tile = False
    if cfg.bwd_tile and cfg.num_warps == 1 and A.shape[1] == 16:
        tile_lay = _layout(u, A, B, cfg.chunk, _LANES)
        if tile_lay.bd == _LANES:    # one lane per channel, N = 16 states in the lane
            lay, split, bc_rows, tile = tile_lay, 1, False, True
    arrays, specs, opts = _kernel_inputs(lay, u, delta, A, B, C, D, z, delta_bias, None,
                                         bc_rows)
    f32 = jnp.float32
    bsz, lp, dp, bd, n = lay.bsz, lay.lp, lay.dp, lay.bd, lay.n
    seq = lambda x: _common.pad_axis(_common.pad_axis(x, 1, lay.chunk), 2, bd)
    seq_spec = pl.BlockSpec((None, lp, bd), lambda b, j: (b, 0, j))
    state_spec = pl.BlockSpec((None, n, bd), lambda b, j: (b, 0, j))
    if ck.shape[-1] != dp:   # the forward's channel block can differ (split): re-pad
        ck = _common.pad_axis(ck[..., :lay.dn], 3, bd)
    if ck.shape[1] != lay.n_chunks:   # ck_unroll: the forward padded L to its longer chunk
        ck = ck[:, :lay.n_chunks]
    arrays += [ck, seq(y_bar.astype(u.dtype)),
               _common.pad_axis(jnp.swapaxes(final_bar.astype(f32), 1, 2), 2, bd)]
    specs += [pl.BlockSpec((None, lay.n_chunks, n, bd), lambda b, j: (b, 0, 0, j)), seq_spec,
              state_spec]
    lane_reduce = (cfg.lane_reduce or tile) and bd * split == _LANES and cfg.num_warps == 1
    # lane_reduce: per pass, 32 columns = `split` parts of bd values (2K = 2N / split of them
    # per part, padded to whole passes); else the 2N sums directly.
    n_q = _LANES * -(-2 * n // split // bd) if lane_reduce else 2 * n
    k_st = n // split
    xor_reduce = cfg.xor_reduce and lane_reduce and 2 * k_st == bd and k_st & (k_st - 1) == 0
    bf16 = cfg.dbc_bf16 and B.dtype == C.dtype == jnp.bfloat16
    part = jax.ShapeDtypeStruct((bsz, lp, lay.n_blocks, n_q), jnp.bfloat16 if bf16 else f32)
    part_spec = pl.BlockSpec((None, lp, None, n_q), lambda b, j: (b, 0, j, 0))
    per_batch = jax.ShapeDtypeStruct((bsz, dp), f32)
    per_batch_spec = pl.BlockSpec((None, bd), lambda b, j: (b, j))
    state = jax.ShapeDtypeStruct((bsz, n, dp), f32)
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), u.dtype),
                 jax.ShapeDtypeStruct((bsz, lp, dp), delta.dtype)]
    out_specs = [seq_spec, seq_spec]
    if z is not None:
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp, dp), z.dtype))
        out_specs.append(seq_spec)
    out_shape += [part, state]
    out_specs += [part_spec, state_spec]
    for x in (D, delta_bias):
        if x is not None:
            out_shape.append(per_batch)
            out_specs.append(per_batch_spec)
    out_shape.append(state)
    out_specs.append(state_spec)
    if tile:
        xor_reduce = False
        kernel = functools.partial(
            _bwd_tile_kernel, n_state=n, chunk=lay.chunk, n_chunks=lay.n_chunks,
            length=lay.length, padded=lp != lay.length, softplus=cfg.softplus, opts=opts,
            fast_exp=cfg.fast_exp, keep_decay=cfg.keep_decay, interpret=cfg.interpret)
    else:
        kernel = functools.partial(
            _bwd_kernel, n_state=n, chunk=lay.chunk, n_chunks=lay.n_chunks,
            length=lay.length, padded=lp != lay.length, softplus=cfg.softplus, opts=opts,
            ahead=min(cfg.bwd_ahead, lay.chunk), lane_reduce=lane_reduce,
            fast_exp=cfg.fast_exp, split=split, keep_decay=cfg.keep_decay,
            xor_reduce=xor_reduce,
            share=cfg.bwd_share and lane_reduce and split > 1 and lay.chunk % split == 0,
            interpret=cfg.interpret)
    outs = list(_call(kernel, lay, cfg, specs, out_shape, out_specs,
                      "selective_scan_bwd")(*arrays))

    crop = lambda x: x[:, :lay.length, :lay.dn]
    du, ddelta = crop(outs.pop(0)), crop(outs.pop(0))
    dz = crop(outs.pop(0)) if z is not None else None
    # Deterministic reductions: the per-block partial sums of dB/dC and the per-batch dA/dD/dbias
    # are added here in a fixed order (no atomics).
    group_sum = lambda x: rearrange(x.astype(f32), "b l (g k) n -> b l g k n",
                                    g=lay.groups).sum(3)
    dbc = group_sum(outs.pop(0))[:, :lay.length]
    if xor_reduce:   # columns [part, state, (dB, dC)]
        dbc = rearrange(dbc, "... (k t) -> ... t k", t=2)
        db, dc = dbc[..., 0, :], dbc[..., 1, :]
    elif split > 1:  # [pass, part, value] columns -> [part, value]; values: K of dB, K of dC
        dbc = rearrange(dbc, "... (j p q) -> ... p (j q)", p=split, q=bd)[..., :2 * (n // split)]
        db = rearrange(dbc[..., :n // split], "... p k -> ... (p k)")
        dc = rearrange(dbc[..., n // split:], "... p k -> ... (p k)")
    else:
        db, dc = dbc[..., :n], dbc[..., n:2 * n]
    if B.ndim == 3:
        db, dc = db[:, :, 0], dc[:, :, 0]
    da, dd, dbias, dh0 = _param_grads(outs, lay.dn, A, D, delta_bias, h0, 0)
    return (du, ddelta, da, db.astype(B.dtype), dc.astype(C.dtype), dd, dz, dbias, dh0)


_scan_pallas = _scan_with_vjp(_forward, _backward)


def selective_scan_pallas(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, chunk=4, fwd_chunk=16,
                          block_d=32, num_warps=1, ahead=4, bwd_ahead=1, lane_reduce=True,
                          fast_exp=True, split=2, bwd_split=2, keep_decay=False,
                          bc_rows=True, xor_reduce=False, poly_exp=0, share_dt="auto",
                          dbc_bf16=False, bwd_share=False, ck_unroll="auto", ck_copy=False,
                          state_tile=False, bwd_tile=False, mgpu="auto", mgpu_chunk=16,
                          mgpu_stages=2, mgpu_bwd=True, mgpu_keep=True, mgpu_split=1,
                          mgpu_bwd_split=0, mgpu_vec=True, mgpu_ck_unsplit=True,
                          mgpu_unroll=0, mgpu_yacc=1, mgpu_bwd_loop="auto", mgpu_poly=0,
                          mgpu_skew=False, mgpu_bwd_ahead=False, mgpu_pair="auto",
                          mgpu_pair_inf=(("rawp", True), ("sp1", True), ("ybuf", 3),
                                         ("ydefer", 16)),
                          mgpu_pair_train_opts=(("ydefer", 8),),
                          mgpu_pair_chunk=32, mgpu_pair_parts=2, mgpu_pair_train_parts=2,
                          mgpu_bwd_pair=True, mgpu_bwd_rowsum="auto", mgpu_pair_train_chunk=32,
                          mgpu_ck_pair="direct", mgpu_bwd_keep_b=True, mgpu_bwd_pad_rows=True,
                          mgpu_ck_late=True, mgpu_bwd_pair_ahead=True, mgpu_bwd_direct_out=False,
                          mgpu_bwd_warp_red=True, mgpu_bwd_pair_chunk=8,
                          mgpu_bwd_dbc_add=True, mgpu_bwd_rawp=False, mgpu_bwd_perm=True,
                          mgpu_bwd_red_early=False, interpret=False):
    """The GPU Pallas kernels with explicit tiling; returns (y, final_state).

    v13 (session 13, wherever the pair backward runs at N 16): each backward thread keeps its
    8 states in an order permuted by its lane bits 2-3 (mgpu_bwd_perm), so that two of the
    four butterfly levels that sum dB/dC over a half-warp's 16 channels keep and send fixed
    registers: 6 selects per step and thread instead of 30 (B / C read by 8-byte loads at
    permuted columns, the checkpoints from permuted rows, A / dh / dA permuted once per
    program). H200, bf16, fwd+bwd (interleaved, medians of 5): 8x2048x2048 0.888 -> 0.820 ms
    (backward kernel 650 -> 584 us), 8x8192x2048 3.514 -> 3.242, 8x2048x4096 1.800 -> 1.673
    (bench/mamba.py "v12" spells v12 out).

    v12 (session 12, wherever the pair backward runs): the pair backward sums its dB/dC rows
    over the programs itself, by TMA reduce-add into one [B, G, L, 32] f32 buffer
    (mgpu_bwd_dbc_add), instead of writing [B, Dn / 64, L, 32] block rows for an XLA reduce
    (67 MB at 8x2048x2048). The f32 sum over a group's programs then runs in arrival order:
    dB and dC may differ run to run by f32 rounding (dA, dD, d bias, du, ddelta, dz do not);
    mgpu_bwd_dbc_add=False is the bitwise-reproducible v11 path. H200, bf16, fwd+bwd
    (interleaved, medians): 8x2048x2048 0.911 -> 0.885 ms (two processes: -2.6 / -2.8 %),
    8x8192x2048 3.579 -> 3.495, 8x2048x4096 1.858 -> 1.800 (bench/mamba.py "v11" spells v11
    out). Opt-in (not faster): mgpu_bwd_rawp with mgpu_pair_train_opts ("rawp", True), A, D
    and bias laid out by the training kernels (bench "dbar").

    v11 (session 11): past one program per SM (Dn 4096 at B 8) the backward is the pair one
    too (mgpu_bwd_split=0 resolves to 1 wherever the pair backward takes the shape), reading
    the one-thread training forward's checkpoints; v6.1's two-thread backward stays an option
    (mgpu_bwd_split=2) that no default shape takes any more (the pair backward tiles every
    grouped shape the Mosaic kernels accept; odd N past one program per SM takes the Triton
    backward, see docs/kernels/selective_scan.md "Which kernel runs where"). H200, bf16:
    8x2048x4096 fwd+bwd 2.091 -> 1.870 ms, 8x8192x4096 8.235 -> 7.291 ms
    (one interleaved process each; bench/mamba.py "p4kb" spelled it out, "v10_4k" is the old).

    v10 (session 10, where v9 applies; bench/mamba.py "v10a", docs/kernels/selective_scan.md):
    v9 with the pair backward's dB/dC summed over each half-warp's channels by shuffles
    (mgpu_bwd_warp_red) in 8-step chunks (mgpu_bwd_pair_chunk), the pair training forward
    holding y of 8 step pairs in registers (mgpu_pair_train_opts ydefer 8), and the pair
    inference forward taking A, D and bias as they are (rawp) with three y slots (ybuf 3).
    On an H200 at 8x2048x2048 bf16: forward 0.195 vs 0.199 ms, forward+backward 0.909 vs
    0.955 ms; at 8x8192x2048 0.743 vs 0.749 and 3.595 vs 3.718 ms (one interleaved process).
    bench/mamba.py "v9" spells v9 out.

    v9 (session 9, the training path where the one-thread grid fits one program per SM): the
    backward with two lanes per channel (mgpu_bwd_pair=True: selective_scan_mgpu.backward_pair)
    keeping the recompute's B_t (mgpu_bwd_keep_b), its input rows as 5 TMA tiles
    (mgpu_bwd_pad_rows) and each sub-chunk's recompute in the previous one's row sums
    (mgpu_bwd_pair_ahead); the pair training forward's checkpoints in the ck2 layout stored
    from registers (mgpu_ck_pair="direct") after the following step group (mgpu_ck_late).
    v8 had all six off (bench/mamba.py "v8").

    Defaults (v8, session 8 call 2 on an H200, docs/kernels/selective_scan.md): on a Hopper
    GPU (mgpu="auto") the Mosaic GPU kernels of selective_scan_mgpu. Where the one-thread
    grid B * Dn / 128 fits one program per SM (8x2048x2048, 8x8192x2048): the forwards with
    two lanes per channel in one warp (mgpu_pair="auto": forward_pair, inference and training
    in 32-step chunks: mgpu_pair_chunk, mgpu_pair_train_chunk) and the one-thread backward
    looped over its sub-chunks (mgpu_bwd_split=0, mgpu_bwd_loop="auto"), its dB/dC rows
    summed in registers (mgpu_bwd_rowsum="auto"; v7 had mgpu_pair_train_chunk=0,
    mgpu_bwd_rowsum=False). Larger grids (Dn 4096 at B 8): v6.1, the inference and training
    forwards with one channel per thread (B/C by TMA into shared memory; the training
    forward's checkpoints read as parts by the backward: mgpu_ck_unsplit=True), the backward
    with two threads per channel; shapes they
    do not take (grouped B/C with Dn / G not a multiple of 128; the backward N > 16) and other
    GPUs run the Triton kernels. The Triton defaults (v5, "auto5" of bench/mamba.py): v4
    (B/C as lane rows (bc_rows) in both kernels, both split over two lanes per channel)
    with the delta of each channel-step computed once and shuffled to the lane parts in the
    inference forward, and the training forward over 16-step chunks with that shared delta
    while its grid fits one wave (share_dt="auto", ck_unroll="auto"). v4 was share_dt=False,
    ck_unroll=False; v3 bc_rows=False, bwd_split=1; v2.1 also chunk=8, ahead=0, bwd_ahead=0,
    lane_reduce=False, fast_exp=False, split=1.

    Session 9 (the pair inference forward, mgpu_pair_inf): softplus with one MUFU op (sp1)
    and each chunk's y rows held in registers and stored together (ydefer), through
    selective_scan_mgpu._fwd_pair_inf_body; mgpu_pair_inf=None is v8's body. Opt-in there:
    ("bcin", True) reads B / C by TMA as they are and converts them per chunk in the kernel
    (no XLA preparation kernel; N % 8 == 0, else the prepared rows). mgpu_pair_train_opts
    (opt-in, the pair training forward): ("ydefer", D) holds y of D step pairs in registers,
    ("sp1", True) the one-MUFU softplus, as the inference forward's options."""
    cfg = _Config(softplus=delta_softplus, chunk=chunk, fwd_chunk=fwd_chunk, block_d=block_d,
                  num_warps=num_warps, ahead=ahead, bwd_ahead=bwd_ahead,
                  lane_reduce=lane_reduce,
                  fast_exp=fast_exp, split=split, bwd_split=bwd_split, keep_decay=keep_decay,
                  bc_rows=bc_rows, xor_reduce=xor_reduce, poly_exp=poly_exp,
                  share_dt=share_dt, dbc_bf16=dbc_bf16, bwd_share=bwd_share,
                  ck_unroll=ck_unroll, ck_copy=ck_copy, state_tile=state_tile,
                  bwd_tile=bwd_tile, mgpu=mgpu, mgpu_chunk=mgpu_chunk,
                  mgpu_stages=mgpu_stages, mgpu_bwd=mgpu_bwd, mgpu_keep=mgpu_keep,
                  mgpu_split=mgpu_split, mgpu_bwd_split=mgpu_bwd_split, mgpu_vec=mgpu_vec,
                  mgpu_ck_unsplit=mgpu_ck_unsplit, mgpu_unroll=mgpu_unroll,
                  mgpu_yacc=mgpu_yacc, mgpu_bwd_loop=mgpu_bwd_loop, mgpu_poly=mgpu_poly,
                  mgpu_skew=mgpu_skew, mgpu_bwd_ahead=mgpu_bwd_ahead, mgpu_pair=mgpu_pair,
                  mgpu_pair_inf=(None if mgpu_pair_inf is None
                                 else tuple(sorted(dict(mgpu_pair_inf).items()))),
                  mgpu_pair_train_opts=(None if not mgpu_pair_train_opts
                                        else tuple(sorted(dict(mgpu_pair_train_opts).items()))),
                  mgpu_pair_chunk=mgpu_pair_chunk, mgpu_pair_parts=mgpu_pair_parts,
                  mgpu_pair_train_parts=mgpu_pair_train_parts, mgpu_bwd_pair=mgpu_bwd_pair,
                  mgpu_bwd_rowsum=mgpu_bwd_rowsum, mgpu_pair_train_chunk=mgpu_pair_train_chunk,
                  mgpu_ck_pair=mgpu_ck_pair, mgpu_bwd_keep_b=mgpu_bwd_keep_b,
                  mgpu_bwd_pad_rows=mgpu_bwd_pad_rows, mgpu_ck_late=mgpu_ck_late,
                  mgpu_bwd_pair_ahead=mgpu_bwd_pair_ahead,
                  mgpu_bwd_direct_out=mgpu_bwd_direct_out,
                  mgpu_bwd_warp_red=mgpu_bwd_warp_red,
                  mgpu_bwd_pair_chunk=mgpu_bwd_pair_chunk,
                  mgpu_bwd_dbc_add=mgpu_bwd_dbc_add, mgpu_bwd_rawp=mgpu_bwd_rawp,
                  mgpu_bwd_perm=mgpu_bwd_perm, mgpu_bwd_red_early=mgpu_bwd_red_early,
                  interpret=interpret)
    return _scan_pallas(u, delta, A, B, C, D, z, delta_bias, initial_state, cfg)


# ---------------------------------------------------------------------------------------------
# Mosaic TPU kernels (numerics checked in TPU interpret mode on CPU, the real lowering and a
# deviceless TPU compile by tests/kernels/test_tpu_lowering.py; never run on a TPU: docs/tpu.md).
#
# Grid (batch, channel blocks, chunks), the chunk axis sequential ("arbitrary"). Channels sit on
# the 128 lanes, the N states on sublanes: the state is one [N, bd] f32 VMEM scratch carried
# across the chunk axis. Inside a chunk a fori_loop walks the steps (Mosaic lowers only
# fori-like loops); B_t arrives as a [1, N] row and becomes the [N, 1] column that scales the
# state through a masked sum with the identity (a cheap transpose of one row). Grouped B/C with
# groups narrower than 128 lanes: a block holds `gpb` whole groups, B_t arrives as one [1, gpb*N]
# row and a 0/1 matmul spreads it to the [N, bd] B_t of each lane (_tpu_bc).

def _tpu_column(row_1N, eye_NN):
    return jnp.sum(eye_NN * row_1N, axis=1, keepdims=True)


def _tpu_row(col_N1, eye_NN):
    return jnp.sum(eye_NN * col_N1, axis=0, keepdims=True)


def _tpu_eye(n):
    rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    return (rows == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(jnp.float32)


def _tpu_bc_maps(n, bd, groups):
    """None for a block inside one group; for `gpb` groups of per_group lanes in a block (K =
    gpb * N): P [N, K] (k % N == n), P^T, and Q [K, bd] (k // N == lane // per_group)."""
    gpb, per_group = groups
    if gpb == 1:
        return None
    iota = jax.lax.broadcasted_iota
    k = gpb * n
    p = iota(jnp.int32, (n, k), 1) % n == iota(jnp.int32, (n, k), 0)
    pt = iota(jnp.int32, (k, n), 0) % n == iota(jnp.int32, (k, n), 1)
    q = iota(jnp.int32, (k, bd), 0) // n == iota(jnp.int32, (k, bd), 1) // per_group
    return p.astype(jnp.float32), pt.astype(jnp.float32), q.astype(jnp.float32)


def _tpu_dot(a, b):
    return jax.lax.dot(a, b, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)


def _tpu_bc(row_1K, eye_KK, maps):
    """B_t (or C_t) for every lane: an [N, 1] column (one group), else [N, bd]."""
    col = _tpu_column(row_1K, eye_KK)
    if maps is None:
        return col
    p, _, q = maps
    return _tpu_dot(p, col * q)


def _tpu_bc_grad(x_NB, eye_KK, maps):
    """The adjoint of _tpu_bc: x [N, bd] summed over the lanes of each group, as a [1, K] row."""
    if maps is None:
        return _tpu_row(jnp.sum(x_NB, axis=1, keepdims=True), eye_KK)
    _, pt, q = maps
    return _tpu_row(jnp.sum(_tpu_dot(pt, x_NB) * q, axis=1, keepdims=True), eye_KK)


def _tpu_fwd_kernel(*refs, chunk, n_chunks, length, softplus, opts, save_ckpt, groups):
    # u/dt/z/y [T, bd]; a [N, bd]; b/c [T, K] (K = gpb * N); d/bias [1, bd]; h0/hT/ck [N, bd]
    names = ["u", "dt", "a", "b", "c", *[k for k in _OPTIONAL if k in opts], "y", "hT"]
    r = _name_refs(refs, names + (["ck"] if save_ckpt else []) + ["h_scr"])
    c = pl.program_id(2)
    n_state, bd = r["a"].shape
    eye = _tpu_eye(r["b"].shape[-1])
    maps = _tpu_bc_maps(n_state, bd, groups)

    @pl.when(c == 0)
    def _():
        r["h_scr"][...] = r["h0"][...] if "h0" in r else jnp.zeros_like(r["h_scr"])

    if save_ckpt:
        r["ck"][...] = r["h_scr"][...]
    A = r["a"][...]

    def step(t, h):
        row = pl.ds(t, 1)
        u = r["u"][row, :]
        x = r["dt"][row, :] + (r["bias"][...] if "bias" in r else 0.0)
        dt = _softplus(x) if softplus else x
        dt = jnp.where(c * chunk + t < length, dt, 0.0)
        h = jnp.exp(dt * A) * h + (dt * u) * _tpu_bc(r["b"][row, :], eye, maps)
        y = jnp.sum(h * _tpu_bc(r["c"][row, :], eye, maps), axis=0, keepdims=True)
        if "d" in r:
            y = y + r["d"][...] * u
        if "z" in r:
            z = r["z"][row, :]
            y = y * (z * jax.nn.sigmoid(z))
        r["y"][row, :] = y
        return h

    h = jax.lax.fori_loop(0, chunk, step, r["h_scr"][...])
    r["h_scr"][...] = h

    @pl.when(c == n_chunks - 1)
    def _():
        r["hT"][...] = h


def _tpu_bwd_kernel(*refs, chunk, n_chunks, length, softplus, opts, groups):
    # Same math as _bwd_kernel; the chunk's states go to a [T + 1, N, bd] VMEM scratch.
    in_names = ["u", "dt", "a", "b", "c", *[k for k in ("z", "d", "bias") if k in opts],
                "ck", "dy", "dhT"]
    out_names = ["du", "ddt", *(["dz"] if "z" in opts else []), "db", "dc", "da",
                 *(["dd"] if "d" in opts else []), *(["dbias"] if "bias" in opts else []), "dh0"]
    r = _name_refs(refs, in_names + out_names + ["hs", "dh", "dA", "dD", "dbias_acc"])
    k = pl.program_id(2)
    c = n_chunks - 1 - k
    n_state, bd = r["a"].shape
    eye = _tpu_eye(r["b"].shape[-1])
    maps = _tpu_bc_maps(n_state, bd, groups)
    A = r["a"][...]

    @pl.when(k == 0)
    def _():
        r["dh"][...] = r["dhT"][...]
        r["dA"][...] = jnp.zeros_like(r["dA"])
        r["dD"][...] = jnp.zeros_like(r["dD"])
        r["dbias_acc"][...] = jnp.zeros_like(r["dbias_acc"])

    def delta(t):
        x = r["dt"][pl.ds(t, 1), :] + (r["bias"][...] if "bias" in r else 0.0)
        dt = _softplus(x) if softplus else x
        return jnp.where(c * chunk + t < length, dt, 0.0), x

    def forward(t, h):
        dt, _ = delta(t)
        b_col = _tpu_bc(r["b"][pl.ds(t, 1), :], eye, maps)
        h = jnp.exp(dt * A) * h + (dt * r["u"][pl.ds(t, 1), :]) * b_col
        r["hs"][t + 1] = h
        return h

    r["hs"][0] = r["ck"][...]
    jax.lax.fori_loop(0, chunk, forward, r["ck"][...])

    def reverse(j, carry):
        dh, da, dd, dbias = carry
        t = chunk - 1 - j
        row = pl.ds(t, 1)
        u = r["u"][row, :]
        dt, x = delta(t)
        dout = r["dy"][row, :]
        h_prev, h_t = r["hs"][t], r["hs"][t + 1]
        b_col = _tpu_bc(r["b"][row, :], eye, maps)
        c_col = _tpu_bc(r["c"][row, :], eye, maps)
        if "z" in r:
            z = r["z"][row, :]
            sz = jax.nn.sigmoid(z)
            y = jnp.sum(h_t * c_col, axis=0, keepdims=True)
            if "d" in r:
                y = y + r["d"][...] * u
            r["dz"][row, :] = dout * y * sz * (1.0 + z * (1.0 - sz))
            dy = dout * z * sz
        else:
            dy = dout
        g = dh + c_col * dy                                      # [N, bd]
        r["dc"][row, :] = _tpu_bc_grad(dy * h_t, eye, maps)
        r["db"][row, :] = _tpu_bc_grad(g * (dt * u), eye, maps)
        a = jnp.exp(dt * A)
        dh_prev = a * g                                          # q = g a h_prev = dh h_prev
        q = dh_prev * h_prev
        da = da + dt * q
        gb = jnp.sum(g * b_col, axis=0, keepdims=True)
        du = dt * gb
        if "d" in r:
            du = du + r["d"][...] * dy
            dd = dd + dy * u
        r["du"][row, :] = du
        ddt = u * gb + jnp.sum(A * q, axis=0, keepdims=True)
        if softplus:
            ddt = ddt * jax.nn.sigmoid(x)
        ddt = jnp.where(c * chunk + t < length, ddt, 0.0)
        r["ddt"][row, :] = ddt
        return dh_prev, da, dd, dbias + ddt

    carry = (r["dh"][...], r["dA"][...], r["dD"][...], r["dbias_acc"][...])
    dh, da, dd, dbias = jax.lax.fori_loop(0, chunk, reverse, carry)
    r["dh"][...], r["dA"][...], r["dD"][...], r["dbias_acc"][...] = dh, da, dd, dbias

    @pl.when(k == n_chunks - 1)
    def _():
        r["dh0"][...] = dh
        r["da"][...] = da
        if "dd" in r:
            r["dd"][...] = dd
        if "dbias" in r:
            r["dbias"][...] = dbias


def _tpu_layout(u, A, B, chunk) -> _Layout:
    """Channel blocks of 128 lanes (all channels when fewer). With grouped B/C a block lies in
    one group (groups of a multiple of 128 channels) or holds whole groups: lcm(per_group, 128)
    lanes where that divides Dn, else all channels (a legal Mosaic tile either way)."""
    bsz, length, dn = u.shape
    groups = 1 if B.ndim == 3 else B.shape[2]
    per_group = dn // groups
    if groups == 1:
        bd = dn if dn < 128 else 128
    elif per_group % 128 == 0:
        bd = 128
    else:
        bd = math.lcm(per_group, 128)
        bd = bd if dn % bd == 0 else dn
    return _Layout(bsz, length, dn, A.shape[1], groups, bd, _common.round_up(dn, bd),
                   _common.round_up(length, chunk), chunk)


def _tpu_groups(lay: _Layout):
    """(groups per channel block, channels per group) of the TPU kernels."""
    per_group = lay.dn // lay.groups
    return max(1, lay.bd // per_group) if lay.groups > 1 else 1, per_group


def _tpu_inputs(lay: _Layout, u, delta, A, B, C, D, z, delta_bias, h0):
    f32 = jnp.float32
    T, bd, n = lay.chunk, lay.bd, lay.n
    per_group = lay.dn // lay.groups
    seq = lambda x: _common.pad_axis(_common.pad_axis(x.astype(f32), 1, T), 2, bd)
    row = lambda x: _common.pad_axis(x.astype(f32), 0, bd)[None]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    gpb = _tpu_groups(lay)[0]
    # [B, G / gpb, Lp, gpb * N]: the B/C rows of the gpb groups of a channel block side by side
    bc = lambda x: _common.pad_axis(
        rearrange(x.astype(f32), "b l (g k) n -> b g l (k n)", k=gpb), 2, T)
    seq_spec = pl.BlockSpec((None, T, bd), lambda b, j, c: (b, c, j))
    bc_spec = pl.BlockSpec((None, None, T, gpb * n),
                           lambda b, j, c: (b, j * bd // (per_group * gpb), c, 0))
    arrays = [seq(u), seq(delta), _common.pad_axis(A.astype(f32).T, 1, bd), bc(B), bc(C)]
    specs = [seq_spec, seq_spec, pl.BlockSpec((n, bd), lambda b, j, c: (0, j)), bc_spec, bc_spec]
    opts = []
    for name, x in (("z", z), ("d", D), ("bias", delta_bias), ("h0", h0)):
        if x is None:
            continue
        opts.append(name)
        if name == "z":
            arrays.append(seq(x))
            specs.append(seq_spec)
        elif name == "h0":
            arrays.append(_common.pad_axis(jnp.swapaxes(x.astype(f32), 1, 2), 2, bd))
            specs.append(pl.BlockSpec((None, n, bd), lambda b, j, c: (b, 0, j)))
        else:
            arrays.append(row(x))
            specs.append(pl.BlockSpec((1, bd), lambda b, j, c: (0, j)))
    return arrays, specs, tuple(opts)


def _reverse_specs(specs, n_chunks):
    """The same blocks, visited from the last chunk to the first."""
    return [pl.BlockSpec(s.block_shape,
                         lambda b, j, c, f=s.index_map: f(b, j, n_chunks - 1 - c))
            for s in specs]


def _tpu_call(kernel, lay, cfg, in_specs, out_shape, out_specs, scratch, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, name=name,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(lay.bsz, lay.n_blocks, lay.n_chunks),
            in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if cfg.interpret else False)


def _tpu_forward(u, delta, A, B, C, D, z, delta_bias, h0, cfg: _Config, save_ckpt: bool):
    lay = _tpu_layout(u, A, B, cfg.chunk)
    arrays, specs, opts = _tpu_inputs(lay, u, delta, A, B, C, D, z, delta_bias, h0)
    f32 = jnp.float32
    n, bd = lay.n, lay.bd
    state_spec = pl.BlockSpec((None, n, bd), lambda b, j, c: (b, 0, j))
    out_shape = [jax.ShapeDtypeStruct((lay.bsz, lay.lp, lay.dp), f32),
                 jax.ShapeDtypeStruct((lay.bsz, n, lay.dp), f32)]
    out_specs = [pl.BlockSpec((None, lay.chunk, bd), lambda b, j, c: (b, c, j)), state_spec]
    if save_ckpt:
        out_shape.append(jax.ShapeDtypeStruct((lay.bsz, lay.n_chunks, n, lay.dp), f32))
        out_specs.append(pl.BlockSpec((None, None, n, bd), lambda b, j, c: (b, c, 0, j)))
    kernel = functools.partial(_tpu_fwd_kernel, chunk=lay.chunk, n_chunks=lay.n_chunks,
                               length=lay.length, softplus=cfg.softplus, opts=opts,
                               save_ckpt=save_ckpt, groups=_tpu_groups(lay))
    outs = _tpu_call(kernel, lay, cfg, specs, out_shape, out_specs, [pltpu.VMEM((n, bd), f32)],
                     "selective_scan_fwd_tpu")(*arrays)
    y = outs[0][:, :lay.length, :lay.dn].astype(u.dtype)
    final = jnp.swapaxes(outs[1][:, :, :lay.dn], 1, 2)
    return y, final, (outs[2] if save_ckpt else None)


def _tpu_backward(cfg: _Config, res, y_bar, final_bar):
    u, delta, A, B, C, D, z, delta_bias, h0, ck = res
    lay = _tpu_layout(u, A, B, cfg.chunk)
    arrays, specs, opts = _tpu_inputs(lay, u, delta, A, B, C, D, z, delta_bias, None)
    f32 = jnp.float32
    bsz, lp, dp, bd, n, T = lay.bsz, lay.lp, lay.dp, lay.bd, lay.n, lay.chunk
    seq_spec = pl.BlockSpec((None, T, bd), lambda b, j, c: (b, c, j))
    state_spec = pl.BlockSpec((None, n, bd), lambda b, j, c: (b, 0, j))
    arrays += [ck, _common.pad_axis(_common.pad_axis(y_bar.astype(f32), 1, T), 2, bd),
               _common.pad_axis(jnp.swapaxes(final_bar.astype(f32), 1, 2), 2, bd)]
    specs += [pl.BlockSpec((None, None, n, bd), lambda b, j, c: (b, c, 0, j)), seq_spec]
    specs = _reverse_specs(specs, lay.n_chunks) + [state_spec]
    seq_out = jax.ShapeDtypeStruct((bsz, lp, dp), f32)
    gpb = _tpu_groups(lay)[0]
    part = jax.ShapeDtypeStruct((bsz, lay.n_blocks, lp, gpb * n), f32)
    part_spec = pl.BlockSpec((None, None, T, gpb * n), lambda b, j, c: (b, j, c, 0))
    row_out = jax.ShapeDtypeStruct((bsz, 1, dp), f32)
    row_spec = pl.BlockSpec((None, 1, bd), lambda b, j, c: (b, 0, j))
    state = jax.ShapeDtypeStruct((bsz, n, dp), f32)
    out_shape = [seq_out, seq_out] + ([seq_out] if z is not None else []) + [part, part, state]
    out_specs = [seq_spec, seq_spec] + ([seq_spec] if z is not None else []) + [part_spec,
                                                                                part_spec]
    out_specs = _reverse_specs(out_specs, lay.n_chunks) + [state_spec]
    for x in (D, delta_bias):
        if x is not None:
            out_shape.append(row_out)
            out_specs.append(row_spec)
    out_shape.append(state)
    out_specs.append(state_spec)
    scratch = [pltpu.VMEM((T + 1, n, bd), f32), pltpu.VMEM((n, bd), f32),
               pltpu.VMEM((n, bd), f32), pltpu.VMEM((1, bd), f32), pltpu.VMEM((1, bd), f32)]
    kernel = functools.partial(_tpu_bwd_kernel, chunk=T, n_chunks=lay.n_chunks,
                               length=lay.length, softplus=cfg.softplus, opts=opts,
                               groups=_tpu_groups(lay))
    outs = list(_tpu_call(kernel, lay, cfg, specs, out_shape, out_specs, scratch,
                          "selective_scan_bwd_tpu")(*arrays))
    crop = lambda x, like: x[:, :lay.length, :lay.dn].astype(like.dtype)
    du, ddelta = crop(outs.pop(0), u), crop(outs.pop(0), delta)
    dz = crop(outs.pop(0), z) if z is not None else None
    if gpb == 1:    # blocks of a group in a row: their partial sums add up
        group_sum = lambda x: rearrange(x, "b (g k) l n -> b l g k n", g=lay.groups).sum(3)
    else:           # a block holds gpb whole groups
        group_sum = lambda x: rearrange(x, "b j l (g n) -> b l (j g) n", g=gpb)
    db, dc = (group_sum(outs.pop(0))[:, :lay.length] for _ in range(2))
    if B.ndim == 3:
        db, dc = db[:, :, 0], dc[:, :, 0]
    da, dd, dbias, dh0 = _param_grads(outs, lay.dn, A, D, delta_bias, h0, (0, 1))
    return (du, ddelta, da, db.astype(B.dtype), dc.astype(C.dtype), dd, dz, dbias, dh0)


_scan_tpu = _scan_with_vjp(_tpu_forward, _tpu_backward)


def selective_scan_tpu(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None, chunk=16, interpret=True):
    """The Mosaic TPU kernels (by default in TPU interpret mode); returns (y, final_state)."""
    cfg = _Config(softplus=delta_softplus, chunk=chunk, interpret=interpret)
    return _scan_tpu(u, delta, A, B, C, D, z, delta_bias, initial_state, cfg)


# ---------------------------------------------------------------------------------------------
# Decode step kernel: one time step for a [block_d, N] tile of the state, updated in place.

def _step_kernel(*refs, softplus, opts):
    # h/h_out/a [bd, N]; u/dt/z/y/d/bias [bd]; b/c [N]
    names = ["h", "u", "dt", "a", "b", "c", *[k for k in ("z", "d", "bias") if k in opts]]
    r = _name_refs(refs, names + ["y", "h_out"])
    f32 = jnp.float32
    u = r["u"][...].astype(f32)
    dt = r["dt"][...].astype(f32)
    if "bias" in r:
        dt = dt + r["bias"][...]
    if softplus:
        dt = _softplus(dt)
    decay = jnp.exp2(dt[:, None] * (r["a"][...] * _LOG2E))
    h = decay * r["h"][...] + (dt * u)[:, None] * r["b"][...].astype(f32)[None, :]
    r["h_out"][...] = h
    y = jnp.sum(h * r["c"][...].astype(f32)[None, :], axis=1)
    if "d" in r:
        y = y + r["d"][...] * u
    if "z" in r:
        z = r["z"][...].astype(f32)
        y = y * (z * jax.nn.sigmoid(z))
    r["y"][...] = y.astype(r["y"].dtype)


def _step_block_d(dn, groups, n, block_d=64):
    """Channels per program of the step kernel, or None where the kernel does not apply
    (Triton needs power-of-2 tiles; a block must not straddle two groups)."""
    if n & (n - 1):
        return None
    per_group, bd = dn // groups, 1
    while bd * 2 <= block_d and per_group % (bd * 2) == 0:
        bd *= 2
    return bd if bd >= 8 else None


def _state_update_pallas(state, u, delta, A, B, C, D, z, delta_bias, softplus, bd, interpret):
    bsz, dn = u.shape
    n = A.shape[1]
    if B.ndim == 2:
        B, C = B[:, None], C[:, None]
    per_group = dn // B.shape[1]
    row = pl.BlockSpec((None, bd), lambda b, j: (b, j))
    vec = pl.BlockSpec((bd,), lambda b, j: (j,))
    tile = pl.BlockSpec((None, bd, n), lambda b, j: (b, j, 0))
    bc = pl.BlockSpec((None, None, n), lambda b, j: (b, j * bd // per_group, 0))
    arrays = [state.astype(jnp.float32), u, delta, A.astype(jnp.float32), B, C]
    specs = [tile, row, row, pl.BlockSpec((bd, n), lambda b, j: (j, 0)), bc, bc]
    opts = []
    for name, x, spec in (("z", z, row), ("d", D, vec), ("bias", delta_bias, vec)):
        if x is not None:
            opts.append(name)
            arrays.append(x if name == "z" else x.astype(jnp.float32))
            specs.append(spec)
    kernel = functools.partial(_step_kernel, softplus=softplus, opts=tuple(opts))
    y, new_state = pl.pallas_call(
        kernel, grid=(bsz, dn // bd), in_specs=specs, out_specs=[row, tile],
        out_shape=[jax.ShapeDtypeStruct((bsz, dn), u.dtype),
                   jax.ShapeDtypeStruct((bsz, dn, n), jnp.float32)],
        input_output_aliases={0: 1}, interpret=interpret, name="selective_state_update",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))(*arrays)
    return y, new_state


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
    backend = _common.resolve_backend(backend)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  initial_state=initial_state)
    if backend == "reference":
        y, final = selective_scan_reference(u, delta, A, B, C, **kwargs)
    elif backend == "tpu_interpret" or (backend == "pallas" and _common.platform() == "tpu"):
        y, final = selective_scan_tpu(u, delta, A, B, C, **kwargs,
                                      interpret=backend == "tpu_interpret")
    else:
        y, final = selective_scan_pallas(u, delta, A, B, C, **kwargs,
                                         interpret=backend == "interpret")
    return (y, final) if return_state else y


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                           delta_softplus=False, backend=None):
    """One decoding step: state [B, Dn, N] f32, u/delta/z [B, Dn], B/C [B, N] or [B, G, N].

    Returns (y [B, Dn], new_state). `backend=None` takes the jnp step: the Pallas step kernel
    (power-of-2 N; other shapes fall back to the jnp step) is opt-in, since on an H200 it was
    not faster at any batch size consistently (B = 8..128, Dn 4096: both launch-bound, 8-20 us
    per step; docs/kernels/selective_scan.md).
    """
    backend = _common.resolve_backend("reference" if backend is None else backend)
    groups = 1 if B.ndim == 2 else B.shape[1]
    bd = _step_block_d(u.shape[-1], groups, A.shape[1])
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if (backend in ("reference", "tpu_interpret") or bd is None
            or (backend == "pallas" and _common.platform() == "tpu")):
        return selective_state_update_reference(state, u, delta, A, B, C, **kwargs)
    return _state_update_pallas(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, bd,
                                backend == "interpret")

"""Mamba-1 selective scan on Hopper through Pallas's Mosaic GPU lowering (forward, backward).

One warpgroup (128 threads) per program, one channel per thread with all N states of the
channel in that thread's registers (the Lane semantics' [128] arrays in the WG_STRIDED layout:
one element per thread), so that y_t = <C_t, h_t> is thread-local. Grid (batch, Dn / 128); time
runs through a hand-written TMA pipeline over chunks of `chunk` steps: each chunk's
u/delta(/z) rows [chunk, 128] and its B/C rows [chunk, 2N] arrive by TMA into shared memory,
`stages` chunks ahead, and each step reads B_t[n], C_t[n] as scalars from shared memory (one
address for the whole warp: a broadcast `ld.shared`), not from L2 as the Triton kernels must.
y rows go to a shared-memory tile stored by TMA. The training forward also stores the state
every `ck_every` steps ([B, Lp / ck_every, N, Dp] f32, the checkpoint layout of the Triton
backward in `selective_scan.py`, which can consume them). `split=2` (inference forward): two
threads per channel, N / 2 states each, 64 channels per program. `backward`: the reverse
scan with one channel per thread, dB/dC summed over the program's 128 channels through shared
memory. Notes and measurements: docs/kernels/selective_scan.md ("Session 6").

Limits (the caller falls back to the Triton kernels otherwise): Dn / G a multiple of 128 when
B/C are grouped, float inputs; any L (padded to the chunk; padded steps get delta 0); the
backward N <= 16 with checkpoints every 4 steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels.selective_scan import optional_inputs

_WG = 128                     # threads of a warpgroup = channels per program
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _zeros(shape=(_WG,)):
    """f32 zeros in the one-element-per-thread layout (a loop carry must keep its layout: a
    plain jnp.zeros is a splat)."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32),
                             plgpu.Layout.WG_STRIDED(shape, vec_size=1))


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


# 2^f on [-0.5, 0.5] (selective_scan._EXP2_POLY, degree 5: <= 2.4e-7 relative in f32)
_EXP2_POLY = (1.0, 0.6931469440460205, 0.24022120237350464, 0.05550713092088699,
              0.009675503708422184, 0.0013276360696181655)
_ROUND_MAGIC = 12582912.0     # 1.5 * 2^23: x + magic holds round(x) in its low mantissa bits


def _exp2_poly(x, interpret):
    """2^x for x <= 0 on the FMA and integer pipes instead of the MUFU (FlashAttention-4's
    trick; selective_scan._exp2_poly for Triton): round(x) from the magic add (LLVM does not
    reassociate (x + m) - m without fast-math flags), 2^f by Horner, round(x) into the
    exponent as bits(x + m) << 23. ~11 instructions; clamped at -125."""
    x = jnp.maximum(x, -125.0)
    if interpret:   # XLA may fold (x + m) - m
        r = jnp.round(x)
        shift = jax.lax.shift_left(r.astype(jnp.int32), 23)
    else:
        t = x + _ROUND_MAGIC
        r = t - _ROUND_MAGIC
        shift = jax.lax.shift_left(jax.lax.bitcast_convert_type(t, jnp.int32), 23)
    f = x - r
    p = f * _EXP2_POLY[-1] + _EXP2_POLY[-2]
    for c in _EXP2_POLY[-3::-1]:
        p = p * f + c
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(p, jnp.int32) + shift,
                                        jnp.float32)


def _skip_gate(y, u, d, zz):
    """The forwards' epilogue: y + D u (D given), times silu(z) (z given)."""
    if d is not None:
        y = y + d * u
    if zz is not None:
        y = y * (zz / (1.0 + jnp.exp2(zz * -_LOG2E)))
    return y


def _part_of_thread():
    """[split, bd] int32: the lane part (row) of each thread's element."""
    return jax.lax.broadcasted_iota(jnp.int32, (2, _WG // 2), 0)


def _bc_vals(bc_row_ref, t, col, count, split, n_k, vec, interpret):
    """B/C values of step t at columns col .. col + count - 1 (shifted by part * n_k for the
    thread's part when split = 2), each as a [split, bd] array (or a scalar). With `vec`
    (count 4, 16-byte aligned columns) on the GPU: one `ld.shared.v4` per thread through
    inline_mgpu (Pallas scalar reads become one `ld.shared.b32` each); split 2 needs
    inline_mgpu anyway (the column is warp-uniform, not warpgroup-uniform)."""
    if interpret:
        if split == 1:
            return [bc_row_ref[t, col + e] for e in range(count)]
        row = bc_row_ref[t, :]
        return [row[_part_of_thread() * n_k + col + e] for e in range(count)]
    if split == 1 and not vec:
        return [bc_row_ref[t, col + e] for e in range(count)]
    if not isinstance(t, int):     # a traced step: the row as a transformed ref
        bc_row_ref, t = bc_row_ref.at[pl.ds(t, 1)], 0

    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu

    def first(i32):
        col_v = mgpu.c(col, i32)
        if split == 1:
            return col_v
        # warps 0-1: part 0, warps 2-3: part 1 (no shuffle: CSE-able)
        warp = mgpu.utils.warp_idx(sync=False)
        part = arith.shrui(arith.andi(warp, mgpu.c(3, i32)), mgpu.c(1, i32))
        return arith.addi(arith.muli(part, mgpu.c(n_k, i32)), col_v)
    return _inline_row_load(bc_row_ref, t, count, (split, _WG // split), 4 if vec else 1, first)


def _tid_i32(i32, mod=None):
    """Inside inline_mgpu: this thread's index as an i32 (modulo `mod` when given)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu
    tid = mgpu.utils.thread_idx()
    if isinstance(tid.type, ir.IndexType):
        tid = arith.index_cast(i32, tid)
    return tid if mod is None else arith.remui(tid, mgpu.c(mod, i32))


def _inline_row_load(ref, t, count, shape, n_load, first, xor=None):
    """`count` [shape] f32 arrays (WG_STRIDED, one value per thread) through inline_mgpu: element
    first(i32) + e (e < count; `first` builds each thread's first column) of row t of the
    shared-memory ref, read by `n_load`-wide vector loads. `first` may return (row, column): each
    thread's own row (then t is not used). xor(i32) (a per-thread i32, a multiple of n_load):
    the load of elements e0 .. e0 + n_load - 1 reads columns first + (e0 ^ xor) onwards."""
    import numpy as np
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    layout = plgpu.Layout.WG_STRIDED(shape, vec_size=1)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                       return_type=tuple(plgpu.ShapeDtypeStruct(shape, jnp.float32,
                                                                layout=layout)
                                         for _ in range(count)))
    def load(ctx, ref):
        del ctx
        i32, index, f32 = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
        first_v = first(i32)
        row = None
        if isinstance(first_v, tuple):      # (row, column): a row of each thread's own
            row, first_v = arith.index_cast(index, first_v[0]), first_v[1]
        outs = []
        xor_v = xor(i32) if xor is not None else None
        for e0 in range(0, count, n_load):
            off = mgpu.c(e0, i32) if xor_v is None else arith.xori(xor_v, mgpu.c(e0, i32))
            idx = arith.index_cast(index, arith.addi(first_v, off))
            v = vector.load(ir.VectorType.get((n_load,), f32), ref,
                            [mgpu.c(t, index) if row is None else row, idx],
                            alignment=4 * n_load)
            for e in range(n_load):
                reg = vector.broadcast(ir.VectorType.get((1,), f32),
                                       vector.extract(v, [], [e]))
                outs.append(mgpu.FragmentedArray(_registers=np.array([reg], dtype=object),
                                                 _layout=layout.to_mgpu(), _is_signed=None))
        return tuple(outs)
    return list(load(ref))


def _row_sums(red, width, skew_div, interpret, n_acc=1):
    """[128] f32 (one value per thread): thread i's sum of row i of the dB/dC buffer `red`
    ([128, width + pad], or [128, W, lw] with the 4 x lw channels in [:, :4]) over its
    `width` channels, by 16-byte vector loads summed in registers (no second shared-memory
    pass). skew_div: thread i starts at block i // skew_div (mod the block count), so that
    eight threads whose rows share banks (row strides of 16 or 8 floats mod 32) read distinct
    banks. n_acc: that many independent partial sums (block m into sum m % n_acc), added at
    the end: shorter dependent FADD chains, more loads in flight."""
    if interpret:
        v = red[...]
        return jnp.sum(v[:, :width] if v.ndim == 2 else v[:, :4], axis=tuple(range(1, v.ndim)))
    import numpy as np
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    shape = (_WG,)
    layout = plgpu.Layout.WG_STRIDED(shape, vec_size=1)
    n_blk = width // 4
    lw = red.shape[-1]

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=layout))
    def sums(ctx, ref):
        del ctx
        i32, index, f32 = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
        tid = _tid_i32(i32, _WG)
        row = arith.index_cast(index, tid)
        rot = None
        if skew_div:
            rot = arith.andi(arith.shrui(tid, mgpu.c(int(math.log2(skew_div)), i32)),
                             mgpu.c(n_blk - 1, i32))
        vt = ir.VectorType.get((4,), f32)
        accs = [None] * max(1, min(n_acc, n_blk))
        for m in range(n_blk):
            if rot is None:
                fc = mgpu.c(4 * m, i32)
            else:
                fc = arith.shli(arith.andi(arith.addi(rot, mgpu.c(m, i32)),
                                           mgpu.c(n_blk - 1, i32)), mgpu.c(2, i32))
            if len(red.shape) == 3:
                idx = [row, arith.index_cast(index, arith.shrui(
                           fc, mgpu.c(int(math.log2(lw)), i32))),
                       arith.index_cast(index, arith.andi(fc, mgpu.c(lw - 1, i32)))]
            else:
                idx = [row, arith.index_cast(index, fc)]
            v = vector.load(vt, ref, idx, alignment=16)
            i = m % len(accs)
            accs[i] = v if accs[i] is None else arith.addf(accs[i], v)
        while len(accs) > 1:
            accs = [arith.addf(accs[i], accs[i + 1]) if i + 1 < len(accs) else accs[i]
                    for i in range(0, len(accs), 2)]
        acc = accs[0]
        e = [vector.extract(acc, [], [q]) for q in range(4)]
        tot = arith.addf(arith.addf(e[0], e[1]), arith.addf(e[2], e[3]))
        reg = vector.broadcast(ir.VectorType.get((1,), f32), tot)
        return mgpu.FragmentedArray(_registers=np.array([reg], dtype=object),
                                    _layout=layout.to_mgpu(), _is_signed=None)
    return sums(red)


def _load_params(r, opts, cols, split, n_k, state_src):
    """The one-time TMA copies of a program (forward and backward): A^T rows [K, split, bd]
    into a_s, D and bias (those in `opts`) into p_s, and `state_src` (this batch's h0 or dhT,
    [K, split, bd], or None) into h_s, one barrier each; waits for them. Returns (the K rows of
    A, {"d" / "bias": [split, bd]}, the K state rows or None)."""
    plgpu.copy_gmem_to_smem(r["a"].at[:, :, cols], r["a_s"], r["bar"].at[0])
    names = [k for k in ("d", "bias") if k in opts]
    bars = {(i, p): r["bar"].at[1 + i * split + p] for i in range(len(names))
            for p in range(split)}
    for (i, p), bar in bars.items():
        plgpu.copy_gmem_to_smem(r[names[i]].at[cols], r["p_s"].at[i, p], bar)
    state_bar = r["bar"].at[1 + 2 * split]
    if state_src is not None:
        plgpu.copy_gmem_to_smem(state_src, r["h_s"], state_bar)
    plgpu.barrier_wait(r["bar"].at[0])
    a_rows = [r["a_s"][k] for k in range(n_k)]
    for bar in bars.values():
        plgpu.barrier_wait(bar)
    vec = {k: r["p_s"][i] for i, k in enumerate(names)}
    if state_src is None:
        return a_rows, vec, None
    plgpu.barrier_wait(state_bar)
    return a_rows, vec, tuple(r["h_s"][k] for k in range(n_k))


def _channel_block(r, bd):
    """A one-channel-per-thread program's batch b, channel block j (bd channels), its columns
    and the B/C group of the block."""
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("j")
    groups = r["bc"].shape[1]
    return b, j, pl.ds(j * bd, bd), j * bd * groups // r["u"].shape[2]


def _fwd_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, save_ckpt,
              ck_every, stages, split, vec_bc, interpret, unroll=None, y_acc=1, poly=0,
              skew=False):
    """The kernel of one (batch, channel block) program; see the module docstring. A
    hand-written pipeline over chunks (emit_pipeline's predicated output copies do not run in
    GPU interpret mode): chunk c's inputs land in slot c % stages by TMA, issued `stages`
    chunks ahead; its outputs leave from the same slot of the output buffers by TMA.

    split = 2: 64 channels per program, thread i holds channel i % 64 and states
    (i // 64) * N / 2 + k: every per-thread array is [2, 64] (the strided layout's element i is
    thread i), the u/delta/z rows land twice (one copy per part) so that a [2, 64] view reads
    them, B/C values by a warp-uniform load at a per-part column, and y adds the two parts'
    sums through shared memory at the chunk end.

    unroll (split 1, a divisor of chunk and a multiple of ck_every): the chunk's steps run as a
    loop over groups of `unroll` unrolled steps (the code of a 16-step chunk is ~29 KB of SASS);
    y_acc: <C_t, h_t> summed in that many interleaved partial sums; poly: the last `poly`
    states of a thread take their decays from _exp2_poly (FMA pipe) instead of the MUFU;
    skew (with unroll): each group ends with the next group's first step up to its state
    (delta, decays, B/C), carried over the loop edge, so that a group starts on the state."""
    unroll = chunk if unroll is None or split > 1 else unroll
    has_z = "z" in opts
    seq_in = ["u", "dt", "bc", *(["z"] if has_z else [])]
    outs = ["y", *(["ck"] if save_ckpt else [])]
    names = ["u", "dt", "a", "bc", *opts, "y", "hT", *(["ck"] if save_ckpt else []),
             "a_s", "p_s", "h_s", "bar", *[k + "_s" for k in seq_in + outs],
             *(["yp_s"] if split > 1 else []), "in_bar"]
    r = dict(zip(names, refs, strict=True))
    f32 = jnp.float32
    bd = _WG // split
    n_k = n_state // split
    b, j, cols, g = _channel_block(r, bd)

    def fetch(c, slot):      # chunk c's input rows into `slot` (one barrier for all of them)
        rows = pl.ds(c * chunk, chunk)
        for k in seq_in:
            if k == "bc":
                plgpu.copy_gmem_to_smem(r["bc"].at[b, g, rows], r["bc_s"].at[slot],
                                        r["in_bar"].at[slot])
                continue
            for p in range(split):
                plgpu.copy_gmem_to_smem(r[k].at[b, rows, cols], r[k + "_s"].at[slot, p],
                                        r["in_bar"].at[slot])

    for s in range(min(stages, n_chunks)):
        fetch(s, s)
    # one-time parameters: A^T log2(e) [K, split, bd], D, bias [split, bd] and h0
    a2, vec, h0 = _load_params(r, opts, cols, split, n_k,
                               r["h0"].at[b, :, :, cols] if "h0" in opts else None)
    if h0 is None:
        h0 = tuple(_zeros((split, bd)) for _ in range(n_k))

    vec4 = vec_bc and n_k % 4 == 0 and n_state % 4 == 0

    def bc_step(bc_s, t):      # (B, C) of the thread's states at step t
        get = lambda which: _bc_vals(bc_s, t, which * n_state, n_k, split, n_k, vec4,
                                     interpret)
        return get(0), get(1)

    def decay_of(dt, k):
        return (_exp2_poly(dt * a2[k], interpret) if k >= n_k - poly
                else jnp.exp2(dt * a2[k]))

    def prep(s_, c, t, decays=True):
        """What step t needs before the state: (u, delta, delta u, B_t, C_t, and with
        `decays` the decays; else they are left to `step`, interleaved with the update)."""
        u = s_["u"][:, t, :].astype(f32)
        x = s_["dt"][:, t, :].astype(f32)
        if "bias" in vec:
            x = x + vec["bias"]
        dt = _softplus(x, True) if softplus else x
        if padded:
            dt = jnp.where(c * chunk + t < length, dt, 0.0)
        dtu = dt * u
        b_t, c_t = bc_step(s_["bc"], t)
        decay = [decay_of(dt, k) for k in range(n_k)] if decays else []
        return (u, dt, dtu, *b_t, *c_t, *decay)

    def step(s_, c, gi, tt, h, pre=None):
        """Step t = gi * unroll + tt of chunk c (gi traced or 0, tt static; `pre`: its prep
        if already done): updates the state list h in place; returns (this thread's
        <C_t, h_t>, u_t)."""
        t = tt if isinstance(gi, int) else gi * unroll + tt
        if save_ckpt and tt % ck_every == 0:
            row = tt // ck_every
            if not isinstance(gi, int):
                row = gi * (unroll // ck_every) + row
            for k in range(n_k):
                s_["ck"][row, k] = h[k]
        u, dt, dtu, *rest = pre if pre is not None else prep(s_, c, t, decays=False)
        b_t, c_t, decay = rest[:n_k], rest[n_k:2 * n_k], rest[2 * n_k:]
        y = _state_step(h, n_k, lambda k: decay[k] if decay else decay_of(dt, k), dtu, b_t,
                        c_t, y_acc)
        return y, u

    def chunk_body(c, carry):
        slot = jax.lax.rem(c, stages)
        s_ = {k: r[k + "_s"].at[slot] for k in seq_in + outs}
        plgpu.barrier_wait(r["in_bar"].at[slot])
        # the output slot's previous store (chunk c - stages) must have read it
        plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
        h = list(carry)
        ys = []
        if unroll < chunk:   # a loop over groups of `unroll` steps (smaller code), split 1
            n_groups = chunk // unroll

            def group(gi, carry):
                hh, pre = list(carry[:n_k]), carry[n_k:] or None
                for tt in range(unroll):
                    y, u = step(s_, c, gi, tt, hh, pre if tt == 0 else None)
                    finish(y, u, s_, gi * unroll + tt)
                if skew:    # the next group's first step up to its state (the last group:
                    # a repeat of the chunk's last step, unused), carried over the loop edge
                    nxt = jnp.minimum(gi * unroll + unroll, chunk - 1)
                    return (*hh, *prep(s_, c, nxt))
                return tuple(hh)
            init = (*h, *prep(s_, c, 0)) if skew else tuple(h)
            h = list(jax.lax.fori_loop(0, n_groups, group, init)[:n_k])
        for t in range(chunk if unroll >= chunk else 0):
            y, u = step(s_, c, 0, t, h)
            if split > 1:     # this part's sum; both parts' rows twice: [p0, p1, p0, p1]
                r["yp_s"][t, pl.ds(0, 2), :] = y
                r["yp_s"][t, pl.ds(2, 2), :] = y
                ys.append((y, u))
                continue
            finish(y, u, s_, t)
        if split > 1:
            plgpu.commit_smem()
            for t, (y, u) in enumerate(ys):   # rows 1, 2: the other part's sum
                finish(y + r["yp_s"][t, pl.ds(1, 2), :], u, s_, t)
        plgpu.commit_smem()   # every thread is done with the input slot and wrote its outputs
        plgpu.copy_smem_to_gmem(s_["y"].at[0], r["y"].at[b, pl.ds(c * chunk, chunk), cols],
                                commit_group=False)
        if save_ckpt:
            per = chunk // ck_every
            plgpu.copy_smem_to_gmem(s_["ck"], r["ck"].at[b, pl.ds(c * per, per), :, :, cols],
                                    commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(c + stages < n_chunks)
        def _():
            fetch(c + stages, slot)
        return tuple(h)

    def finish(y, u, s_, t):
        zz = s_["z"][:, t, :].astype(f32) if has_z else None
        s_["y"][:, t, :] = _skip_gate(y, u, vec.get("d"), zz).astype(s_["y"].dtype)

    h = jax.lax.fori_loop(0, n_chunks, chunk_body, h0)
    for k in range(n_k):
        r["h_s"][k] = h[k]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r["h_s"], r["hT"].at[b, :, :, cols])
    plgpu.wait_smem_to_gmem(0)


def _state_step(h, n_k, decay, dtu, b_t, c_t, y_acc):
    """One step of a thread's states: h[k] <- decay(k) h[k] + dtu B_k (in place, k < n_k);
    returns y = sum_k h[k] C_k, summed in y_acc interleaved partial sums (shorter FFMA chains)
    that are added pairwise at the end."""
    acc = [None] * y_acc
    for k in range(n_k):
        h[k] = decay(k) * h[k] + dtu * b_t[k]
        hc = h[k] * c_t[k]
        i = k % y_acc
        acc[i] = hc if acc[i] is None else acc[i] + hc
    acc = [a for a in acc if a is not None]
    while len(acc) > 1:
        acc = [acc[i] + acc[i + 1] if i + 1 < len(acc) else acc[i]
               for i in range(0, len(acc), 2)]
    return acc[0]


def forward(u, delta, A, B, C, D, z, delta_bias, h0, *, softplus, save_ckpt, chunk=16,
            ck_every=4, stages=2, split=1, parted_ck=False, vec_bc=True, unroll=None,
            y_acc=1, poly=0, skew=False, interpret=False):
    """Runs the Mosaic GPU forward; returns (y [B, L, Dn], final [B, Dn, N] f32, ckpts or
    None): ckpts [B, Lp / ck_every, N, Dp] f32, the state before every ck_every-th step.
    split = 2 (N even): two threads per channel, 64 channels per program; its checkpoints
    keep the [B, Lp / ck_every, N / 2, 2, Dp] layout (state p * N / 2 + k at [k, p]) when
    `parted_ck` (for `backward`), else they are reordered to [.., N, Dp]."""
    f32 = jnp.float32
    bsz, length, dn = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[2]
    if not supported(dn, groups):
        raise ValueError(f"selective_scan_mgpu: Dn={dn} with G={groups} groups is not a "
                         f"multiple of {_WG} channels per group")
    if split not in (1, 2) or n % split:
        raise ValueError(f"selective_scan_mgpu: split={split} needs an even N")
    bd, n_k = _WG // split, n // split
    dp = _common.round_up(dn, _WG)
    lp = _common.round_up(length, chunk)
    seq = lambda x: _common.pad_axis(_common.pad_axis(x, 1, chunk), 2, _WG)
    vec = lambda x: _common.pad_axis(x.astype(f32), 0, _WG)
    # B and C as one [B, G, Lp, 2N'] f32 array (2N' = 2N rounded up to 4: a TMA row is
    # at least 16 bytes)
    bc = jnp.concatenate([B.astype(f32), C.astype(f32)], -1)
    bc = _common.pad_axis(_common.pad_axis(bc, 1, chunk), 3, 4)
    bc = jnp.swapaxes(bc, 1, 2)
    # per-state arrays as [K, split, Dp]: row k of part p is state p * K + k
    by_part = lambda x: jnp.swapaxes(x.reshape(*x.shape[:-2], split, n_k, x.shape[-1]), -3, -2)
    a2 = by_part(_common.pad_axis(A.astype(f32).T * _LOG2E, 1, _WG))
    arrays = [seq(u), seq(delta), a2, bc]
    state = lambda x: by_part(_common.pad_axis(jnp.swapaxes(x.astype(f32), 1, 2), 2, _WG))
    given = optional_inputs(z, D, delta_bias, h0, seq=seq, vec=vec, state=state)
    opts = [name for name, _ in given]
    arrays += [x for _, x in given]
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), u.dtype),
                 jax.ShapeDtypeStruct((bsz, n_k, split, dp), f32)]
    if save_ckpt:
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp // ck_every, n_k, split, dp), f32))
    n_chunks = lp // chunk
    stages = min(stages, n_chunks)
    rows = lambda dtype: plgpu.SMEM((stages, split, chunk, bd), dtype)
    seq_bufs = [rows(u.dtype), rows(delta.dtype),
                plgpu.SMEM((stages, chunk, bc.shape[-1]), f32)]
    if z is not None:
        seq_bufs.append(rows(z.dtype))
    seq_bufs.append(rows(u.dtype))
    if save_ckpt:
        seq_bufs.append(plgpu.SMEM((stages, chunk // ck_every, n_k, split, bd), f32))
    if split > 1:
        seq_bufs.append(plgpu.SMEM((chunk, 2 * split, bd), f32))
    n_in = 2 * split + 1 + (split if z is not None else 0)
    scratch = [plgpu.SMEM((n_k, split, bd), f32), plgpu.SMEM((2, split, bd), f32),
               plgpu.SMEM((n_k, split, bd), f32),
               plgpu.Barrier(num_barriers=2 + 2 * split), *seq_bufs,
               plgpu.Barrier(num_arrivals=n_in, num_barriers=stages)]
    body = functools.partial(
        _fwd_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks,
        length=length, padded=lp != length, softplus=softplus, save_ckpt=save_ckpt,
        ck_every=ck_every, stages=stages, split=split, vec_bc=vec_bc, interpret=interpret,
        unroll=(unroll if unroll and chunk % unroll == 0
                and (not save_ckpt or unroll % ck_every == 0) else None),
        y_acc=y_acc, poly=poly, skew=skew)
    outs = plgpu.kernel(
        body, out_type=out_shape, grid=(bsz, dp // bd), grid_names=("b", "j"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            unsafe_no_auto_barriers=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="selective_scan_fwd_mgpu" + ("_ck" if save_ckpt else ""))(*arrays)
    y = outs[0][:, :length, :dn]
    unpart = lambda x: jnp.swapaxes(x, -3, -2).reshape(*x.shape[:-3], n, x.shape[-1])
    final = jnp.swapaxes(unpart(outs[1])[:, :, :dn], 1, 2)
    ck = None
    if save_ckpt:
        ck = outs[2] if parted_ck else unpart(outs[2])
    return y, final, ck


# ---------------------------------------------------------------------------------------------
# Inference forward with two lanes per channel in one warp ("pair"): thread i = 32 w + 16 p + l
# holds channel 16 w + l of the program's 64 and the states p K + k (K = N / 2), so that a
# program is 64 channels and Dn 2048 at B 8 gives 256 programs of 4 warps: two warps per
# scheduler. Every per-thread array is [4, 2, 16] (w, p, l). The two lanes of a channel meet
# by shfl.xor 16 (no shared memory, no barrier): per pair of steps (t, t + 1) lane part p
# loads and computes delta (bias, softplus) and u of step t + p only and takes the other
# step's from its partner (so softplus costs one MUFU pair per lane and two steps), and it
# stores y of step t + p: its own part's sum for t + p plus the partner's, sent by one shfl.
# The u / delta / z / y rows are [chunk, 4, 16] tiles (Dn viewed as [Dp / 16, 16]); the step
# pair (t, t + 1) is the view rows[t:t + 2] transposed to (w, p, l).
#
# parts = 4 (inference only, `mgpu_pair_parts`): four lanes per channel (8 w + l of the
# program's 32, lanes l + 8 p, N / 4 states each), steps in groups of four: lane part p loads
# and computes delta, delta u of step t + p, every lane takes step t + q's from part q by
# shfl.idx (a constant source part: the segment mask keeps the lane's low bits), and the four
# parts' y sums of the group meet by a butterfly reduce-scatter (xor 16, then xor 8: three
# shuffles) that leaves step t + p's full sum in part p. Twice the programs of the pair
# forward: four warps per scheduler at 8x2048x2048.

_PAIR_SHAPE = (4, 2, 16)


def _lane_shape(parts):
    return (4, parts, 32 // parts)


def _pair_part(interpret=True, shape=_PAIR_SHAPE):
    """[4, parts, 32 / parts] int32: the part (lane // (32 / parts)) of each thread."""
    part = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    if interpret:
        return part
    return plgpu.layout_cast(part, plgpu.Layout.WG_STRIDED(shape, vec_size=1))


def _shfl(x, interpret, distance=16, src_part=None):
    """shfl.bfly by `distance` lanes (the part p ^ distance / (32 / parts) of the channel), or
    with src_part: shfl.idx from that part's lane of the channel."""
    shape = x.shape
    lw = shape[2]
    if interpret:
        if src_part is not None:
            return jnp.broadcast_to(x[:, src_part:src_part + 1], shape)
        src = [p ^ (distance // lw) for p in range(shape[1])]
        return jnp.concatenate([x[:, q:q + 1] for q in src], axis=1)
    import numpy as np
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import nvvm
    from jax.experimental.mosaic import gpu as mgpu
    layout = plgpu.Layout.WG_STRIDED(shape, vec_size=1)

    def one(reg):
        if src_part is None:
            return mgpu.utils.shfl_bfly(reg, distance)
        i32 = ir.IntegerType.get_signless(32)
        # lane (lane & (lw - 1)) | (src_part * lw): the segment mask lw - 1 keeps the low bits
        y = nvvm.shfl_sync(mgpu.c(0xFFFFFFFF, i32), mgpu.utils.bitcast(reg, i32),
                           mgpu.c(src_part * lw, i32), mgpu.c(((lw - 1) << 8) | 0x1F, i32),
                           nvvm.ShflKind.idx)
        return mgpu.utils.bitcast(y, reg.type)

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=layout))
    def shfl(ctx, v):
        del ctx
        regs = np.empty_like(v.registers)
        for idx, reg in np.ndenumerate(v.registers):
            regs[idx] = one(reg)
        return mgpu.FragmentedArray(_registers=regs, _layout=v.layout, _is_signed=None)
    return shfl(x)


def _part_sums(vs, part, interpret):
    """vs[q]: this lane part's partial sum of step t + q (q < parts) -> the full sum over the
    channel's parts of step t + p (p: this lane's part). Two parts: one xor-16 shuffle; four:
    a butterfly reduce-scatter (xor 16 keeps this half's steps, xor 8 the own step)."""
    lw = vs[0].shape[2]
    if len(vs) == 2:
        part0 = part == 0
        return jnp.where(part0, vs[0], vs[1]) + _shfl(jnp.where(part0, vs[1], vs[0]),
                                                      interpret)
    hi, lo = part >= 2, (part % 2) == 1
    keep = [jnp.where(hi, vs[2 + i], vs[i]) for i in range(2)]
    send = [jnp.where(hi, vs[i], vs[2 + i]) for i in range(2)]
    half = [keep[i] + _shfl(send[i], interpret, distance=2 * lw) for i in range(2)]
    return (jnp.where(lo, half[1], half[0])
            + _shfl(jnp.where(lo, half[0], half[1]), interpret, distance=lw))


def _part_total(v, interpret):
    """The sum of v over the lane parts of the channel (every part gets it)."""
    lw = v.shape[2]
    d = 16
    while d >= lw:
        v = v + _shfl(v, interpret, distance=d)
        d //= 2
    return v


def _ck_view(row, k, parts, n_k, interpret):
    """[4, parts, lw] view of a checkpoint row [N, 4, lw]: state p K + k of channel lw w + l
    (GPU interpret mode has no ref reshape, Mosaic no strided slice)."""
    rows_k = (row.at[pl.ds(k, parts, stride=n_k)] if interpret
              else row.reshape(parts, n_k, *row.shape[1:]).at[:, k])
    return rows_k.transpose((1, 0, 2))


# The "ck2" checkpoint layout (mgpu_ck_pair): [B, Lp / ck_every, K, Dp, 2] f32, state p K + k
# of channel c at [.., k, c, p] (K = N / 2). The pair kernels' thread 32 w + 16 p + l (channel
# 16 w + l) then stores / reads float 32 w + 2 l + p of a [64, 2] row per k: a warp covers 32
# consecutive floats (conflict-free, where the [N, Dp] layout's rows k and K + k, 512 floats
# apart, conflict 2-way); the one-thread backward reads states k and K + k of its channel by
# one 8-byte load. Inside the kernels on the GPU the channel pairs are flat (a TMA box's
# strides must be multiples of 16 bytes): gmem [.., K, 2 Dp], shared-memory rows [2 x
# channels]; in GPU interpret mode (no ref reshape) the pair kernels see [.., Dp / 16, 16, 2]
# and the one-thread backward [.., Dp, 2] (_ck2_shape).


def _ck2_pair_view(row, interpret):
    """[4, 2, 16] (w, p, l) view of a ck2 row of 64 channels ([128]; interpret [4, 16, 2])."""
    if not interpret:
        row = row.reshape(4, 16, 2)
    return row.transpose((0, 2, 1))


def _ck2_load(row, interpret):
    """States k and K + k of each thread's channel, each [1, 128], from a ck2 row of 128
    channels ([256]; interpret [128, 2]): one ld.shared.v2 per thread (inline_mgpu)."""
    if interpret:
        v = row[...]
        return v[:, 0][None], v[:, 1][None]
    import numpy as np
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    shape = (1, _WG)
    layout = plgpu.Layout.WG_STRIDED(shape, vec_size=1)
    out = plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=layout)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(out, out))
    def load(ctx, ref):
        del ctx
        i32, index, f32 = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
        tid = _tid_i32(i32, _WG)
        idx = arith.index_cast(index, arith.shli(tid, mgpu.c(1, i32)))
        v = vector.load(ir.VectorType.get((2,), f32), ref, [idx], alignment=8)
        return tuple(
            mgpu.FragmentedArray(
                _registers=np.array([vector.broadcast(ir.VectorType.get((1,), f32),
                                                      vector.extract(v, [], [e]))],
                                    dtype=object),
                _layout=layout.to_mgpu(), _is_signed=None)
            for e in range(2))
    return load(row)


def _thread_store_global(ref, v, position):
    """Stores a pair kernel's value v (one element per thread, WG_STRIDED; or a list of n such
    values, stored as one n-wide vector at consecutive elements) straight from registers into
    the ref (gmem or smem) at the index position(tid, c, arith) gives (i32 values; c makes an
    i32 constant): one st.global / st.shared per thread."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic import gpu as mgpu
    vs = list(v) if isinstance(v, (list, tuple)) else [v]
    layout = plgpu.Layout.WG_STRIDED(vs[0].shape, vec_size=1)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), *([layout] * len(vs))))
    def store(ctx, ref, *xs):
        del ctx
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        tid = _tid_i32(i32)
        idx = [arith.index_cast(index, e) for e in position(tid, lambda x: mgpu.c(x, i32), arith)]
        regs = [x.registers.flat[0] for x in xs]
        if len(regs) == 1:
            vector.store(regs[0], ref, idx)
            return
        f32 = ir.F32Type.get()
        vec = vector.broadcast(ir.VectorType.get((len(regs),), f32), arith.constant(f32, 0.0))
        for e, reg in enumerate(regs):
            vec = vector.insert(vector.extract(reg, [], [0]), vec, [], [e])
        vector.store(vec, ref, idx, alignment=4 * len(regs))
    store(ref, *vs)


def _ck2_col(tid, c, arith):
    """Thread 32 w + 16 p + l's float 32 w + 2 l + p of a ck2 row of 128 (i32 arithmetic)."""
    return arith.addi(arith.addi(arith.andi(tid, c(_WG - 32)),
                                 arith.shli(arith.andi(tid, c(15)), c(1))),
                      arith.andi(arith.shrui(tid, c(4)), c(1)))


def _ck2_store_global(ck_ref, b, row, k, j, v, interpret):
    """Stores a pair kernel's [4, 2, 16] state v (state p K + k of channel 16 w + l of block j)
    straight from registers into the ck2 gmem array (row `row`, state pair k): on the GPU one
    st.global.f32 per thread, a warp's 32 values 128 contiguous bytes (no shared memory, no TMA,
    no wait for the slot)."""
    if interpret:
        _ck2_pair_view(ck_ref.at[b, row, k, pl.ds(j * 4, 4)], True)[...] = v
        return

    _thread_store_global(ck_ref.at[b, row, k, pl.ds(j * _WG, _WG)], v,
                         lambda tid, c, arith: (_ck2_col(tid, c, arith),))


def _pair_rows_store_global(ref, b, row0, j, v, interpret):
    """Stores a pair kernel's [4, 2, 16] step-pair value v (step row0 + p of channel 16 w + l
    of block j) straight from registers into the [B, Lp, Dp / 16, 16] gmem array `ref`: one
    16-bit st.global per thread, a half-warp's 16 values 32 contiguous bytes (no shared-memory
    tile: its two rows 128 bytes apart conflicted 2-way; no TMA store)."""
    dst = ref.at[b, pl.ds(row0, 2), pl.ds(j * 4, 4)]
    v = v.astype(ref.dtype)
    if interpret:
        dst.transpose((1, 0, 2))[...] = v
        return

    def position(tid, c, arith):
        return (arith.andi(arith.shrui(tid, c(4)), c(1)),     # p: the step of the pair
                arith.andi(arith.shrui(tid, c(5)), c(3)),     # w: the tile of 16 channels
                arith.andi(tid, c(15)))                       # l
    _thread_store_global(dst, v, position)


def _ck2_shape(shape, interpret, pair=True):
    """The kernels' view of a ck2 array of `shape` [B, n, K, Dp, 2]: [B, n, K, 2 Dp]; in
    interpret mode the pair kernels' [B, n, K, Dp / 16, 16, 2], the one-thread backward's
    [B, n, K, Dp, 2]."""
    if not interpret:
        return (*shape[:3], 2 * shape[3])
    return (*shape[:3], shape[3] // 16, 16, 2) if pair else shape


def _ck2_cols(j, width, interpret, pair=True):
    """The kernel view's columns of channel block j (`width` channels)."""
    if not interpret:
        return pl.ds(j * 2 * width, 2 * width)
    return pl.ds(j * width // 16, width // 16) if pair else pl.ds(j * width, width)


def _shfl16(x, interpret):
    """x of the lane 16 apart: the other part of the thread's channel (two parts)."""
    return _shfl(x, interpret)


def _pair_bc(bc_ref, t, col, count, n_k, interpret, shape=_PAIR_SHAPE, perm=0):
    """B/C values of step t at columns part * n_k + col + e (e < count), each [4, parts, lw].
    perm (the pair backward's permuted state slots, _perm_xor): value e is column part * n_k
    + col + (e ^ m) of the thread's m, read by 8-byte loads: perm 2 (m even) from the row,
    perm 3 (rows [B | B' | C | C'], col 0 or 2 N) with m odd from the pair-swapped copy
    2 n_k columns on (column c + 2 n_k holds column c ^ 1), at column 2 n_k + part * n_k + col
    + (e ^ (m & 6)): the two copies in different banks."""
    if interpret:
        row = bc_ref[t, :]
        base = _pair_part(True, shape) * n_k + col
        if not perm:
            return [row[base + e] for e in range(count)]
        m = _perm_xor(True, shape, perm)
        return [row[2 * n_k * (m & 1) + base + (e ^ (m & 6))] for e in range(count)]
    if not isinstance(t, int):     # a traced step: the row as a transformed ref
        bc_ref, t = bc_ref.at[pl.ds(t, 1)], 0
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu
    n_load = 4 if count % 4 == 0 and col % 4 == 0 and n_k % 4 == 0 else 1
    if perm:
        n_load = 2

    def first(i32):
        tid = _tid_i32(i32)
        lane = arith.remui(tid, mgpu.c(32, i32))
        part = arith.shrui(lane, mgpu.c(int(math.log2(shape[2])), i32))
        col_v = arith.addi(arith.muli(part, mgpu.c(n_k, i32)), mgpu.c(col, i32))
        if perm == 3:   # m odd (lane bit 1): the pair-swapped copy, 2 n_k columns on
            col_v = arith.addi(col_v, arith.muli(arith.andi(tid, mgpu.c(2, i32)),
                                                 mgpu.c(n_k, i32)))
        return col_v
    return _inline_row_load(bc_ref, t, count, shape, n_load, first,
                            xor=(lambda i32: _perm_xor_i32(i32, 2)) if perm else None)


def _pair_prologue(r, opts, seq_in, shape, n_k, chunk, stages, n_chunks, interpret, rawp=False,
                   bcin=False):
    """The pair forwards' start: the first `stages` chunks' TMA loads issued (`fetch(c, slot)`
    issues chunk c's), then A^T log2(e) as n_k arrays of `shape`, D and bias (`vec`) and h0 (or
    zeros) read. rawp: A [Dp, N], D and bias [Dp] come unpermuted (this program's rows), each
    thread (w, p, l) picks row lw w + l, states p K + k, and A is scaled by log2(e) here.
    bcin: B and C come as they are ("b", "c": [B, Lp, G, N] in their dtype), each chunk's
    [chunk, N] rows of the program's group into "b_s" / "c_s" (no "bc").
    Returns (b, j, tiles, fetch, a2, vec, h0)."""
    lw = shape[2]
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("j")
    groups = r["b"].shape[2] if bcin else r["bc"].shape[1]
    g = j * 4 * lw * groups // (r["u"].shape[2] * lw)   # the group of this channel block
    tiles = pl.ds(j * 4, 4)

    def fetch(c, slot):
        rows = pl.ds(c * chunk, chunk)
        if bcin:
            for k in ("b", "c"):
                plgpu.copy_gmem_to_smem(r[k].at[b, rows, g], r[k + "_s"].at[slot],
                                        r["in_bar"].at[slot])
        else:
            plgpu.copy_gmem_to_smem(r["bc"].at[b, g, rows], r["bc_s"].at[slot],
                                    r["in_bar"].at[slot])
        for k in seq_in:
            if k not in ("bc", "b", "c"):
                plgpu.copy_gmem_to_smem(r[k].at[b, rows, tiles], r[k + "_s"].at[slot],
                                        r["in_bar"].at[slot])

    for s in range(min(stages, n_chunks)):
        fetch(s, s)
    own = pl.ds(j * (4 * lw), 4 * lw) if rawp else None
    plgpu.copy_gmem_to_smem(r["a"].at[own] if rawp else r["a"].at[:, j], r["a_s"],
                            r["bar"].at[0])
    vec_names = [k for k in ("d", "bias") if k in opts]
    for i, k in enumerate(vec_names):
        plgpu.copy_gmem_to_smem(r[k].at[own] if rawp else r[k].at[j], r["p_s"].at[i],
                                r["bar"].at[1 + i])
    if "h0" in opts:
        plgpu.copy_gmem_to_smem(r["h0"].at[b, :, j], r["h_s"], r["bar"].at[3])
    plgpu.barrier_wait(r["bar"].at[0])
    if rawp:
        a2 = [a * _LOG2E for a in _thread_rows(r["a_s"], n_k, shape, n_k, interpret)]
    else:
        a2 = [r["a_s"][k] for k in range(n_k)]
    vec = {}
    for i, k in enumerate(vec_names):
        plgpu.barrier_wait(r["bar"].at[1 + i])
        vec[k] = (_thread_rows(r["p_s"].at[pl.ds(i, 1)], 1, shape, 0, interpret, flat=True)[0]
                  if rawp else r["p_s"][i])
    if "h0" in opts:
        plgpu.barrier_wait(r["bar"].at[3])
        h0 = tuple(r["h_s"][k] for k in range(n_k))
    else:
        h0 = tuple(_zeros(shape) for _ in range(n_k))
    return b, j, tiles, fetch, a2, vec, h0


def _store_final_state(r, h, b, j):
    """A pair forward's epilogue: the final state h ([K] arrays) through h_s into hT[b, :, j]."""
    for k in range(len(h)):
        r["h_s"][k] = h[k]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r["h_s"], r["hT"].at[b, :, j])
    plgpu.wait_smem_to_gmem(0)


def _own_delta(x, vec, softplus, sp1, valid):
    """A pair forward's delta of its lane's own step from the raw row x: + bias, softplus (with
    one MUFU op when sp1), zero where valid() is false (valid False: no padded steps)."""
    if "bias" in vec:
        x = x + vec["bias"]
    if softplus:
        x = _softplus_1mufu(x) if sp1 else _softplus(x, True)
    return jnp.where(valid(), x, 0.0) if valid else x


def _fwd_pair_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, stages,
                   interpret, save_ckpt=False, ck_every=4, parts=2, y_acc=1, ydefer=0,
                   sp1=False, rawp=False):
    """save_ckpt (parts 2): the state before every ck_every-th step into the one-thread
    kernels' checkpoint layout [B, Lp / ck_every, N, Dp] (a [N, 64] slot row per checkpoint,
    written through its (w, p, l) view per state k: rows k and K + k); save_ckpt a dict: the
    checkpoint options of _ck_options. Opt-in (forward_pair's train_opts; as the inference
    body's options of the same names): ydefer, the y rows of this many step groups held in
    registers and stored together (ptxas keeps the next groups' B/C loads behind each y store
    otherwise); sp1, softplus with one MUFU op (_softplus_1mufu); rawp (parts 2, N % 4 == 0),
    A, D and bias as they are, laid out by the kernel (_pair_prologue)."""
    ck_pair, ck_direct, ck_late = _ck_options(save_ckpt, parts)
    has_z = "z" in opts
    seq_in = ["u", "dt", "bc", *(["z"] if has_z else [])]
    names = ["u", "dt", "a", "bc", *opts, "y", "hT", *(["ck"] if save_ckpt else []),
             "a_s", "p_s", "h_s", "bar", *[k + "_s" for k in seq_in], "y_s",
             *(["ck_s"] if save_ckpt and not ck_direct else []), "in_bar"]
    r = dict(zip(names, refs, strict=True))
    f32 = jnp.float32
    shape = _lane_shape(parts)
    lw = shape[2]
    n_k = n_state // parts
    b, j, tiles, fetch, a2, vec, h0 = _pair_prologue(r, opts, seq_in, shape, n_k, chunk, stages,
                                                     n_chunks, interpret, rawp=rawp)
    part = _pair_part(interpret, shape)
    part0, part1 = part == 0, part == 1

    def pair_rows(ref, t):    # rows t .. t + parts - 1 of a [chunk, 4, lw] tile as (w, p, l)
        return ref.at[pl.ds(t, parts)].transpose((1, 0, 2))[...].astype(f32)

    def group_y(dt_own, u_own, s_, t, h):
        """Steps t .. t + parts - 1 (parts 4): the state update; returns y of step t + p."""
        dtu_own = dt_own * u_own
        ys = []
        for tt in range(parts):
            dt = _shfl(dt_own, interpret, src_part=tt)
            dtu = _shfl(dtu_own, interpret, src_part=tt)
            b_t = _pair_bc(s_["bc"], t + tt, 0, n_k, n_k, interpret, shape)
            c_t = _pair_bc(s_["bc"], t + tt, n_state, n_k, n_k, interpret, shape)
            y = None
            for k in range(n_k):
                h[k] = jnp.exp2(dt * a2[k]) * h[k] + dtu * b_t[k]
                hc = h[k] * c_t[k]
                y = hc if y is None else y + hc
            ys.append(y)
        return _part_sums(ys, part, interpret)

    def chunk_body(c, carry):
        slot = jax.lax.rem(c, stages)
        s_ = {k: r[k + "_s"].at[slot] for k in seq_in}
        y_s = r["y_s"].at[slot]
        plgpu.barrier_wait(r["in_bar"].at[slot])
        plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
        h = list(carry)

        def store_ck(t, hk):
            if ck_direct:
                for k in range(n_k):
                    _ck2_store_global(r["ck"], b, c * (chunk // ck_every) + t // ck_every, k,
                                      j, hk[k], interpret)
                return
            row = r["ck_s"].at[slot, t // ck_every]   # [N, 4, lw] (ck2: [K, 128])
            for k in range(n_k):      # state p K + k of channel lw w + l
                if ck_pair:
                    _ck2_pair_view(row.at[k], interpret)[...] = hk[k]
                else:
                    _ck_view(row, k, parts, n_k, interpret)[...] = hk[k]

        held = []     # (step, y) rows not yet stored (ydefer)
        for t in range(0, chunk, parts):
            late = None
            if save_ckpt and t % ck_every == 0:
                if ck_late:     # stored after this step group: h[k] is not held by the store
                    late = list(h)
                else:
                    store_ck(t, h)
            u_own = pair_rows(s_["u"], t)          # u of step t + p
            dt_own = _own_delta(pair_rows(s_["dt"], t), vec, softplus, sp1,
                                padded and (lambda t=t: c * chunk + t + part < length))
            if parts == 2:
                dt_oth, u_oth = _shfl16(dt_own, interpret), _shfl16(u_own, interpret)
                ys = []
                for tt in range(2):        # steps t (part 0's own) and t + 1 (part 1's own)
                    mine = part0 if tt == 0 else part1
                    dt = jnp.where(mine, dt_own, dt_oth)
                    dtu = dt * jnp.where(mine, u_own, u_oth)
                    b_t = _pair_bc(s_["bc"], t + tt, 0, n_k, n_k, interpret)
                    c_t = _pair_bc(s_["bc"], t + tt, n_state, n_k, n_k, interpret)
                    ys.append(_state_step(h, n_k, lambda k, dt=dt: jnp.exp2(dt * a2[k]), dtu,
                                          b_t, c_t, y_acc))
                # part p keeps its sum of step t + p and sends the partner's step to it
                y = jnp.where(part0, ys[0], ys[1]) + _shfl16(jnp.where(part0, ys[1], ys[0]),
                                                             interpret)
            else:
                y = group_y(dt_own, u_own, s_, t, h)
            y = _skip_gate(y, u_own, vec.get("d"), pair_rows(s_["z"], t) if has_z else None)
            if ydefer:
                held.append((t, y.astype(y_s.dtype)))
                if len(held) >= ydefer or t + parts == chunk:   # flush the held y rows
                    for tq, yq in held:
                        y_s.at[pl.ds(tq, parts)].transpose((1, 0, 2))[...] = yq
                    held.clear()
            else:
                y_s.at[pl.ds(t, parts)].transpose((1, 0, 2))[...] = y.astype(y_s.dtype)
            if late is not None:
                store_ck(t, late)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, r["y"].at[b, pl.ds(c * chunk, chunk), tiles],
                                commit_group=False)
        if save_ckpt and not ck_direct:
            per = chunk // ck_every
            ck_cols = _ck2_cols(j, 4 * lw, interpret) if ck_pair else tiles
            plgpu.copy_smem_to_gmem(r["ck_s"].at[slot],
                                    r["ck"].at[b, pl.ds(c * per, per), :, ck_cols],
                                    commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(c + stages < n_chunks)
        def _():
            fetch(c + stages, slot)
        return tuple(h)

    h = jax.lax.fori_loop(0, n_chunks, chunk_body, h0)
    _store_final_state(r, h, b, j)


# Session 9 (the inference forward, two lanes per channel, no checkpoints): the pair forward's
# step pairs with opt-in schedules (forward_pair(..., inf_opts={...})):
#   ahead: the next step pair's inputs, softplus, shuffles and (ahead=1) its 16 decays are
#     computed before this pair's state updates (software pipelining inside the chunk: the
#     MUFU results have a whole step pair of updates to arrive; ~16 registers more);
#   poly: this many of a lane's 2 x K decays per step pair by the FMA-pipe polynomial
#     (_exp2_poly) instead of MUFU.EX2 (FlashAttention-4's trick; state K - 1 - j // 2 of
#     step j % 2, j < poly);
#   idx: the two steps' delta and delta u by shfl.idx from the part that loaded them (4
#     shuffles, no selects) instead of shfl.bfly + selects (2 shuffles, 4 selects).
#   ybuf (>= 3): y goes through this many shared-memory slots, and the wait for the TMA store
#     that last read chunk c + 1's slot moves to the end of chunk c, before commit_smem's
#     barrier (no barrier of its own: one warpgroup barrier per chunk instead of two);
#   cross (with ahead): the next chunk's first `ahead` step pairs are prepared (its input
#     barrier waited) before this chunk's last updates and carried over the chunk loop, so
#     that a chunk starts on state updates instead of a load -> softplus -> shuffle chain;
#   sp1: softplus with one MUFU op (_softplus_1mufu: ex2 and a log1p polynomial) instead of
#     two (ex2, lg2): 18 -> 17 MUFU ops per lane and step pair.
#   ydefer: the y rows of this many step pairs are held in registers and stored together
#     (a whole chunk: chunk / 2). ptxas does not move shared-memory loads above a store it
#     cannot prove disjoint: the B/C loads (addresses from inline_mgpu) wait for the previous
#     pair's y store, so each pair starts on their latency (session 9 call 1's SASS); with the
#     stores deferred the next pairs' loads can be hoisted (one register per held pair);
#   rawp (N % 4 == 0): A [Dn, N], D and bias [Dn] copied as they are and laid out per thread
#     in the kernel (A times log2 e too): no XLA transpose / broadcast kernels before the
#     kernel (a fixed cost per call: ~15 us of fixed time at 8x2048x2048 in calls 2-2b).
#   bcin (N % 8 == 0, B / C of 2 or 4 bytes, chunk N % 128 == 0, 2+ stages; else the prepared
#     path): B and C read by TMA as they are ([B, L, G, N] in their dtype: no XLA convert /
#     concatenate / transpose kernel before the kernel), [chunk, N] rows each; at the end of
#     chunk c every thread waits for chunk c + 1's inputs and converts its share of their B / C
#     rows to f32 rows in one of two "bcf" slots before commit_smem's barrier (no barrier of
#     its own; chunk 0's in the prologue), so the steps read f32 rows as before.


# log1p(e) / e on [0, 1] (degree 7, fitted here to the relative error: <= 3.8e-7 in f32)
_LOG1P_POLY = (0.9999998211860657, -0.4999740421772003, 0.33275479078292847,
               -0.24495451152324677, 0.17745208740234375, -0.10768123716115952,
               0.044089287519454956, -0.0085391104221344)


def _softplus_1mufu(x):
    """softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]: one MUFU op (the ex2)
    and a degree-7 polynomial for log1p on the FMA pipe (no lg2, no branches; ~11
    instructions against _softplus's ~13 with two MUFU ops)."""
    e = jnp.exp2(jnp.abs(x) * -_LOG2E)
    p = e * _LOG1P_POLY[-1] + _LOG1P_POLY[-2]
    for c in _LOG1P_POLY[-3::-1]:
        p = p * e + c
    return p * e + jnp.maximum(x, 0.0)


def _thread_rows(ref, count, shape, n_k, interpret, flat=False):
    """`count` [4, parts, lw] f32 arrays: thread (w, p, l)'s values ref[lw w + l, p n_k + e]
    (e < count) of a shared-memory [4 lw, N] ref; flat: ref[0, lw w + l] of a [1, 4 lw] ref
    (one value). Vector loads of 4 where aligned."""
    lw = shape[2]
    if interpret:
        w, p, l_ = (jax.lax.broadcasted_iota(jnp.int32, shape, d) for d in range(3))
        v = ref[...]
        if flat:
            return [v[0][lw * w + l_]]
        return [v[lw * w + l_, p * n_k + e] for e in range(count)]
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu
    n_load = 4 if count % 4 == 0 and n_k % 4 == 0 and ref.shape[-1] % 4 == 0 else 1

    def first(i32):
        tid = _tid_i32(i32)
        lane = arith.remui(tid, mgpu.c(32, i32))
        warp = arith.remui(arith.divui(tid, mgpu.c(32, i32)), mgpu.c(4, i32))
        part = arith.divui(lane, mgpu.c(lw, i32))
        chan = arith.addi(arith.muli(warp, mgpu.c(lw, i32)), arith.remui(lane, mgpu.c(lw, i32)))
        if flat:
            return mgpu.c(0, i32), chan
        return chan, arith.muli(part, mgpu.c(n_k, i32))
    return _inline_row_load(ref, 0, count, shape, n_load, first)


def _bulk_wait_read(n, interpret):
    """cp.async.bulk.wait_group.read n without wait_smem_to_gmem's warpgroup barrier (the
    caller's next barrier publishes it)."""
    if interpret:
        plgpu.wait_smem_to_gmem(n, wait_read_only=True)
        return
    from jax._src.lib.mlir.dialects import nvvm

    @plgpu.inline_mgpu()
    def wait(ctx):
        del ctx
        nvvm.cp_async_bulk_wait_group(n, read=True)
    wait()


def _bc_convert(r, raw_slot, f_slot):
    """bcin: the raw B / C rows of input slot raw_slot ("b_s", "c_s": [stages, chunk, N] in
    their dtype) to f32 rows in slot f_slot of "bcf" [2, 2, chunk, N] (B, C), each thread
    converting chunk N / 128 values of each by vector loads and stores (no barrier here)."""
    for i, k in enumerate(("b", "c")):
        r["bcf"].at[f_slot, i][...] = r[k + "_s"].at[raw_slot][...].astype(jnp.float32)


def _fwd_pair_inf_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, stages,
                       interpret, ahead=0, poly=0, idx=False, ybuf=0, cross=False,
                       sp1=False, ydefer=0, rawp=False, bcin=False, y_acc=1):
    if cross and not ahead:
        raise ValueError("_fwd_pair_inf_body: cross needs ahead >= 1")
    if bcin and (cross or (stages < 2 and n_chunks > 1)):
        raise ValueError("_fwd_pair_inf_body: bcin needs stages >= 2 and no cross")
    has_z = "z" in opts
    bc_in = ["b", "c"] if bcin else ["bc"]
    seq_in = ["u", "dt", *bc_in, *(["z"] if has_z else [])]
    names = ["u", "dt", "a", *bc_in, *opts, "y", "hT", "a_s", "p_s", "h_s", "bar",
             *[k + "_s" for k in seq_in], "y_s", "in_bar", *(["bcf"] if bcin else [])]
    r = dict(zip(names, refs, strict=True))
    f32 = jnp.float32
    shape = _PAIR_SHAPE
    n_k = n_state // 2
    b, j, tiles, fetch, a2, vec, h0 = _pair_prologue(r, opts, seq_in, shape, n_k, chunk, stages,
                                                     n_chunks, interpret, rawp=rawp, bcin=bcin)
    if bcin:   # chunk 0's B / C rows converted to f32 (then every chunk converts the next's)
        plgpu.barrier_wait(r["in_bar"].at[0])
        _bc_convert(r, 0, 0)
        plgpu.commit_smem()     # its barrier publishes the f32 rows
    part = _pair_part(interpret, shape)
    part0, part1 = part == 0, part == 1
    by_poly = {(jj % 2, n_k - 1 - jj // 2) for jj in range(poly)}

    def pair_rows(ref, t):    # rows t, t + 1 of a [chunk, 4, lw] tile as (w, p, l)
        return ref.at[pl.ds(t, 2)].transpose((1, 0, 2))[...].astype(f32)

    def decay(dt, tt, k):
        x = dt * a2[k]
        return _exp2_poly(x, interpret) if (tt, k) in by_poly else jnp.exp2(x)

    def prep(s_, c, t):
        """Step pair (t, t + 1): (u of step t + p, [delta of steps t, t + 1], [delta u],
        the decays [2][K] (ahead=1) or None)."""
        u_own = pair_rows(s_["u"], t)          # u of step t + p
        dt_own = _own_delta(pair_rows(s_["dt"], t), vec, softplus, sp1,
                            padded and (lambda t=t: c * chunk + t + part < length))
        if idx:
            dtu_own = dt_own * u_own
            dts = [_shfl(dt_own, interpret, src_part=tt) for tt in range(2)]
            dtus = [_shfl(dtu_own, interpret, src_part=tt) for tt in range(2)]
        else:
            dt_oth, u_oth = _shfl16(dt_own, interpret), _shfl16(u_own, interpret)
            dts, dtus = [], []
            for tt in range(2):
                mine = part0 if tt == 0 else part1
                dts.append(jnp.where(mine, dt_own, dt_oth))
                dtus.append(dts[-1] * jnp.where(mine, u_own, u_oth))
        decays = ([[decay(dts[tt], tt, k) for k in range(n_k)] for tt in range(2)]
                  if ahead else None)
        return u_own, dts, dtus, decays

    n_ahead = min(max(ahead, 1), chunk // 2)    # step pairs prepared before their updates

    def chunk_body(c, carry):
        slot = jax.lax.rem(c, stages)
        s_ = {k: r[k + "_s"].at[slot] for k in seq_in}
        y_s = r["y_s"].at[jax.lax.rem(c, ybuf) if ybuf else slot]
        if bcin:    # the f32 B / C rows (this chunk's input barrier waited in the last one)
            bcf = r["bcf"].at[jax.lax.rem(c, 2)]
            bc_rows = (bcf.at[0], bcf.at[1])
        else:
            bc_rows = (s_["bc"], s_["bc"])
        if cross:   # this chunk's first pairs were prepared at the end of the last one
            h, queue = list(carry[0]), list(carry[1])
        elif bcin:
            h = list(carry)
        else:
            plgpu.barrier_wait(r["in_bar"].at[slot])
            h = list(carry)
        if not ybuf:
            plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
        if not cross:
            queue = [prep(s_, c, 2 * i) for i in range(n_ahead)]
        held = []     # (step, y) pairs not yet stored (ydefer)
        for t in range(0, chunk, 2):
            if ahead and t + 2 * n_ahead < chunk:
                queue.append(prep(s_, c, t + 2 * ahead))
            elif cross and t + 2 * n_ahead == chunk:   # the next chunk's first pair(s)
                nslot = jax.lax.rem(c + 1, stages)

                @pl.when(c + 1 < n_chunks)
                def _(nslot=nslot):
                    plgpu.barrier_wait(r["in_bar"].at[nslot])
                ns_ = {k: r[k + "_s"].at[nslot] for k in seq_in}
                queue.extend(prep(ns_, c + 1, 2 * i) for i in range(n_ahead))
            u_own, dts, dtus, decays = queue.pop(0)
            ys = []
            for tt in range(2):        # steps t (part 0's own) and t + 1 (part 1's own)
                b_t = _pair_bc(bc_rows[0], t + tt, 0, n_k, n_k, interpret)
                c_t = _pair_bc(bc_rows[1], t + tt, 0 if bcin else n_state, n_k, n_k,
                               interpret)
                if decays is None:
                    dec = functools.partial(decay, dts[tt], tt)
                else:
                    dec = decays[tt].__getitem__
                ys.append(_state_step(h, n_k, dec, dtus[tt], b_t, c_t, y_acc))
            # part p keeps its sum of step t + p and sends the partner's step to it
            y = jnp.where(part0, ys[0], ys[1]) + _shfl16(jnp.where(part0, ys[1], ys[0]),
                                                         interpret)
            y = _skip_gate(y, u_own, vec.get("d"), pair_rows(s_["z"], t) if has_z else None)
            held.append((t, y.astype(y_s.dtype)))
            if len(held) >= (ydefer or 1) or t + 2 == chunk:   # flush the held y rows
                for tq, yq in held:
                    y_s.at[pl.ds(tq, 2)].transpose((1, 0, 2))[...] = yq
                held.clear()
            if not ahead and t + 2 < chunk:
                queue.append(prep(s_, c, t + 2))
        if bcin:   # the next chunk's B / C rows to f32, published by commit_smem's barrier
            @pl.when(c + 1 < n_chunks)
            def _():
                nslot = jax.lax.rem(c + 1, stages)
                plgpu.barrier_wait(r["in_bar"].at[nslot])
                _bc_convert(r, nslot, jax.lax.rem(c + 1, 2))
        if ybuf:   # the y slot of chunk c + 1 (chunk c + 1 - ybuf's store) free after this
            _bulk_wait_read(ybuf - 2, interpret)   # barrier (commit_smem's)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, r["y"].at[b, pl.ds(c * chunk, chunk), tiles])

        @pl.when(c + stages < n_chunks)
        def _():
            fetch(c + stages, slot)
        return (tuple(h), tuple(queue)) if cross else tuple(h)

    if cross:
        plgpu.barrier_wait(r["in_bar"].at[0])
        s0 = {k: r[k + "_s"].at[0] for k in seq_in}
        first = tuple(prep(s0, 0, 2 * i) for i in range(n_ahead))
        h = jax.lax.fori_loop(0, n_chunks, chunk_body, (h0, first))[0]
    else:
        h = jax.lax.fori_loop(0, n_chunks, chunk_body, h0)
    _store_final_state(r, h, b, j)


def pair_supported(dn: int, groups: int, n: int, parts: int = 2) -> bool:
    width = 128 // parts     # channels per program
    return n % parts == 0 and (groups == 1 or (dn % groups == 0 and (dn // groups) % width == 0))


def _ck_options(save_ckpt, parts):
    """(ck_pair, ck_direct, ck_late) of the pair training forward's `save_ckpt`: True (the
    one-thread layout, stored through shared memory) or a dict of options: "ck2" (parts 2:
    the ck2 layout [B, Lp / ck_every, N / 2, Dp, 2], see _ck2_load; read by
    backward_pair(ck_pair=True) and backward(ck2=True)), "direct" (with ck2: stored straight
    from registers, _ck2_store_global), "late" (a checkpoint's stores emitted after the step
    group that follows it, from the old state values, so that the step's update of h[k] does
    not wait for the store to read h[k])."""
    opts = dict(save_ckpt) if isinstance(save_ckpt, dict) else {}
    ck2 = bool(opts.get("ck2")) and parts == 2
    return ck2, ck2 and bool(opts.get("direct")), bool(opts.get("late"))


def _bcin_supported(B, C, n, chunk, stages, n_chunks) -> bool:
    """Whether forward_pair's `bcin` option takes these shapes (else the prepared B / C rows):
    TMA rows of N values in 16-byte units, 16-byte aligned f32 halves for the steps' vector
    loads (N % 8 == 0), whole vectors per thread for the conversion (chunk N % 128 == 0), and
    the next chunk's load in flight while a chunk runs (2+ stages, or one chunk)."""
    sizes = {jnp.dtype(x.dtype).itemsize for x in (B, C)}
    return (n % 8 == 0 and sizes <= {2, 4} and (chunk * n) % _WG == 0
            and (stages >= 2 or n_chunks == 1))


def forward_pair(u, delta, A, B, C, D, z, delta_bias, h0, *, softplus, chunk=16, stages=2,
                 save_ckpt=False, ck_every=4, parts=2, y_acc=1, interpret=False,
                 inf_opts=None, train_opts=None):
    """The forward with two (`parts` = 4: four) lanes per channel in one warp (see above);
    returns (y [B, L, Dn], final state [B, Dn, N] f32, checkpoints [B, Lp / ck_every, N, Dp]
    f32 or None). N a multiple of parts; grouped B/C need Dn / G % (128 / parts) == 0;
    save_ckpt needs chunk % ck_every == 0 and ck_every % parts == 0. inf_opts (a dict, or
    None): the session-9 inference body (_fwd_pair_inf_body) with these options (parts 2, no
    checkpoints). train_opts (a dict, or None): _fwd_pair_body's opt-in options (ydefer,
    sp1) when it stores checkpoints (the training forward)."""
    f32 = jnp.float32
    bsz, length, dn = u.shape
    n = A.shape[1]
    ck_pair, ck_direct, ck_late = _ck_options(save_ckpt, parts)
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[2]
    if parts not in (2, 4) or not pair_supported(dn, groups, n, parts):
        raise ValueError(f"selective_scan_mgpu.forward_pair: N={n}, Dn={dn}, G={groups}, "
                         f"parts={parts}")
    chunk += -chunk % parts
    if save_ckpt and (chunk % ck_every or ck_every % parts):
        raise ValueError(f"forward_pair: chunk {chunk} with checkpoints every {ck_every}")
    shape = _lane_shape(parts)
    lw = shape[2]
    width = 4 * lw           # channels per program
    n_k = n // parts
    dp = _common.round_up(dn, width)
    lp = _common.round_up(length, chunk)
    nb = dp // width
    tiled = lambda x: _common.pad_axis(_common.pad_axis(x, 1, chunk), 2, width).reshape(
        bsz, lp, dp // lw, lw)
    # per-thread [.., 4, parts, lw] of a per-channel [.., Dp] array (every part the same)
    both = lambda x: jnp.broadcast_to(x.reshape(*x.shape[:-1], nb, 4, 1, lw),
                                      (*x.shape[:-1], nb, *shape))
    # per-state [.., N, Dp] -> [.., K, nb, 4, parts, lw]: state p K + k of channel lw w + l
    parted = lambda x: jnp.moveaxis(x.reshape(*x.shape[:-2], parts, n_k, nb, 4, lw), -5, -2)
    bcin = (bool(dict(inf_opts or {}).get("bcin")) and parts == 2 and not save_ckpt
            and _bcin_supported(B, C, n, chunk, min(stages, lp // chunk), lp // chunk))
    if bcin:   # B, C as they are (padded to the chunk only when L is ragged)
        bc_arrays = [_common.pad_axis(B, 1, chunk), _common.pad_axis(C, 1, chunk)]
    else:
        bc = jnp.concatenate([B.astype(f32), C.astype(f32)], -1)
        bc = jnp.swapaxes(_common.pad_axis(_common.pad_axis(bc, 1, chunk), 3, 4), 1, 2)
        bc_arrays = [bc]
    # A, D, bias as they are (the kernel lays them out: no XLA op); the training forward's
    # through train_opts (session 12), the inference forward's through inf_opts
    rawp = (bool(dict((train_opts if save_ckpt else inf_opts) or {}).get("rawp"))
            and parts == 2 and n % 4 == 0)
    if rawp:
        a2 = _common.pad_axis(A.astype(f32), 0, width)                  # [Dp, N]
        vec = lambda x: _common.pad_axis(x.astype(f32), 0, width)       # [Dp]
    else:
        a2 = parted(_common.pad_axis(A.astype(f32).T * _LOG2E, 1, width))
        vec = lambda x: both(_common.pad_axis(x.astype(f32), 0, width))
    state = lambda x: parted(_common.pad_axis(jnp.swapaxes(x.astype(f32), 1, 2), 2, width))
    given = optional_inputs(z, D, delta_bias, h0, seq=tiled, vec=vec, state=state)
    opts = [name for name, _ in given]
    arrays = [tiled(u), tiled(delta), a2, *bc_arrays, *[x for _, x in given]]
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp // lw, lw), u.dtype),
                 jax.ShapeDtypeStruct((bsz, n_k, nb, *shape), f32)]
    if ck_pair:    # ck2: [B, Lp / ck_every, K, Dp, 2]
        out_shape.append(jax.ShapeDtypeStruct(
            _ck2_shape((bsz, lp // ck_every, n_k, dp, 2), interpret), f32))
    elif save_ckpt:
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp // ck_every, n, dp // lw, lw), f32))
    # the checkpoint slots (none when stored straight from registers)
    ck_bufs = [] if ck_direct else [plgpu.SMEM(
        (min(stages, lp // chunk), chunk // ck_every,
         *((n_k, *((4, 16, 2) if interpret else (_WG,))) if ck_pair else (n, 4, lw))), f32)]
    n_chunks = lp // chunk
    stages = min(stages, n_chunks)
    tile = lambda dtype: plgpu.SMEM((stages, chunk, 4, lw), dtype)
    if bcin:
        seq_bufs = [tile(u.dtype), tile(delta.dtype), plgpu.SMEM((stages, chunk, n), B.dtype),
                    plgpu.SMEM((stages, chunk, n), C.dtype)]
    else:
        seq_bufs = [tile(u.dtype), tile(delta.dtype),
                    plgpu.SMEM((stages, chunk, bc.shape[-1]), f32)]
    if z is not None:
        seq_bufs.append(tile(z.dtype))
    ybuf = dict(inf_opts or {}).get("ybuf", 0) if parts == 2 and not save_ckpt else 0
    seq_bufs.append(plgpu.SMEM((ybuf, chunk, 4, lw), u.dtype) if ybuf else tile(u.dtype))
    if save_ckpt:
        seq_bufs += ck_bufs
    n_in = 3 + bcin + (z is not None)
    scratch = [plgpu.SMEM((width, n) if rawp else (n_k, *shape), f32),
               plgpu.SMEM((2, width) if rawp else (2, *shape), f32),
               plgpu.SMEM((n_k, *shape), f32), plgpu.Barrier(num_barriers=4), *seq_bufs,
               plgpu.Barrier(num_arrivals=n_in, num_barriers=stages),
               *([plgpu.SMEM((2, 2, chunk, n), f32)] if bcin else [])]
    body = functools.partial(
        _fwd_pair_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks,
        length=length, padded=lp != length, softplus=softplus, stages=stages,
        interpret=interpret, save_ckpt=save_ckpt, ck_every=ck_every, parts=parts, y_acc=y_acc,
        **({k: v for k, v in dict(train_opts).items() if k != "rawp"}
           if train_opts and save_ckpt else {}), **({"rawp": True} if rawp else {}))
    if inf_opts is not None and parts == 2 and not save_ckpt:
        body = functools.partial(
            _fwd_pair_inf_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks,
            length=length, padded=lp != length, softplus=softplus, stages=stages,
            interpret=interpret, y_acc=y_acc,
            # bcin and rawp as resolved above (rawp needs N % 4 == 0: the default inf_opts ask
            # for it at every N, and an N of 6 must get the XLA layout of A, D and bias)
            **{k: v for k, v in dict(inf_opts).items() if k not in ("bcin", "rawp")},
            **({"bcin": True} if bcin else {}), **({"rawp": True} if rawp else {}))
    y, hT, *ck = plgpu.kernel(
        body, out_type=out_shape, grid=(bsz, nb), grid_names=("b", "j"), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            unsafe_no_auto_barriers=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=("selective_scan_fwd_mgpu_pair" + ("4" if parts == 4 else "")
                     + ("_ck" if save_ckpt else "")
                     + ("_v9" if inf_opts is not None else "")))(*arrays)
    y = y.reshape(bsz, lp, dp)[:, :length, :dn]
    # [B, K, nb, 4, parts, lw] -> [B, N, Dp]: state p K + k, channel width j + lw w + l
    final = jnp.moveaxis(hT, -2, 1).reshape(bsz, n, dp)
    if save_ckpt and not ck_pair:   # [B, Lp / ck_every, N, Dp], Dp padded to 128
        ck = [_common.pad_axis(ck[0].reshape(*ck[0].shape[:3], dp), 3, _WG)]
    elif ck_pair:                   # ck2 [B, Lp / ck_every, K, Dp, 2], Dp padded to 128
        ck = [_common.pad_axis(ck[0].reshape(*ck[0].shape[:3], dp, 2), 3, _WG)]
    return y, jnp.swapaxes(final[:, :, :dn], 1, 2), (ck[0] if save_ckpt else None)


# ---------------------------------------------------------------------------------------------
# Backward (mgpu_bwd): the Triton backward's recurrence (see selective_scan._bwd_kernel) with one
# channel per thread. Chunks run in reverse through the same hand-written TMA pipeline; each
# chunk is `chunk / ck_every` sub-chunks of ck_every = 4 steps: the sub-chunk's states are
# recomputed from its checkpoint into registers (its decays kept), then its steps run in reverse.
# dB_t / dC_t (sums over the 128 channels of the program) go through shared memory: step t's
# 2N per-thread values are rows (t, q) of `red` [4 * 32, 132] (one conflict-free st.shared
# per value); after the sub-chunk thread i sums row i (32 vector loads of 4 floats, the row
# stride of 132 floats keeps them conflict-free), then the 4 lanes of its vector through a
# [128, 4] scratch. So the program writes one dB/dC row per step, summed over the Dn / 128
# programs (and groups) outside, in a fixed order.

_SMEM_BYTES = 220 * 1024   # of the H200's 227 KB per block, with room for Mosaic's own
_NQ = 32     # dB/dC values per step (2N <= 32, padded): 4 steps x 32 = 128 rows, one per thread
_RED_PAD = 4


def bwd_supported(n: int, ck_every: int) -> bool:
    return 2 * n <= _NQ and ck_every * _NQ == _WG


def _n_acc(rowsum):
    """Partial sums of the backwards' row sums: `rowsum` an int > 1 (True / "auto": 1)."""
    return rowsum if type(rowsum) is int and rowsum > 1 else 1


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp2(x * -_LOG2E))


def _dbc_states(dbc, first, parts, n_k):
    """Columns first .. first + parts n_k of the summed dB/dC rows (column parts k + p holds
    state p K + k) in state order: a reshape and transpose (XLA fuses it into the sum over
    the channel blocks; an index list would be a separate gather)."""
    x = dbc[..., first:first + parts * n_k]
    if parts == 1:
        return x
    x = jnp.swapaxes(x.reshape(*x.shape[:-1], n_k, parts), -1, -2)
    return x.reshape(*x.shape[:-2], parts * n_k)


def _bwd_refs(refs, opts, x_s=False, dbc_in=False, raw=False):
    """The backward kernels' refs by name: inputs, outputs, then scratch (the order of
    `pl.pallas_call`'s operands and scratch shapes in the backward wrappers), and the names of
    the per-chunk input and output tiles. dbc_in: the dB/dC rows go to an accumulator passed
    as the last input (a ref: backward_pair's dbc_add), not to an output. raw: two more
    scratch refs at the end, "a_raw" and "p_raw" (backward_pair's rawp)."""
    has_z = "z" in opts
    seq_in = ["u", "dt", "dy", "bc", "ck", *(["z"] if has_z else [])]
    seq_out = ["du", "ddt", *(["dz"] if has_z else []), "dbc"]
    names = ["u", "dt", "a", "bc", *[k for k in ("z", "d", "bias") if k in opts], "ck", "dy",
             "dhT", *(["dbc"] if dbc_in else []),
             *[k for k in seq_out if not (dbc_in and k == "dbc")],
             "da", *[k for k in ("dd", "dbias") if k[1:] in opts], "dh0",
             "a_s", "p_s", "h_s", "bar", "red", "red2",
             *[k + "_s" for k in seq_in + seq_out], *(["x_s"] if x_s else []), "in_bar",
             *(["a_raw", "p_raw"] if raw else [])]
    return dict(zip(names, refs, strict=True)), seq_in, seq_out


def _bwd_chunk_start(r, k, n_chunks, stages, names):
    """A backward's k-th step of its reverse walk: chunk c = n_chunks - 1 - k, its ring slot and
    the slot's shared-memory tiles of `names`, after its inputs landed and the slot's previous
    outputs were read out by their TMA stores."""
    c = n_chunks - 1 - k
    slot = jax.lax.rem(k, stages)
    s_ = {name: r[name + "_s"].at[slot] for name in names}
    plgpu.barrier_wait(r["in_bar"].at[slot])
    plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
    return c, slot, s_


def _bwd_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, ck_every,
              stages, keep_decay, ck_split, split, vec_bc, interpret, parts_major=False,
              bwd_loop=False, bwd_ahead=False, rowsum=False, ck2=False):
    """ck2 (split 1): the checkpoints in the ck2 layout (_ck2_load). split = 2: as in the
    forward, thread i holds channel i % 64 and states (i // 64) K + k; the per-channel sums
    <g, B>, <A log2 e, q> (and y with z) of the two parts meet through shared memory at the
    sub-chunk end (the barrier of the dB/dC sums), where both parts finish each step (du,
    ddelta, dz; the outputs are stored from part 0's copy); dB/dC rows are ordered q' = 2k + p
    (reordered outside)."""
    has_z = "z" in opts
    r, seq_in, seq_out = _bwd_refs(refs, opts, x_s=split > 1)
    f32 = jnp.float32
    bd = _WG // split
    n_k = n_state // split
    b, j, cols, g_idx = _channel_block(r, bd)
    n_sub = chunk // ck_every
    ck_k = n_state // ck_split
    rows_names = ["u", "dt", "dy", *(["z"] if has_z else [])]

    def ck_state(ck_s, sub, k):     # [split, bd]: state p * n_k + k of each thread
        if split == 1:              # the checkpoint layout keeps state n at [n % ck_k, n // ck_k]
            return ck_s[sub, k % ck_k, pl.ds(k // ck_k, 1), :]
        if parts_major:             # the unsplit forward's [.., N, Dp] seen as [.., 2, K, Dp]
            return ck_s[sub, :, k, :]
        return ck_s[sub, k]         # the split forward's: [k, p] is state p * n_k + k

    def ck_states(ck_s, sub):       # the n_k states of each thread
        if not ck2:
            return [ck_state(ck_s, sub, kk) for kk in range(n_k)]
        half = n_state // 2
        pairs = [_ck2_load(ck_s.at[sub, kk], interpret) for kk in range(half)]
        return [pairs[kk][0] for kk in range(half)] + [pairs[kk][1] for kk in range(half)]

    def fetch(k, slot):      # the k-th chunk of the reverse walk: chunk n_chunks - 1 - k
        c = n_chunks - 1 - k
        rows = pl.ds(c * chunk, chunk)
        bar = r["in_bar"].at[slot]
        plgpu.copy_gmem_to_smem(r["bc"].at[b, g_idx, rows], r["bc_s"].at[slot], bar)
        ck_sub = pl.ds(c * n_sub, n_sub)
        plgpu.copy_gmem_to_smem(r["ck"].at[b, ck_sub, :, _ck2_cols(j, bd, interpret, False)]
                                if ck2
                                else r["ck"].at[b, ck_sub, :, :, cols], r["ck_s"].at[slot], bar)
        for name in rows_names:
            for p in range(split):
                plgpu.copy_gmem_to_smem(r[name].at[b, rows, cols], r[name + "_s"].at[slot, p],
                                        bar)

    for s in range(min(stages, n_chunks)):
        fetch(s, s)
    a_rows, vec, dh_init = _load_params(r, opts, cols, split, n_k, r["dhT"].at[b, :, :, cols])
    a2 = [a * _LOG2E for a in a_rows]   # <A, q> = ln2 <A log2(e), q>
    zero = _zeros((split, bd))

    vec4 = vec_bc and n_k % 4 == 0 and n_state % 4 == 0

    def bc_get(bc_s, t, which):     # B (which 0) or C (1) of the thread's states at step t
        return _bc_vals(bc_s, t, which * n_state, n_k, split, n_k, vec4, interpret)

    def delta_of(dt_s, t, i):
        x = dt_s[:, t, :].astype(f32)
        if "bias" in vec:
            x = x + vec["bias"]
        dt = _softplus(x, True) if softplus else x
        if padded:
            dt = jnp.where(i < length, dt, 0.0)
        return dt, x

    def finish(s_, t, i, dt, x, u, dout, zz, y, gb, saq, dd, dbias):
        """The per-channel end of step t (i = its index in the sequence)."""
        if has_z:
            sz = _sigmoid(zz)
            if "d" in vec:
                y = y + vec["d"] * u
            s_["dz"][:, t, :] = (dout * y * sz * (1.0 + zz * (1.0 - sz))).astype(
                s_["dz"].dtype)
            dy = dout * zz * sz
        else:
            dy = dout
        du = dt * gb
        if "d" in vec:
            du = du + vec["d"] * dy
            dd = dd + dy * u
        s_["du"][:, t, :] = du.astype(s_["du"].dtype)
        ddt = u * gb + saq * _LN2
        if softplus:
            ddt = ddt * _sigmoid(x)
        if padded:
            ddt = jnp.where(i < length, ddt, 0.0)
        s_["ddt"][:, t, :] = ddt.astype(s_["ddt"].dtype)
        return dd, dbias + ddt

    def exchange(row, kind, v):      # split 2: this part's sum, twice: rows [p0, p1, p0, p1]
        r["x_s"][row, kind, pl.ds(0, 2), :] = v
        r["x_s"][row, kind, pl.ds(2, 2), :] = v

    def chunk_body(k, carry):
        dh, da, dd, dbias = list(carry[0]), list(carry[1]), carry[2], carry[3]
        c, slot, s_ = _bwd_chunk_start(r, k, n_chunks, stages, seq_in + seq_out)
        bc_s = s_["bc"]

        def recompute(sub):     # the sub-chunk's states (and decays) from its checkpoint
            t0 = sub * ck_every
            h = ck_states(s_["ck"], sub)
            hs, steps, decays = [None], [], []     # hs[0]: read from the checkpoint again
            for tl in range(ck_every):                         # recompute
                t = t0 + tl
                i = c * chunk + t
                dt, x = delta_of(s_["dt"], t, i)
                u = s_["u"][:, t, :].astype(f32)
                dtu = dt * u
                steps.append((dt, x, u, dtu))
                a_t = [jnp.exp2(dt * a2[kk]) for kk in range(n_k)]
                decays.append(a_t if keep_decay else None)
                b_t = bc_get(bc_s, t, 0)
                h = [a_t[kk] * h[kk] + dtu * b_t[kk] for kk in range(n_k)]
                hs.append(h)
            return hs, steps, decays

        def back(sub, rec, carry, nxt=None):
            """The sub-chunk's reverse steps and dB/dC rows (sub static or traced); with `nxt`,
            the recompute of sub-chunk nxt runs between the two barriers (next to the dB/dC
            sums, which it does not touch), and its result is returned."""
            dh, da, dd, dbias = list(carry[0]), list(carry[1]), carry[2], carry[3]
            hs, steps, decays = rec
            t0 = sub * ck_every
            pending = []
            if rowsum:     # every thread has read the previous sub-chunk's `red` rows
                plgpu.commit_smem()
            for tl in reversed(range(ck_every)):               # reverse steps
                t = t0 + tl
                i = c * chunk + t
                dt, x, u, dtu = steps[tl]
                dout = s_["dy"][:, t, :].astype(f32)
                h_prev = hs[tl] or ck_states(s_["ck"], sub)
                h_t = hs[tl + 1]
                a_t = decays[tl] or [jnp.exp2(dt * a2[kk]) for kk in range(n_k)]
                b_t, c_t = bc_get(bc_s, t, 0), bc_get(bc_s, t, 1)
                zz, y = None, None
                if has_z:
                    zz = s_["z"][:, t, :].astype(f32)
                    for kk in range(n_k):
                        hc = h_t[kk] * c_t[kk]
                        y = hc if y is None else y + hc
                    dy = dout * zz * _sigmoid(zz)
                else:
                    dy = dout
                gb, saq = None, None
                for kk in range(n_k):
                    g = dh[kk] + c_t[kk] * dy
                    row = tl * _NQ + split * kk
                    r["red"][pl.ds(row, split), pl.ds(0, bd)] = g * dtu
                    r["red"][pl.ds(row + n_state, split), pl.ds(0, bd)] = dy * h_t[kk]
                    dh[kk] = a_t[kk] * g     # q = g a h_prev = dh_{t-1} h_prev: one FMUL
                    q = dh[kk] * h_prev[kk]
                    da[kk] = da[kk] + dt * q
                    saq = a2[kk] * q if saq is None else saq + a2[kk] * q
                    gb = g * b_t[kk] if gb is None else gb + g * b_t[kk]
                if split == 1:
                    dd, dbias = finish(s_, t, i, dt, x, u, dout, zz, y, gb, saq, dd, dbias)
                else:
                    exchange(tl, 0, gb)
                    exchange(tl, 1, saq)
                    if has_z:
                        exchange(tl, 2, y)
                    pending.append((t, i, tl))
            # dB/dC of the sub-chunk: row i of `red` is (step i // 32, value i % 32)
            plgpu.commit_smem()
            for t, i, tl in pending:     # split 2: both parts finish each step
                dt, x, u, _ = steps[tl]
                other = lambda kind, tl=tl: (r["x_s"][tl, kind, pl.ds(0, 2), :]
                                             + r["x_s"][tl, kind, pl.ds(1, 2), :])
                dout = s_["dy"][:, t, :].astype(f32)
                zz = s_["z"][:, t, :].astype(f32) if has_z else None
                dd, dbias = finish(s_, t, i, dt, x, u, dout, zz, other(2) if has_z else None,
                                   other(0), other(1), dd, dbias)
            rec_next = recompute(nxt) if nxt is not None else None
            if rowsum:
                tot = _row_sums(r["red"], bd, None, interpret, _n_acc(rowsum))
            else:
                acc = None
                for m in range(bd // 4):
                    v = plgpu.load(r["red"].at[:, pl.ds(4 * m, 4)],
                                   layout=plgpu.Layout.WG_STRIDED((_WG, 4), vec_size=4))
                    acc = v if acc is None else acc + v
                r["red2"][...] = acc
                plgpu.commit_smem()
                tot = r["red2"][:, 0] + r["red2"][:, 1] + (r["red2"][:, 2] + r["red2"][:, 3])
            s_["dbc"][pl.ds(t0, ck_every), :] = tot.reshape(ck_every, _NQ)
            return (tuple(dh), tuple(da), dd, dbias), rec_next

        carry = (tuple(dh), tuple(da), dd, dbias)
        if bwd_ahead and n_sub > 1:    # recompute one sub-chunk ahead (within the chunk)
            rec = recompute(n_sub - 1)
            if bwd_loop and n_sub > 2:
                def ahead_body(m, cr):
                    sub = n_sub - 1 - m
                    return back(sub, cr[1], cr[0], sub - 1)
                carry, rec = jax.lax.fori_loop(0, n_sub - 1, ahead_body, (carry, rec))
            else:
                for sub in reversed(range(1, n_sub)):
                    carry, rec = back(sub, rec, carry, sub - 1)
            carry, _ = back(0, rec, carry)
        elif bwd_loop:    # `per` sub-chunks unrolled per iteration (bwd_loop an int, or 1)
            per = bwd_loop if bwd_loop is not True and n_sub % bwd_loop == 0 else 1

            def loop_body(m, cr):
                for q in range(per):
                    sub = n_sub - 1 - (m * per + q)
                    cr = back(sub, recompute(sub), cr)[0]
                return cr
            carry = jax.lax.fori_loop(0, n_sub // per, loop_body, carry)
        else:
            for sub in reversed(range(n_sub)):
                carry, _ = back(sub, recompute(sub), carry)
        dh, da, dd, dbias = list(carry[0]), list(carry[1]), carry[2], carry[3]
        plgpu.commit_smem()
        for name in seq_out:
            if name == "dbc":
                plgpu.copy_smem_to_gmem(s_["dbc"], r["dbc"].at[b, j, pl.ds(c * chunk, chunk)],
                                        commit_group=False)
            else:
                plgpu.copy_smem_to_gmem(s_[name].at[0],
                                        r[name].at[b, pl.ds(c * chunk, chunk), cols],
                                        commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(k + stages < n_chunks)
        def _():
            fetch(k + stages, slot)
        return tuple(dh), tuple(da), dd, dbias

    init = (dh_init, tuple(zero for _ in range(n_k)), zero, zero)
    dh, da, dd, dbias = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    for kk in range(n_k):
        r["h_s"][kk] = dh[kk]
        r["a_s"][kk] = da[kk]
    outs_vec = [(k, v) for k, v in (("dd", dd), ("dbias", dbias)) if k in r]
    for i, (_, v) in enumerate(outs_vec):
        r["p_s"][i] = v
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r["h_s"], r["dh0"].at[b, :, :, cols])
    plgpu.copy_smem_to_gmem(r["a_s"], r["da"].at[b, :, :, cols])
    for i, (k, _) in enumerate(outs_vec):
        plgpu.copy_smem_to_gmem(r["p_s"].at[i, 0], r[k].at[b, cols])
    plgpu.wait_smem_to_gmem(0)


def backward(res, y_bar, final_bar, *, softplus, chunk=16, ck_every=4, stages=2,
             keep_decay=True, split=1, vec_bc=True, bwd_loop=False, bwd_ahead=False,
             rowsum=False, ck2=False, interpret=False):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0) from the residuals of the
    training forward above (its checkpoints every ck_every steps, chunks of `chunk`; either
    layout: [B, nC, N, Dp] or the split forward's [B, nC, N / 2, 2, Dp]). split = 2: two
    threads per channel (needs the split forward's checkpoints). bwd_loop: a chunk's
    sub-chunks run as a loop (the code of one sub-chunk, or of `bwd_loop` of them when an int)
    instead of unrolled. bwd_ahead: each
    sub-chunk's recompute runs in the previous one's dB/dC phase (between its barriers). ck2
    (split 1, N even): the checkpoints in the ck2 layout [B, Lp / ck_every, N / 2, Dp, 2] of
    forward_pair(ck_pair=True)."""
    u, delta, A, B, C, D, z, delta_bias, h0, ck = res
    if split not in (1, 2):
        raise ValueError(f"selective_scan_mgpu.backward: split={split} is not 1 or 2")
    if ck2 and (split != 1 or ck.ndim != 5 or 2 * ck.shape[2] != A.shape[1]
                or ck.shape[4] != 2):
        raise ValueError(f"selective_scan_mgpu.backward: ck2 checkpoints {ck.shape}, "
                         f"split={split}")
    if ck.ndim == 5 and ck.shape[3] == 1 and not ck2:   # the unsplit forward's, parted
        ck = ck[:, :, :, 0]
    ck_split = 1 if ck.ndim == 4 or ck2 else ck.shape[3]
    if ck.ndim == 4:   # [B, nC, N, Dp]: for split 2 as [B, nC, 2, N / 2, Dp] (parts major)
        ck = (ck[:, :, :, None] if split == 1 else
              ck.reshape(ck.shape[0], ck.shape[1], 2, A.shape[1] // 2, ck.shape[-1]))
    parts_major = ck_split == 1 and split == 2
    f32 = jnp.float32
    bsz, length, dn = u.shape
    n = A.shape[1]
    bd, n_k = _WG // split, n // split
    grouped = B.ndim == 4
    if not grouped:
        B3, C3 = B[:, :, None], C[:, :, None]
    else:
        B3, C3 = B, C
    groups = B3.shape[2]
    dp = _common.round_up(dn, _WG)
    bcw = _common.round_up(2 * n, 4)
    # shared memory: per slot the chunk's rows in and out, B/C, checkpoints, dB/dC rows; plus
    # the dB/dC transpose buffers and the parameters. Halve the chunk until it fits.
    seq_bytes = split * 2 * (u.dtype.itemsize + delta.dtype.itemsize
                             + (z.dtype.itemsize if z is not None else 0))
    fixed = (ck_every * _NQ * (bd + _RED_PAD) * 4 + _WG * 16 + (2 * n + 2) * _WG * 4
             + (ck_every * 12 * bd * 4 if split > 1 else 0) + 1024)
    per_step = bd * seq_bytes + bcw * 4 + n * bd * 4 // ck_every + _NQ * 4
    limit = _SMEM_BYTES if split == 1 else _SMEM_BYTES // 2   # split 2: two programs per SM
    while chunk > ck_every and fixed + stages * chunk * per_step > limit:
        chunk //= 2
    lp = _common.round_up(length, chunk)
    n_chunks = lp // chunk
    stages = min(stages, n_chunks)
    seq = lambda x: _common.pad_axis(_common.pad_axis(x, 1, chunk), 2, _WG)
    vec = lambda x: _common.pad_axis(x.astype(f32), 0, _WG)
    by_part = lambda x: jnp.swapaxes(x.reshape(*x.shape[:-2], split, n_k, x.shape[-1]), -3, -2)
    unpart = lambda x: jnp.swapaxes(x, -3, -2).reshape(*x.shape[:-3], n, x.shape[-1])
    bc = jnp.concatenate([B3.astype(f32), C3.astype(f32)], -1)
    bc = jnp.swapaxes(_common.pad_axis(_common.pad_axis(bc, 1, chunk), 3, 4), 1, 2)
    arrays = [seq(u), seq(delta), by_part(_common.pad_axis(A.astype(f32).T, 1, _WG)), bc]
    given = optional_inputs(z, D, delta_bias, None, seq=seq, vec=vec, state=None)
    opts = [name for name, _ in given]
    arrays += [x for _, x in given]
    if ck2:
        ck = ck.reshape(_ck2_shape(ck.shape, interpret, pair=False))
    arrays += [ck[:, :lp // ck_every], seq(y_bar.astype(u.dtype)),
               by_part(_common.pad_axis(jnp.swapaxes(final_bar.astype(f32), 1, 2), 2, _WG))]
    n_blocks = dp // bd
    out_shape = [jax.ShapeDtypeStruct((bsz, lp, dp), u.dtype),
                 jax.ShapeDtypeStruct((bsz, lp, dp), delta.dtype)]
    if z is not None:
        out_shape.append(jax.ShapeDtypeStruct((bsz, lp, dp), z.dtype))
    out_shape += [jax.ShapeDtypeStruct((bsz, n_blocks, lp, _NQ), f32),
                  jax.ShapeDtypeStruct((bsz, n_k, split, dp), f32)]
    out_shape += [jax.ShapeDtypeStruct((bsz, dp), f32) for x in (D, delta_bias)
                  if x is not None]
    out_shape.append(jax.ShapeDtypeStruct((bsz, n_k, split, dp), f32))
    slot = lambda dtype, *shape: plgpu.SMEM((stages, *shape), dtype)
    rows = lambda dtype: slot(dtype, split, chunk, bd)
    seq_bufs = [rows(u.dtype), rows(delta.dtype), rows(u.dtype),
                slot(f32, chunk, bc.shape[-1]),
                slot(f32, chunk // ck_every, *(((ck.shape[2], bd, 2) if interpret
                                                else (ck.shape[2], 2 * bd)) if ck2
                                               else (*ck.shape[2:4], bd)))]
    if z is not None:
        seq_bufs.append(rows(z.dtype))
    seq_bufs += [rows(u.dtype), rows(delta.dtype)]
    if z is not None:
        seq_bufs.append(rows(z.dtype))
    seq_bufs.append(slot(f32, chunk, _NQ))
    if split > 1:
        seq_bufs.append(plgpu.SMEM((ck_every, 3, 4, bd), f32))
    n_in = 2 + split * (3 + (z is not None))
    scratch = [plgpu.SMEM((n_k, split, bd), f32), plgpu.SMEM((2, split, bd), f32),
               plgpu.SMEM((n_k, split, bd), f32), plgpu.Barrier(num_barriers=2 + 2 * split),
               plgpu.SMEM((ck_every * _NQ, bd + _RED_PAD), f32), plgpu.SMEM((_WG, 4), f32),
               *seq_bufs, plgpu.Barrier(num_arrivals=n_in, num_barriers=stages)]
    body = functools.partial(
        _bwd_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks, length=length,
        padded=lp != length, softplus=softplus, ck_every=ck_every, stages=stages,
        keep_decay=keep_decay, ck_split=ck_split, split=split, vec_bc=vec_bc,
        parts_major=parts_major, interpret=interpret, bwd_loop=bwd_loop, bwd_ahead=bwd_ahead,
        rowsum=rowsum, ck2=ck2)
    outs = list(plgpu.kernel(
        body, out_type=out_shape, grid=(bsz, n_blocks), grid_names=("b", "j"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            unsafe_no_auto_barriers=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="selective_scan_bwd_mgpu")(*arrays))
    crop = lambda x: x[:, :length, :dn]
    du, ddelta = crop(outs.pop(0)), crop(outs.pop(0))
    dz = crop(outs.pop(0)) if z is not None else None
    # dB/dC rows per channel block, summed over the blocks of each group in a fixed order;
    # within a row, state p * K + k of part p sits at column split * k + p (C: N + that)
    dbc = outs.pop(0)[:, :, :length].reshape(bsz, groups, n_blocks // groups, length, _NQ)
    dbc = jnp.moveaxis(dbc.sum(2), 1, 2)                     # [B, L, G, NQ]
    db, dc = _dbc_states(dbc, 0, split, n_k), _dbc_states(dbc, n, split, n_k)
    if not grouped:
        db, dc = db[:, :, 0], dc[:, :, 0]
    da = jnp.swapaxes(unpart(outs.pop(0)).sum(0), 0, 1)[:dn].astype(A.dtype)
    dd = outs.pop(0).sum(0)[:dn].astype(D.dtype) if D is not None else None
    dbias = (outs.pop(0).sum(0)[:dn].astype(delta_bias.dtype)
             if delta_bias is not None else None)
    dh0 = unpart(outs.pop(0))
    dh0 = (jnp.swapaxes(dh0[:, :, :dn], 1, 2).astype(h0.dtype) if h0 is not None else None)
    return (du, ddelta, da, db.astype(B.dtype), dc.astype(C.dtype), dd, dz, dbias, dh0)


# ---------------------------------------------------------------------------------------------
# Backward with two lanes per channel in one warp ("pair", mgpu_bwd_pair): the one-thread
# backward's recurrence with the pair forward's thread map (thread 32 w + 16 p + l: channel
# 16 w + l of the program's 64, states p K + k), so that Dn 2048 at B 8 gives 256 programs of
# 4 warps (two warps per scheduler) where the one-thread backward has one. Per step pair
# (t, t + 1) lane part p loads u, delta, dy (z) of step t + p only (softplus once per lane and
# two steps) and takes the partner's by shfl.xor 16; the per-channel sums <g, B>, <A, q> (and y
# with z) of the two parts meet by one shfl each per step pair (part p keeps step t + p's), and
# lane part p finishes step t + p (du, ddelta, dz). dB/dC rows go through shared memory as in
# the one-thread kernel, 64 channels per row; row (t, which * N + 2 k + p) holds state p K + k
# (the two parts' rows adjacent: the warp's store is conflict-free), reordered outside.
# parts = 4: four lanes per channel as in the four-lane forward (32 channels a program, 4
# warps per scheduler at 8x2048x2048): step t + q's delta, delta u and dy from part q by
# shfl.idx, the sums by the butterfly reduce-scatter (_part_sums).

_RED_W = 5     # `red` rows of [5, lw] floats (4 x lw channels and a pad)


def _shfl_lanes(x, distance, interpret):
    """shfl.bfly by `distance` < lw lanes within a lane part ([4, parts, lw] arrays): lane l
    gets lane l ^ distance's value (another channel of the same states)."""
    if interpret:   # l ^ d: swap the halves of each 2 d-lane block (no index constant)
        w, parts, lw = x.shape
        return x.reshape(w, parts, lw // (2 * distance), 2, distance)[:, :, :, ::-1].reshape(
            x.shape)
    return _shfl(x, interpret, distance=distance)


# Permuted state slots (mgpu_bwd_perm, N 16): in the pair backward thread (w, p, l) keeps
# state p K + (k ^ m) in its slot k, m = 2 * ((l >> 2) & 3) (lane bits 2, 3 as state bits 1,
# 2). Listed as value 2 k + (0: dB, 1: dC), lane l's value e is then logical value e ^ (l & 12)
# of its half-warp, which is what the butterfly reduce-scatter's xor-8 and xor-4 levels keep
# and send without a select (_lane_reduce_scatter's `free`): 6 selects per step and thread
# instead of 30. The B / C slots come by 8-byte loads at xor-ed columns (_pair_bc perm), the
# checkpoint slots from xor-ed rows (_ck_perm_load); A, dh and dA are permuted once.

def _perm_mask(levels):
    """perm 2: m = (l >> 1) & 6 (lane bits 2, 3); perm 3: (l >> 1) & 7 (lane bits 1-3)."""
    return 6 if levels == 2 else 7


def _perm_xor(interpret, shape=_PAIR_SHAPE, levels=2):
    """[4, 2, 16] int32: the thread's slot xor m (see above and _perm_mask)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    if not interpret:
        lane = plgpu.layout_cast(lane, plgpu.Layout.WG_STRIDED(shape, vec_size=1))
    return (lane >> 1) & _perm_mask(levels)


def _perm_xor_i32(i32, levels=2):
    """Inside inline_mgpu: the thread's m (tid 32 w + 16 p + l; see _perm_mask)."""
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu
    return arith.andi(arith.shrui(_tid_i32(i32), mgpu.c(1, i32)),
                      mgpu.c(_perm_mask(levels), i32))


def _perm_slots(vals, m, levels=2):
    """Slot k <- vals[k ^ m] (per thread; an involution: it also undoes itself). 3 (perm 3:
    7) selects a slot: for values read or written once per kernel (A, dh, dA)."""
    xs = [x for x in range(8) if x & _perm_mask(levels) == x]
    out = []
    for k in range(len(vals)):
        v = vals[k ^ xs[-1]]
        for x in reversed(xs[:-1]):
            v = jnp.where(m == x, vals[k ^ x], v)
        out.append(v)
    return out


def _ck_perm_load(ck_sub, k, ck_pair, interpret, levels=2):
    """Slot k of each pair thread (perm): state p K + (k ^ m) of its channel, one
    ld.shared.f32 of the thread's own row: from the ck2 rows ck_sub [K, 128] (interpret [K, 4,
    16, 2]), or (not ck_pair) from the one-thread layout's rows [N, 4, 16] (state, w, l)."""
    if interpret:
        full = ck_sub[...]
        full = (jnp.swapaxes(full, 2, 3) if ck_pair       # [K, 4, 2, 16]: (k, w, p, l)
                else jnp.moveaxis(full.reshape(2, -1, 4, 16), 0, 2))
        rows = (k ^ _perm_xor(True, levels=levels))[None]
        return jnp.take_along_axis(full, rows, axis=0)[0]
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic import gpu as mgpu
    n_k = ck_sub.shape[0] if ck_pair else ck_sub.shape[0] // 2
    if not ck_pair:
        ck_sub = ck_sub.reshape(ck_sub.shape[0], 64)

    def first(i32):     # thread 32 w + 16 p + l
        tid = _tid_i32(i32)
        c = lambda x: mgpu.c(x, i32)
        row = arith.xori(_perm_xor_i32(i32, levels), c(k))
        if ck_pair:     # (row k ^ m, float 32 w + 2 l + p)
            return row, _ck2_col(tid, c, arith)
        # (row p K + (k ^ m), float 16 w + l)
        p = arith.andi(arith.shrui(tid, c(4)), c(1))
        return (arith.addi(arith.muli(p, c(n_k)), row),
                arith.addi(arith.shrui(arith.andi(tid, c(_WG - 32)), c(1)),
                           arith.andi(tid, c(15))))
    return _inline_row_load(ck_sub, 0, 1, _PAIR_SHAPE, 1, first)[0]


def _red_early_store(red, buf, tl, vals, interpret):
    """red_early: lane (w, p, l)'s 4 partial sums (logical values 4 (l >> 2) + e of part p,
    summed over the lanes l ^ 4, l ^ 8, l ^ 12) into red [2, 4 w, 4 (l & 3), ck_every * 32 +
    8] at buffer buf, column tl * 32 + 16 p + 4 (l >> 2) + e: one st.shared.v4 per thread
    (the 8-float pad puts the four (l & 3) rows 8 banks apart: each quarter-warp's 8 stores
    hit 32 different banks)."""
    if interpret:
        w, p, l = (jax.lax.broadcasted_iota(jnp.int32, _PAIR_SHAPE, a) for a in range(3))
        cur = red[buf]
        for e, v in enumerate(vals):
            cur = cur.at[w, l & 3, tl * _NQ + 16 * p + 4 * (l >> 2) + e].set(v)
        red[buf] = cur
        return
    def position(tid, c, arith):     # (0, w, l & 3, 16 p + 4 (l >> 2))
        return (c(0), arith.andi(arith.shrui(tid, c(5)), c(3)), arith.andi(tid, c(3)),
                arith.addi(arith.shli(arith.andi(arith.shrui(tid, c(4)), c(1)), c(4)),
                           arith.shli(arith.andi(arith.shrui(tid, c(2)), c(3)), c(2))))
    _thread_store_global(red.at[pl.ds(buf, 1), :, :, pl.ds(tl * _NQ, _NQ)], vals, position)


def _lane_reduce_scatter(vs, interpret, free=(), stop=1):
    """vs: lw arrays [4, parts, lw] (value e of the thread's channel, e < lw) -> [4, parts, lw]:
    lane l's sum of value l over the lw channels (lanes) of its lane part. A butterfly
    reduce-scatter: at distance d (lw / 2 .. 1) a lane keeps the half of its values whose
    index has bit d equal to its lane's bit d and sends the other half to lane l ^ d (lw - 1
    shuffles, 2 (lw - 1) selects and lw - 1 adds per thread). At the distances in `free` the
    caller has laid lane l's values out so that its register e holds logical value e ^ (l & d)
    there: the lane keeps its lower half and sends the upper one, no select. stop > 1: the
    levels down to distance `stop` only; returns the list of lw / stop arrays left (register
    e: the lane's sum over the lanes that differ from it in bits >= stop)."""
    lw = vs[0].shape[2]
    if len(vs) != lw:
        raise ValueError(f"_lane_reduce_scatter: {len(vs)} values for {lw} lanes")
    lane = jax.lax.broadcasted_iota(jnp.int32, vs[0].shape, 2)
    if not interpret:
        lane = plgpu.layout_cast(lane, plgpu.Layout.WG_STRIDED(vs[0].shape, vec_size=1))
    d = lw // 2
    while d >= stop:
        hi = (lane & d) != 0
        half = len(vs) // 2
        nxt = []
        for e in range(half):
            if d in free:
                keep, send = vs[e], vs[e + half]
            else:
                keep = jnp.where(hi, vs[e + half], vs[e])
                send = jnp.where(hi, vs[e], vs[e + half])
            nxt.append(keep + _shfl_lanes(send, d, interpret))
        vs, d = nxt, d // 2
    return vs[0] if stop == 1 else vs


def _dbc_states_warp(dbc, which, n_k, perm=False):
    """dB (which 0) / dC (1) in state order from the warp-reduced rows (warp_red): column
    16 p + 8 which + k holds state p K + k (perm: column 16 p + 2 k + which)."""
    if perm:
        return dbc.reshape(*dbc.shape[:-1], _NQ // 2, 2)[..., which]
    x = dbc.reshape(*dbc.shape[:-1], 2, 2, _NQ // 4)[..., which, :n_k]
    return x.reshape(*x.shape[:-2], 2 * n_k)


def _bwd_pair_body(*refs, opts, n_state, chunk, n_chunks, length, padded, softplus, ck_every,
                   stages, interpret, bwd_loop, parts=2, rowsum=False, ck_pair=False,
                   keep_b=False, pad_rows=False, ahead=False, direct_out=False,
                   warp_red=False, dbc_add=False, rawp=False, perm=0, red_early=False):
    has_z = "z" in opts
    r, seq_in, seq_out = _bwd_refs(refs, opts, dbc_in=dbc_add, raw=rawp)
    f32 = jnp.float32
    shape = _lane_shape(parts)
    lw = shape[2]
    n_k = n_state // parts
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("j")
    groups = r["bc"].shape[1]
    g_idx = j * 4 * lw * groups // (r["u"].shape[2] * lw)
    tiles = pl.ds(j * 4, 4)
    n_sub = chunk // ck_every
    rows_names = ["u", "dt", "dy", *(["z"] if has_z else [])]

    def fetch(k, slot):      # the k-th chunk of the reverse walk: chunk n_chunks - 1 - k
        c = n_chunks - 1 - k
        rows = pl.ds(c * chunk, chunk)
        bar = r["in_bar"].at[slot]
        plgpu.copy_gmem_to_smem(r["bc"].at[b, g_idx, rows], r["bc_s"].at[slot], bar)
        ck_cols = _ck2_cols(j, 4 * lw, interpret) if ck_pair else tiles
        plgpu.copy_gmem_to_smem(r["ck"].at[b, pl.ds(c * n_sub, n_sub), :, ck_cols],
                                r["ck_s"].at[slot], bar)
        for name in rows_names:
            plgpu.copy_gmem_to_smem(r[name].at[b, rows, in_tiles], r[name + "_s"].at[slot],
                                    bar)

    in_tiles, in_off = tiles, 0
    if pad_rows:    # 5 tiles from tile min(4 j, nt - 5): the program's 4 start at in_off
        start = jnp.minimum(j * 4, r["u"].shape[2] - 5)
        in_tiles, in_off = pl.ds(start, 5), j * 4 - start
    for s in range(min(stages, n_chunks)):
        fetch(s, s)
    # A^T log2(e) as [K, *shape], D and bias as shape, dhT [K, *shape]; rawp: A [Dp, N], D and
    # bias [Dp] as they are (this program's rows), laid out per thread here (_thread_rows)
    own = pl.ds(j * (4 * lw), 4 * lw)
    plgpu.copy_gmem_to_smem(r["a"].at[own] if rawp else r["a"].at[:, j],
                            r["a_raw"] if rawp else r["a_s"], r["bar"].at[0])
    vec_names = [k for k in ("d", "bias") if k in opts]
    for i, k in enumerate(vec_names):
        plgpu.copy_gmem_to_smem(r[k].at[own] if rawp else r[k].at[j],
                                (r["p_raw"] if rawp else r["p_s"]).at[i], r["bar"].at[1 + i])
    plgpu.copy_gmem_to_smem(r["dhT"].at[b, :, j], r["h_s"], r["bar"].at[3])
    plgpu.barrier_wait(r["bar"].at[0])
    if rawp:
        a2 = [a * _LOG2E for a in _thread_rows(r["a_raw"], n_k, shape, n_k, interpret)]
    else:
        a2 = [r["a_s"][k] for k in range(n_k)]
    vec = {}
    for i, k in enumerate(vec_names):
        plgpu.barrier_wait(r["bar"].at[1 + i])
        vec[k] = (_thread_rows(r["p_raw"].at[pl.ds(i, 1)], 1, shape, 0, interpret, flat=True)[0]
                  if rawp else r["p_s"][i])
    plgpu.barrier_wait(r["bar"].at[3])
    dh_init = tuple(r["h_s"][k] for k in range(n_k))
    if perm:    # the thread's state slots permuted (see _perm_xor)
        pm = _perm_xor(interpret, shape, perm)
        a2, dh_init = _perm_slots(a2, pm, perm), tuple(_perm_slots(dh_init, pm, perm))
    zero = _zeros(shape)
    part = _pair_part(interpret, shape)
    part0, part1 = part == 0, part == 1
    shfl = functools.partial(_shfl16, interpret=interpret)

    def pair_rows(ref, t):    # rows t .. t + parts - 1 of a [chunk, 4, lw] tile as (w, p, l)
        if pad_rows:          # input rows of 5 tiles (160 bytes: the parts' rows in other banks)
            return ref.at[pl.ds(t, parts), pl.ds(in_off, 4)].transpose((1, 0, 2))[...].astype(f32)
        return ref.at[pl.ds(t, parts)].transpose((1, 0, 2))[...].astype(f32)

    def store_pair(ref, t, v, name=None, c=None):
        if direct_out and name is not None:    # straight to gmem (_pair_rows_store_global)
            _pair_rows_store_global(r[name], b, c * chunk + t, j, v, interpret)
            return
        ref.at[pl.ds(t, parts)].transpose((1, 0, 2))[...] = v.astype(ref.dtype)

    def ck_state(ck_s, sub, k):     # state p K + k of the thread's channel: [4, parts, lw]
        if perm:                    # slot k: state p K + (k ^ m), the thread's own row
            return _ck_perm_load(ck_s.at[sub], k, ck_pair, interpret, perm)
        if ck_pair:                 # ck2: one conflict-free row per k
            return _ck2_pair_view(ck_s.at[sub, k], interpret)[...]
        return _ck_view(ck_s.at[sub], k, parts, n_k, interpret)[...]

    def red_store(tl, which, k, v):   # rows tl * 32 + which * N + parts k + p
        rows = r["red"].at[pl.ds(tl * _NQ + which * n_state + parts * k, parts), pl.ds(0, 4)]
        rows.transpose((1, 0, 2))[...] = v

    def warp_red_store(sub, tl, wvals):
        """warp_red: the 16 lanes of each lane part sum the dB/dC values of their 16 channels
        by shuffles (_lane_reduce_scatter: lane l gets value l = dB (l < 8) / dC of state
        p K + l % 8); warp w stores its step row [32] (column 16 p + l) into buffer sub % 2
        of `red` [2, 4, ck_every * 32]: one conflict-free store per warp and step. Two
        buffers: the barrier after a sub-chunk's stores also orders the next one's stores
        after this one's sums (no barrier before the stores)."""
        if red_early:   # perm 2: the xor-8 / xor-4 levels, then the 4 partial sums to `red`
            v = _lane_reduce_scatter([x for k in range(n_k) for x in (wvals[0][k], wvals[1][k])],
                                     interpret, free=(8, 4), stop=4)
            _red_early_store(r["red"], jax.lax.rem(sub, 2), tl, v, interpret)
            return
        if perm:    # value 2 k + which: the xor-8 and xor-4 (perm 3: xor-2) levels need no select
            v = _lane_reduce_scatter([x for k in range(n_k) for x in (wvals[0][k], wvals[1][k])],
                                     interpret, free=(8, 4, 2)[:perm])
        else:
            pad = [zero] * (lw // 2 - n_k)
            v = _lane_reduce_scatter([*wvals[0], *pad, *wvals[1], *pad], interpret)
        row = r["red"].at[jax.lax.rem(sub, 2), :, pl.ds(tl * _NQ, _NQ)]
        row[...] = v.reshape(4, _NQ)

    def bc_get(bc_s, t, which):     # perm 3: rows [B | B' | C | C'] (_pair_bc)
        return _pair_bc(bc_s, t, which * n_state * (2 if perm == 3 else 1), n_k, n_k, interpret,
                        shape, perm=perm)

    def pairsum(v):   # v[tt]: this part's sum of step t + tt -> the full sum of step t + p
        return _part_sums(v, part, interpret)

    def step_value(own, oth, tt):   # step t + tt's value from its own part
        if parts == 2:
            return jnp.where(part0 if tt == 0 else part1, own, oth)
        return _shfl(own, interpret, src_part=tt)

    def chunk_body(kc, carry):
        c, slot, s_ = _bwd_chunk_start(r, kc, n_chunks, stages, seq_in + seq_out)
        bc_s = s_["bc"]

        def recompute(sub):
            t0 = sub * ck_every
            h = [ck_state(s_["ck"], sub, kk) for kk in range(n_k)]
            hs, steps, decays, own = [h], [], [], []
            for tp in range(0, ck_every, parts):
                t = t0 + tp
                u_own = pair_rows(s_["u"], t)
                x_own = pair_rows(s_["dt"], t)
                if "bias" in vec:
                    x_own = x_own + vec["bias"]
                dt_own = _softplus(x_own, True) if softplus else x_own
                if padded:
                    dt_own = jnp.where(c * chunk + t + part < length, dt_own, 0.0)
                own.append((u_own, x_own, dt_own))
                if parts == 2:
                    dt_oth, u_oth = shfl(dt_own), shfl(u_own)
                else:
                    dtu_own = dt_own * u_own
                for tt in range(parts):
                    if parts == 2:
                        mine = part0 if tt == 0 else part1
                        dt = jnp.where(mine, dt_own, dt_oth)
                        dtu = dt * jnp.where(mine, u_own, u_oth)
                    else:
                        dt = step_value(dt_own, None, tt)
                        dtu = step_value(dtu_own, None, tt)
                    a_t = [jnp.exp2(dt * a2[kk]) for kk in range(n_k)]
                    b_t = bc_get(bc_s, t + tt, 0)
                    h = [a_t[kk] * h[kk] + dtu * b_t[kk] for kk in range(n_k)]
                    hs.append(h)
                    steps.append((dt, dtu, b_t if keep_b else None))
                    decays.append(a_t)
            return hs, steps, decays, own

        def back(sub, rec, carry, nxt=None):
            """With `nxt`: sub-chunk nxt's recompute (MUFU work, no `red` access) runs after
            the barrier that completes `red`, next to the row sums (shared-memory loads), and
            is returned with the carry."""
            dh, da, dd, dbias = list(carry[0]), list(carry[1]), carry[2], carry[3]
            hs, steps, decays, own = rec
            t0 = sub * ck_every
            if rowsum and not warp_red:  # every thread has read the previous sub-chunk's rows
                plgpu.commit_smem()
            for tp in reversed(range(0, ck_every, parts)):
                t = t0 + tp
                u_own, x_own, dt_own = own[tp // parts]
                dout = pair_rows(s_["dy"], t)
                zz = sz = None
                if has_z:
                    zz = pair_rows(s_["z"], t)
                    sz = _sigmoid(zz)
                    dy_own = dout * zz * sz
                else:
                    dy_own = dout
                dy_oth = shfl(dy_own) if parts == 2 else None
                gbs, saqs, ys = [None] * parts, [None] * parts, [None] * parts
                for tt in reversed(range(parts)):
                    tl = tp + tt
                    dy = step_value(dy_own, dy_oth, tt)
                    dt, dtu, b_kept = steps[tl]
                    h_prev, h_t, a_t = hs[tl], hs[tl + 1], decays[tl]
                    b_t = b_kept or bc_get(bc_s, t + tt, 0)
                    c_t = bc_get(bc_s, t + tt, 1)
                    if has_z:
                        for kk in range(n_k):
                            hc = h_t[kk] * c_t[kk]
                            ys[tt] = hc if ys[tt] is None else ys[tt] + hc
                    gb, saq = None, None
                    wvals = ([], [])    # warp_red: dB, dC values of the thread's channel
                    for kk in range(n_k):
                        g = dh[kk] + c_t[kk] * dy
                        if warp_red:
                            wvals[0].append(g * dtu)
                            wvals[1].append(dy * h_t[kk])
                        else:
                            red_store(tl, 0, kk, g * dtu)
                            red_store(tl, 1, kk, dy * h_t[kk])
                        dh[kk] = a_t[kk] * g     # q = g a h_prev = dh_{t-1} h_prev: one FMUL
                        q = dh[kk] * h_prev[kk]
                        da[kk] = da[kk] + dt * q
                        saq = a2[kk] * q if saq is None else saq + a2[kk] * q
                        gb = g * b_t[kk] if gb is None else gb + g * b_t[kk]
                    if warp_red:
                        warp_red_store(sub, tl, wvals)
                    gbs[tt], saqs[tt] = gb, saq
                # lane part p finishes step t + p
                gb, saq = pairsum(gbs), pairsum(saqs)
                if has_z:
                    y = pairsum(ys)
                    if "d" in vec:
                        y = y + vec["d"] * u_own
                    store_pair(s_["dz"], t, dout * y * sz * (1.0 + zz * (1.0 - sz)), "dz", c)
                du = dt_own * gb
                if "d" in vec:
                    du = du + vec["d"] * dy_own
                    dd = dd + dy_own * u_own
                store_pair(s_["du"], t, du, "du", c)
                ddt = u_own * gb + saq * _LN2
                if softplus:
                    ddt = ddt * _sigmoid(x_own)
                if padded:
                    ddt = jnp.where(c * chunk + t + part < length, ddt, 0.0)
                store_pair(s_["ddt"], t, ddt, "ddt", c)
                dbias = dbias + ddt
            # dB/dC of the sub-chunk: thread i sums row i of `red` over the 64 channels
            plgpu.commit_smem()
            rec_next = recompute(nxt) if nxt is not None else None
            if red_early:   # thread i: column i of the 4 warps' 4 partial sums (16 loads)
                buf = r["red"].at[jax.lax.rem(sub, 2)]
                row = lambda w, q: buf.at[w, q, pl.ds(0, ck_every * _NQ)][...]
                parts4 = [(row(w, 0) + row(w, 1)) + (row(w, 2) + row(w, 3)) for w in range(4)]
                tot = (parts4[0] + parts4[1]) + (parts4[2] + parts4[3])
            elif warp_red:  # thread i: row i of the 4 warps' sums (4 conflict-free loads)
                buf = r["red"].at[jax.lax.rem(sub, 2)]
                tot = (buf[0] + buf[1]) + (buf[2] + buf[3])
            elif rowsum:   # rows 16 lw floats apart share banks: skewed block order
                tot = _row_sums(r["red"], 4 * lw, 32 // (_RED_W * lw % 32), interpret,
                                _n_acc(rowsum))
            else:
                acc = None
                for w in range(4):
                    for m in range(lw // 4):
                        v = plgpu.load(r["red"].at[:, w, pl.ds(4 * m, 4)],
                                       layout=plgpu.Layout.WG_STRIDED((_WG, 4), vec_size=4))
                        acc = v if acc is None else acc + v
                r["red2"][...] = acc
                plgpu.commit_smem()
                tot = r["red2"][:, 0] + r["red2"][:, 1] + (r["red2"][:, 2] + r["red2"][:, 3])
            s_["dbc"][pl.ds(t0, ck_every), :] = tot.reshape(ck_every, _NQ)
            if nxt is not None:
                return (tuple(dh), tuple(da), dd, dbias), rec_next
            return tuple(dh), tuple(da), dd, dbias

        carry = (tuple(carry[0]), tuple(carry[1]), carry[2], carry[3])
        if ahead and n_sub > 1:    # recompute one sub-chunk ahead (within the chunk)
            rec = recompute(n_sub - 1)
            if bwd_loop:
                carry, rec = jax.lax.fori_loop(
                    0, n_sub - 1, lambda m, cr: back(n_sub - 1 - m, cr[1], cr[0],
                                                     n_sub - 2 - m), (carry, rec))
            else:
                for sub in reversed(range(1, n_sub)):
                    carry, rec = back(sub, rec, carry, sub - 1)
            carry = back(0, rec, carry)
        elif bwd_loop:
            carry = jax.lax.fori_loop(
                0, n_sub, lambda m, cr: back(n_sub - 1 - m, recompute(n_sub - 1 - m), cr),
                carry)
        else:
            for sub in reversed(range(n_sub)):
                carry = back(sub, recompute(sub), carry)
        plgpu.commit_smem()
        rows = pl.ds(c * chunk, chunk)
        for name in seq_out:
            if direct_out and name != "dbc":
                continue
            if name == "dbc" and dbc_add and not interpret:
                # the program's rows added into its group's [Lp, 32] rows (TMA reduce-add in
                # L2: the sum over the group's programs in the kernel, in arrival order)
                plgpu.copy_smem_to_gmem(s_[name], r["dbc"].at[b, g_idx, rows],
                                        commit_group=False, reduction_op="add")
                continue
            # (interpret mode has no TMA reduction: dbc_add keeps a slot per program there)
            dst = (r["dbc"].at[b, j, rows] if name == "dbc" else r[name].at[b, rows, tiles])
            plgpu.copy_smem_to_gmem(s_[name], dst, commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(kc + stages < n_chunks)
        def _():
            fetch(kc + stages, slot)
        return carry

    init = (dh_init, tuple(zero for _ in range(n_k)), zero, zero)
    dh, da, dd, dbias = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
    if perm:    # back to state order
        dh, da = _perm_slots(dh, pm, perm), _perm_slots(da, pm, perm)
    for kk in range(n_k):
        r["h_s"][kk] = dh[kk]
        r["a_s"][kk] = da[kk]
    # dD and d bias: each part summed its own steps
    outs_vec = [(k, _part_total(v, interpret)) for k, v in (("dd", dd), ("dbias", dbias))
                if k in r]
    for i, (_, v) in enumerate(outs_vec):
        r["p_s"][i] = v
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r["h_s"], r["dh0"].at[b, :, j])
    plgpu.copy_smem_to_gmem(r["a_s"], r["da"].at[b, :, j])
    for i, (k, _) in enumerate(outs_vec):
        plgpu.copy_smem_to_gmem(r["p_s"].at[i], r[k].at[b, j])
    plgpu.wait_smem_to_gmem(0)


def backward_pair(res, y_bar, final_bar, *, softplus, chunk=16, ck_every=4, stages=2,
                  bwd_loop=True, parts=2, rowsum=False, ck_pair=False, keep_b=False,
                  pad_rows=False, ahead=False, direct_out=False, warp_red=False,
                  dbc_add=False, rawp=False, perm=0, red_early=False, interpret=False):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0) with two (`parts` 4: four)
    lanes per channel (see above), from the one-thread checkpoint layout [B, Lp / ck_every, N,
    Dp] (the pair training forward's, or the one-thread forward's [.., N, 1, Dp]). N a
    multiple of parts, 2 N <= 32, ck_every 4; grouped B/C need Dn / G % (128 / parts) == 0.
    bwd_loop: a chunk's sub-chunks as a loop. ck_pair (parts 2): the checkpoints in the pair
    layout ck2 of forward_pair(ck_pair=True), [B, Lp / ck_every, K, Dp, 2]. keep_b: the
    recompute's B_t values stay in registers for the reverse steps (4 K more registers, a
    third fewer B/C loads). pad_rows (parts 2, Dp >= 80): the u / delta / dy (z) tiles by TMA
    as 5 tiles of 16 channels (the program's 4 and a neighbour's), so that a step pair's two
    rows are 160 bytes apart: the two lane parts read different banks (128 bytes apart: the
    same banks, a 2-way conflict per load). ahead: each sub-chunk's recompute runs in the
    previous one's dB/dC row-sum phase (between its two barriers; within a chunk).
    direct_out (parts 2): du, ddelta (dz) stored straight from registers
    (_pair_rows_store_global) instead of through shared-memory tiles and TMA. warp_red
    (parts 2): dB/dC summed over each half-warp's 16 channels by shuffles before shared memory
    (one [32] row per warp and step, `red` double-buffered: one barrier per sub-chunk; 2 KB
    per buffer instead of 40 KB, so the chunk can stay 16 steps); rowsum is then unused.
    dbc_add: each program's dB/dC rows added by TMA reduce-add into one [B, G, Lp, 32] f32
    accumulator (zeroed here, passed as a ref), instead of [B, Dp / 64, Lp, 32] block rows
    summed by XLA after the kernel: the f32 sum over a group's programs then runs in arrival
    order, so dB / dC may differ run to run by f32 rounding (not bitwise deterministic; dA,
    dD, d bias are unchanged). Interpret mode keeps a slot per program (no TMA reduction).
    rawp (parts 2, N % 4 == 0): A, D and bias as they are ([Dp, N], [Dp]), laid out per
    thread by the kernel (no XLA layout kernels; as the pair forwards' rawp).
    perm (with warp_red, N 16): each thread's state slots permuted by its lane
    bits 2-3 (_perm_xor) so that two of the four butterfly levels of the dB/dC sums need no
    selects (6 instead of 30 per step and thread); B / C by 8-byte loads at permuted columns.
    perm 3: lane bits 1-3, three select-free levels (2 selects per step and thread), B / C
    rows [B | B' | C | C'] with the pair-swapped copies (the odd-m lanes' 8-byte loads). red_early
    (perm 2): the butterfly stops after its two select-free levels; each lane's 4 partial sums
    go to `red` ([2, 4, 4, ck_every * 32]: 16 KB) and the sub-chunk's sum phase adds 16
    values per thread instead of 4 (no xor-2 / xor-1 levels: 3 shuffles, 3 adds, 6 selects
    fewer per step and thread)."""
    u, delta, A, B, C, D, z, delta_bias, h0, ck = res
    ck_pair = ck_pair and parts == 2
    warp_red = warp_red and parts == 2
    if ck.ndim == 5 and not ck_pair:
        ck = ck[:, :, :, 0]
    f32 = jnp.float32
    bsz, length, dn = u.shape
    n = A.shape[1]
    grouped = B.ndim == 4
    B3, C3 = (B, C) if grouped else (B[:, :, None], C[:, :, None])
    groups = B3.shape[2]
    if parts not in (2, 4) or not (pair_supported(dn, groups, n, parts)
                                   and bwd_supported(n, ck_every)):
        raise ValueError(f"selective_scan_mgpu.backward_pair: N={n}, Dn={dn}, G={groups}, "
                         f"parts={parts}")
    shape = _lane_shape(parts)
    lw = shape[2]
    width = 4 * lw
    n_k = n // parts
    dp = _common.round_up(dn, width)
    nb = dp // width
    bcw = _common.round_up(2 * n, 4)
    pad_rows = pad_rows and parts == 2 and dp // lw >= 5
    rawp = rawp and parts == 2 and n % 4 == 0
    perm = (3 if perm == 3 else 2 if perm else 0) if warp_red and n_k == _NQ // 4 else 0
    red_early = red_early and perm == 2
    in_tiles = 5 if pad_rows else 4
    # shared memory (`parts` programs per SM): per slot the chunk's tiles in and out, B/C,
    # checkpoints, dB/dC rows; `red`, `red2` and the parameters. Halve the chunk until it fits.
    itemsizes = [u.dtype.itemsize, delta.dtype.itemsize, u.dtype.itemsize, u.dtype.itemsize,
                 delta.dtype.itemsize] + ([2 * z.dtype.itemsize] if z is not None else [])
    red_shape = ((2, 4, 4, ck_every * _NQ + 8) if red_early else (2, 4, ck_every * _NQ) if warp_red
                 else (ck_every * _NQ, _RED_W, lw))
    fixed = (math.prod(red_shape) * 4 + _WG * 16 + (2 * n_k + 2) * _WG * 4 + 1024
             + ((n + 2) * width * 4 if rawp else 0))
    per_step = (width * sum(itemsizes) + bcw * 4 * (2 if perm == 3 else 1)
                + n * width * 4 // ck_every + _NQ * 4
                + (in_tiles - 4) * lw * sum(itemsizes[:3] + itemsizes[5:6]))
    while chunk > ck_every and fixed + stages * chunk * per_step > _SMEM_BYTES // parts:
        chunk //= 2
    lp = _common.round_up(length, chunk)
    n_chunks = lp // chunk
    stages = min(stages, n_chunks)
    tiled = lambda x: _common.pad_axis(_common.pad_axis(x, 1, chunk), 2, width).reshape(
        bsz, lp, dp // lw, lw)
    both = lambda x: jnp.broadcast_to(x.reshape(*x.shape[:-1], nb, 4, 1, lw),
                                      (*x.shape[:-1], nb, *shape))
    parted = lambda x: jnp.moveaxis(x.reshape(*x.shape[:-2], parts, n_k, nb, 4, lw), -5, -2)
    vec = lambda x: both(_common.pad_axis(x.astype(f32), 0, width))
    swapped = lambda x: x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    bc = jnp.concatenate([B3.astype(f32), C3.astype(f32)] if perm != 3 else
                         # + each row's pair-swapped copy (column N + c holds column c ^ 1)
                         [B3.astype(f32), swapped(B3.astype(f32)), C3.astype(f32),
                          swapped(C3.astype(f32))], -1)
    bc = jnp.swapaxes(_common.pad_axis(_common.pad_axis(bc, 1, chunk), 3, 4), 1, 2)
    if rawp:    # [Dp, N], [Dp]: the kernel's rows as they are
        a2 = _common.pad_axis(A.astype(f32), 0, width)
        vec = lambda x: _common.pad_axis(x.astype(f32), 0, width)
    else:
        a2 = parted(_common.pad_axis(A.astype(f32).T * _LOG2E, 1, width))
    given = optional_inputs(z, D, delta_bias, None, seq=tiled, vec=vec, state=None)
    opts = [name for name, _ in given]
    if ck.shape[1] < lp // ck_every:
        # the forward padded L to a shorter chunk than this backward's: the steps past L are
        # masked here (their dy is zero), so zero checkpoints there recompute finite states
        ck = jnp.pad(ck, [(0, 0), (0, lp // ck_every - ck.shape[1])] + [(0, 0)] * (ck.ndim - 2))
    ck = ck[:, :lp // ck_every]
    if ck_pair:
        if ck.shape[2] != n_k or ck.ndim != 5:
            raise ValueError(f"backward_pair: checkpoints {ck.shape} not in the ck2 layout")
        ck = ck.reshape(_ck2_shape(ck.shape, interpret))
    else:
        ck = ck.reshape(*ck.shape[:3], ck.shape[3] // lw, lw)  # [B, Lp / 4, N, Dp' / lw, lw]
    arrays = [tiled(u), tiled(delta), a2, bc, *[x for _, x in given], ck,
              tiled(y_bar.astype(u.dtype)),
              parted(_common.pad_axis(jnp.swapaxes(final_bar.astype(f32), 1, 2), 2, width))]
    tile_out = lambda dtype: jax.ShapeDtypeStruct((bsz, lp, dp // lw, lw), dtype)
    per_thread = jax.ShapeDtypeStruct((bsz, n_k, nb, *shape), f32)
    dbc_rows = jax.ShapeDtypeStruct((bsz, nb, lp, _NQ), f32)
    if dbc_add:     # the accumulator: an input ref (a slot per program in interpret mode)
        dbc_acc = jax.new_ref(jnp.zeros((bsz, nb if interpret else groups, lp, _NQ), f32))
        arrays.append(dbc_acc)
    out_shape = [tile_out(u.dtype), tile_out(delta.dtype),
                 *([tile_out(z.dtype)] if z is not None else []),
                 *([] if dbc_add else [dbc_rows]), per_thread]
    out_shape += [jax.ShapeDtypeStruct((bsz, nb, *shape), f32) for x in (D, delta_bias)
                  if x is not None]
    out_shape.append(per_thread)
    tile = lambda dtype, w=4: plgpu.SMEM((stages, chunk, w, lw), dtype)
    seq_bufs = [tile(u.dtype, in_tiles), tile(delta.dtype, in_tiles), tile(u.dtype, in_tiles),
                plgpu.SMEM((stages, chunk, bc.shape[-1]), f32),
                plgpu.SMEM((stages, chunk // ck_every,
                            *(((n_k, 4, 16, 2) if interpret else (n_k, 128)) if ck_pair
                              else (n, 4, lw))), f32)]
    if z is not None:
        seq_bufs.append(tile(z.dtype, in_tiles))
    seq_bufs += [tile(u.dtype), tile(delta.dtype)]
    if z is not None:
        seq_bufs.append(tile(z.dtype))
    seq_bufs.append(plgpu.SMEM((stages, chunk, _NQ), f32))
    n_in = 5 + (z is not None)
    scratch = [plgpu.SMEM((n_k, *shape), f32), plgpu.SMEM((2, *shape), f32),
               plgpu.SMEM((n_k, *shape), f32), plgpu.Barrier(num_barriers=4),
               plgpu.SMEM(red_shape, f32), plgpu.SMEM((_WG, 4), f32),
               *seq_bufs, plgpu.Barrier(num_arrivals=n_in, num_barriers=stages),
               *([plgpu.SMEM((width, n), f32), plgpu.SMEM((2, width), f32)] if rawp else [])]
    body = functools.partial(
        _bwd_pair_body, opts=tuple(opts), n_state=n, chunk=chunk, n_chunks=n_chunks,
        length=length, padded=lp != length, softplus=softplus, ck_every=ck_every,
        stages=stages, interpret=interpret, bwd_loop=bwd_loop and chunk > ck_every,
        parts=parts, rowsum=rowsum, ck_pair=ck_pair, keep_b=keep_b, pad_rows=pad_rows,
        ahead=ahead, direct_out=direct_out and parts == 2, **({"warp_red": True} if warp_red
                                                              else {}),
        **({"dbc_add": True} if dbc_add else {}), **({"rawp": True} if rawp else {}),
        **({"perm": perm} if perm else {}), **({"red_early": True} if red_early else {}))
    outs = list(plgpu.kernel(
        body, out_type=out_shape, grid=(bsz, nb), grid_names=("b", "j"), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            unsafe_no_auto_barriers=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=("selective_scan_bwd_mgpu_pair" + ("4" if parts == 4 else "")
                     + ("_dba" if dbc_add else "") + ("_raw" if rawp else "")
                     + (f"_perm{perm}" if perm else "") + ("_re" if red_early else "")))(*arrays))
    crop = lambda x: x.reshape(bsz, lp, dp)[:, :length, :dn]
    du, ddelta = crop(outs.pop(0)), crop(outs.pop(0))
    dz = crop(outs.pop(0)) if z is not None else None
    if dbc_add and not interpret:   # [B, G, Lp, NQ], summed by the kernel
        dbc = jnp.moveaxis(dbc_acc[...][:, :, :length], 1, 2)          # [B, L, G, NQ]
    else:
        dbc = (dbc_acc[...] if dbc_add else outs.pop(0))[:, :, :length].reshape(
            bsz, groups, nb // groups, length, _NQ)
        dbc = jnp.moveaxis(dbc.sum(2), 1, 2)                 # [B, L, G, NQ]
    if warp_red:
        db, dc = _dbc_states_warp(dbc, 0, n_k, perm), _dbc_states_warp(dbc, 1, n_k, perm)
    else:
        db, dc = _dbc_states(dbc, 0, parts, n_k), _dbc_states(dbc, n, parts, n_k)
    if not grouped:
        db, dc = db[:, :, 0], dc[:, :, 0]
    # [B, K, nb, 4, parts, lw] -> [B, N, Dp]: state p K + k, channel width j + lw w + l
    unpart = lambda x: jnp.moveaxis(x, -2, 1).reshape(bsz, n, dp)
    da = jnp.swapaxes(unpart(outs.pop(0)).sum(0)[:, :dn], 0, 1).astype(A.dtype)
    per_channel = lambda x: x[..., 0, :].reshape(bsz, dp).sum(0)[:dn]
    dd = per_channel(outs.pop(0)).astype(D.dtype) if D is not None else None
    dbias = per_channel(outs.pop(0)).astype(delta_bias.dtype) if delta_bias is not None else None
    dh0 = unpart(outs.pop(0))
    dh0 = jnp.swapaxes(dh0[:, :, :dn], 1, 2).astype(h0.dtype) if h0 is not None else None
    return (du, ddelta, da, db.astype(B.dtype), dc.astype(C.dtype), dd, dz, dbias, dh0)

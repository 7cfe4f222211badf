"""ProbSparse attention's sparsity measure (Zhou et al. 2021, Informer) as a Pallas kernel.

    M[b, h, i] = max_s q[b, i, h] . k[b, idx_s, h]  -  sum_s q[b, i, h] . k[b, idx_s, h] / L_K

over the sampled keys `idx` of query i (the authors' measure: unscaled scores, the sampled sum
divided by L_K). `idx` is either one sample [S] shared by every query (`sampling: shared`) or one
sample per query [Lq, S] (`sampling: per_query`, the authors' code); both are shared by batch and
heads, as the code's single torch.randint per call. With `causal_samples` (shared only) key idx_s
counts for query i only when idx_s <= i; a query with no valid key gets M = 0.

Shapes: q [B, Lq, H, D], k [B, Lk, H, D] (the mixers' layout: no transposes), M [B, H, Lq] f32.
M only chooses which queries are active (an integer choice), so it takes no gradient: the inputs
go through stop_gradient and there is no backward kernel.

Kernel: one program per (query block, batch, head); the query block is read once, with masked
loads past Lq (no padded copy of q).
  shared     the S sampled keys of (b, h) ([S_pad, D], gathered by XLA: S x D per head) form
             one tensor-core dot [block_q, D] x [D, S_pad]; padding columns are masked;
  per_query  a loop over the S samples gathers the rows k[idx[i, s]] of the block's queries
             straight from K (row gathers that hit L1/L2: K of one head is Lk x D) and keeps a
             running max and sum: the [B, H, Lq, S, D] gathered keys of the jnp form are never
             written (they are most of that form's time on a GPU, docs/informer.md).
The other ProbSparse steps (top-u, the u full rows through `flash_attention`, the lazy fill)
are in mixers/probsparse.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def sparsity_reference(q, k, idx, *, causal_samples: bool = False):
    """M [B, H, Lq] (f32) of q [B, Lq, H, D] over the keys idx ([S] or [Lq, S]) of k."""
    l_q, l_k = q.shape[1], k.shape[1]
    if idx.ndim == 1:
        qk = jnp.einsum("blhd,bshd->bhls", q, k[:, idx], preferred_element_type=jnp.float32)
        valid = idx[None, :] <= jnp.arange(l_q)[:, None] if causal_samples else None
    else:
        qk = jnp.einsum("blhd,blshd->bhls", q, k[:, idx], preferred_element_type=jnp.float32)
        valid = None
    return measure_from_scores(qk, valid, l_k)


def measure_from_scores(qk_BHLS, valid_LS, l_k: int):
    """M = max - sum / L_K over the (valid) sampled scores [..., Lq, S] (the authors' divisor)."""
    if valid_LS is None:
        return qk_BHLS.max(-1) - qk_BHLS.sum(-1) / l_k
    neg = jnp.finfo(qk_BHLS.dtype).min
    m = jnp.where(valid_LS, qk_BHLS, neg).max(-1) - jnp.where(valid_LS, qk_BHLS, 0).sum(-1) / l_k
    return jnp.where(valid_LS.any(-1), m, 0.0)


def top_u_reference(m_BHL, u: int):
    """The u largest entries' positions [B, H, u] in increasing position order (ties: the lower
    positions first, as lax.top_k)."""
    return jnp.sort(lax.top_k(m_BHL, u)[1], axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Forward kernels (no backward: M takes no gradient)
# --------------------------------------------------------------------------------------------
def _load_rows(ref, r0, block: int, n_rows: int):
    """Rows r0 .. r0 + block of a [n_rows, D] ref, zeros past n_rows (masked load)."""
    rows = r0 + jnp.arange(block)
    return plgpu.load(ref.at[pl.ds(r0, block), :], mask=(rows < n_rows)[:, None], other=0.0)


def _store_rows(ref, r0, block: int, n_rows: int, x):
    """ref[r0 : r0 + block] = x, rows past n_rows dropped (masked store)."""
    rows = r0 + jnp.arange(block)
    mask = rows < n_rows
    plgpu.store(ref.at[pl.ds(r0, block)], x, mask=mask if x.ndim == 1 else mask[:, None])


def _shared_kernel(q_ref, ks_ref, sidx_ref, m_ref, *, block_q: int, l_q: int, l_k: int,
                   n_sample: int, causal_samples: bool):
    i0 = pl.program_id(0) * block_q
    q_BqD = _load_rows(q_ref, i0, block_q, l_q)
    s = lax.dot_general(q_BqD, ks_ref[...], (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)            # [block_q, S_pad]
    col = jnp.arange(s.shape[1])
    valid = jnp.broadcast_to((col < n_sample)[None, :], s.shape)
    if causal_samples:
        valid &= sidx_ref[...][None, :] <= (i0 + jnp.arange(block_q))[:, None]
    neg = jnp.finfo(jnp.float32).min
    m = (jnp.max(jnp.where(valid, s, neg), axis=1)
         - jnp.sum(jnp.where(valid, s, 0.0), axis=1) / l_k)
    if causal_samples:
        m = jnp.where(jnp.max(valid.astype(jnp.int32), axis=1) > 0, m, 0.0)
    _store_rows(m_ref, i0, block_q, l_q, m)


def _per_query_kernel(q_ref, k_ref, idx_ref, m_ref, *, block_q: int, l_q: int, l_k: int,
                      n_sample: int, unroll: int, blocks: int):
    """`blocks` query blocks per program, one after the other: the K rows of one head are then
    gathered by fewer programs (more L1 reuse)."""
    first = pl.program_id(0) * blocks            # (read outside the loop: interpret mode)

    def one_block(j, _):
        i0 = (first + j) * block_q
        q_BqD = _load_rows(q_ref, i0, block_q, l_q).astype(jnp.float32)
        cols = pl.ds(j * block_q, block_q)

        def step(s, carry):
            mx, total = carry
            k_BqD = k_ref[idx_ref[s, cols], :].astype(jnp.float32)     # row gather from K
            score = jnp.sum(q_BqD * k_BqD, axis=1)
            return jnp.maximum(mx, score), total + score

        def body(t, carry):             # `unroll` independent gathers in flight per iteration
            for r in range(unroll):
                carry = step(t * unroll + r, carry)
            return carry

        carry = (jnp.full((block_q,), -jnp.inf, jnp.float32),
                 jnp.zeros((block_q,), jnp.float32))
        carry = lax.fori_loop(0, n_sample // unroll, body, carry)
        for s in range(n_sample - n_sample % unroll, n_sample):
            carry = step(s, carry)
        mx, total = carry
        _store_rows(m_ref, i0, block_q, l_q, mx - total / l_k)
        return 0

    if blocks == 1:
        one_block(0, 0)
    else:
        lax.fori_loop(0, blocks, one_block, 0)


def _top_u_kernel(m_ref, o_ref, *, length: int, l_pad: int, u: int):
    """Top-u of one row without sorting: the u-th largest value by a 32-step bitwise search on
    the float's order-preserving int32 key, then the positions above it (and the first ones
    equal to it) compacted in position order by a cumsum; `o_ref` gets all positions, the u
    active ones first."""
    pos = jnp.arange(l_pad)
    x = plgpu.load(m_ref.at[pl.ds(0, l_pad)], mask=pos < length, other=-jnp.inf)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)      # signed int order = float order
    key = jnp.where(pos < length, key, _INT_MIN)
    t = jnp.int32(0)                    # the threshold's bits with the sign bit flipped
    for bit in range(31, -1, -1):       # largest t with count(key >= t) >= u, bit by bit
        cand = t | jnp.int32(-(2 ** 31) if bit == 31 else 1 << bit)
        count = jnp.sum((key >= (cand ^ _INT_MIN)).astype(jnp.int32))
        t = jnp.where(count >= u, cand, t)
    thr = t ^ _INT_MIN
    above = key > thr
    need = u - jnp.sum(above.astype(jnp.int32))
    tied = (key == thr) & (pos < length)
    active = above | (tied & (jnp.cumsum(tied.astype(jnp.int32)) <= need))
    n_active = jnp.cumsum(active.astype(jnp.int32))             # inclusive
    # A full permutation (active positions first, the rest after), so no two lanes collide.
    o_ref[jnp.where(active, n_active - 1, u + pos - n_active)] = pos


_INT_MIN = -(2 ** 31)


LOG2E = 1.4426950408889634
MASK_VALUE = -1e30


def _dot_t(a, b):
    """a^T @ b of two 2-D tiles (contracting their first dims), f32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a @ b^T of two 2-D tiles, f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _lazy_rows(top_U, real_U, r0, block: int, n_rows: int):
    """Mask of the rows r0 .. r0 + block that exist and are not among the active rows."""
    rows = r0 + jnp.arange(block)
    hit = (rows[:, None] == top_U[None, :]) & real_U[None, :]
    return (jnp.max(hit.astype(jnp.int32), axis=1) == 0) & (rows < n_rows)


def _rows_fwd_kernel(top_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, u: int, l_q: int,
                     l_k: int, block_k: int, scale: float):
    """One (batch, head): gather the u active query rows, attend over all keys (online softmax
    in base 2, as flash) while summing V, then write mean(V) into the lazy rows and the
    attention rows into theirs. top_ref: u active rows, then distinct other rows (padding)."""
    top = top_ref[...]                                      # [U_pad]
    u_pad = top.shape[0]
    real = jnp.arange(u_pad) < u
    q_UD = q_ref[top, :]                                    # row gather

    def body(j, carry):
        acc, m, l, v_sum = carry
        k0 = j * block_k
        in_k = k0 + jnp.arange(block_k) < l_k
        s = _dot_nt(q_UD, _load_rows(k_ref, k0, block_k, l_k)) * scale
        s = jnp.where(in_k[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v_blk = _load_rows(v_ref, k0, block_k, l_k)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(v_blk.dtype), v_blk, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        v_sum = v_sum + jnp.sum(v_blk.astype(jnp.float32), axis=0)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1), v_sum

    d = q_UD.shape[1]
    carry = (jnp.zeros((u_pad, d), jnp.float32), jnp.full((u_pad,), MASK_VALUE, jnp.float32),
             jnp.zeros((u_pad,), jnp.float32), jnp.zeros((d,), jnp.float32))
    acc, m, l, v_sum = lax.fori_loop(0, pl.cdiv(l_k, block_k), body, carry)
    fill = jnp.broadcast_to((v_sum / l_k)[None, :], (block_k, d)).astype(o_ref.dtype)

    def write_fill(j, _):
        r0 = j * block_k
        lazy = _lazy_rows(top, real, r0, block_k, l_q)
        plgpu.store(o_ref.at[pl.ds(r0, block_k), :], fill, mask=lazy[:, None])
        return 0

    lax.fori_loop(0, pl.cdiv(l_q, block_k), write_fill, 0)
    cols = jnp.arange(d)[None, :]
    plgpu.store(o_ref.at[top[:, None], cols], (acc / l[:, None]).astype(o_ref.dtype),
                mask=real[:, None])
    lse_ref[...] = m + jnp.log2(l)


def _rows_bwd_kernel(top_ref, q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dq_ref, dk_ref,
                     dv_ref, *, u: int, l_q: int, l_k: int, block_k: int, scale: float,
                     sm_scale: float):
    """dq (zeros on the lazy rows), dk and dv (every key row: all u queries of the head are in
    this program, so no atomics) of one (batch, head); dv also gets d mean(V) = the lazy rows'
    dout summed over L_K."""
    top = top_ref[...]
    u_pad = top.shape[0]
    real = jnp.arange(u_pad) < u
    q_UD = q_ref[top, :]
    d = q_UD.shape[1]
    do_UD = jnp.where(real[:, None], do_ref[top, :], 0).astype(q_UD.dtype)   # padding: none
    delta = jnp.sum(do_UD.astype(jnp.float32) * o_ref[top, :].astype(jnp.float32), axis=1)
    lse = lse_ref[...]
    zeros = jnp.zeros((block_k, d), dq_ref.dtype)

    def lazy_pass(j, dlazy):            # sum of the lazy rows' dout; zeros into their dq
        r0 = j * block_k
        lazy = _lazy_rows(top, real, r0, block_k, l_q)[:, None]
        rows = pl.ds(r0, block_k)
        do_blk = plgpu.load(do_ref.at[rows, :], mask=lazy, other=0.0)
        plgpu.store(dq_ref.at[rows, :], zeros, mask=lazy)
        return dlazy + jnp.sum(do_blk.astype(jnp.float32), axis=0)

    dlazy = lax.fori_loop(0, pl.cdiv(l_q, block_k), lazy_pass,
                          jnp.zeros((d,), jnp.float32)) / l_k

    def body(j, dq):
        k0 = j * block_k
        rows = pl.ds(k0, block_k)
        in_k = (k0 + jnp.arange(block_k) < l_k)[:, None]
        k_blk = _load_rows(k_ref, k0, block_k, l_k)
        v_blk = _load_rows(v_ref, k0, block_k, l_k)
        pt = jnp.exp2(_dot_nt(k_blk, q_UD) * scale - lse[None, :])       # [bk, U_pad]
        pt = jnp.where(in_k, pt, 0.0)
        dv = lax.dot_general(pt.astype(do_UD.dtype), do_UD, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        dst = pt * (_dot_nt(v_blk, do_UD) - delta[None, :])
        ds_lo = dst.astype(q_UD.dtype)
        dk = lax.dot_general(ds_lo, q_UD, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32) * sm_scale
        plgpu.store(dk_ref.at[rows, :], dk.astype(dk_ref.dtype), mask=in_k)
        plgpu.store(dv_ref.at[rows, :], (dv + dlazy[None, :]).astype(dv_ref.dtype), mask=in_k)
        return dq + _dot_t(ds_lo, k_blk)

    dq = lax.fori_loop(0, pl.cdiv(l_k, block_k), body, jnp.zeros(q_UD.shape, jnp.float32))
    plgpu.store(dq_ref.at[top[:, None], jnp.arange(d)[None, :]],
                (dq * sm_scale).astype(dq_ref.dtype), mask=real[:, None])


def _measure_pallas(q, k, idx, *, causal_samples: bool, block_q: int, num_warps: int,
                    num_stages: int, unroll: int, blocks: int, interpret: bool):
    b, l_q, h, d = q.shape
    l_k = k.shape[1]
    n_sample = idx.shape[-1]
    d_pad = max(16, pl.next_power_of_2(d))                  # Triton tiles: powers of 2
    if d_pad != d:
        q, k = (_common.pad_axis(x, 3, d_pad) for x in (q, k))
    block_q = min(block_q, max(16, pl.next_power_of_2(l_q)))
    if idx.ndim == 1:
        blocks = 1
    blocks = max(1, min(blocks, pl.cdiv(l_q, block_q)))
    rows = block_q * blocks                                 # query rows per program
    n_prog = pl.cdiv(l_q, rows)
    grid = (n_prog, b, h)                                   # query blocks of one head adjacent
    q_spec = pl.BlockSpec((None, l_q, None, d_pad), lambda i, b_, h_: (b_, 0, h_, 0))
    m_spec = pl.BlockSpec((None, None, l_q), lambda i, b_, h_: (b_, h_, 0))   # masked stores
    common = dict(block_q=block_q, l_q=l_q, l_k=l_k, n_sample=n_sample)
    if idx.ndim == 1:
        s_pad = max(16, pl.next_power_of_2(n_sample))
        sidx = _common.pad_axis(idx.astype(jnp.int32), 0, s_pad, l_k)   # l_k: masked column
        ks = k[:, jnp.minimum(sidx, l_k - 1)]                 # [B, S_pad, H, D]: S x D per head
        kernel = functools.partial(_shared_kernel, causal_samples=causal_samples, **common)
        in_specs = [q_spec, pl.BlockSpec((None, s_pad, None, d_pad),
                                         lambda i, b_, h_: (b_, 0, h_, 0)),
                    pl.BlockSpec((s_pad,), lambda i, b_, h_: (0,))]
        args = (q, ks, sidx)
    else:
        idx_SL = _common.pad_axis(idx.astype(jnp.int32).T, 1, rows)       # [S, Lq_pad]
        kernel = functools.partial(_per_query_kernel, unroll=max(1, min(unroll, n_sample)),
                                   blocks=blocks, **common)
        in_specs = [q_spec, pl.BlockSpec((None, l_k, None, d_pad),
                                         lambda i, b_, h_: (b_, 0, h_, 0)),
                    pl.BlockSpec((n_sample, rows), lambda i, b_, h_: (0, i))]
        args = (q, k, idx_SL)
    m = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=m_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, l_q), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="probsparse_measure",
    )(*args)
    return m


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def sparsity_measure(q, k, idx, *, causal_samples: bool = False, backend: str | None = None,
                     block_q: int | None = None, num_warps: int = 4, num_stages: int = 2,
                     unroll: int = 5, blocks: int = 1):
    """ProbSparse's M [B, H, Lq] (f32, no gradient) of q [B, Lq, H, D] over the sampled keys of
    k [B, Lk, H, D]: `idx` [S] (shared sample) or [Lq, S] (a sample per query), int in [0, Lk).
    Tuning: `block_q` queries per step, `num_warps`, `num_stages`; per_query only: `unroll` (row
    gathers issued per loop iteration) and `blocks` (query blocks per program).
    """
    _common.check_rank("q", q, 4, "[batch, Lq, heads, head_dim]")
    _common.check_rank("k", k, 4, "[batch, Lk, heads, head_dim]")
    for name, x in (("q", q), ("k", k)):
        _common.check_float(name, x)
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape [{q.shape[0]}, Lk, {q.shape[2]}, {q.shape[3]}] to "
                         f"match q {q.shape}, got {k.shape}")
    if idx.ndim not in (1, 2) or (idx.ndim == 2 and idx.shape[0] != q.shape[1]):
        raise ValueError(f"idx must have shape [S] or [{q.shape[1]}, S], got {idx.shape}")
    if causal_samples and idx.ndim != 1:
        raise ValueError("causal_samples applies to a shared sample idx [S] only")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    backend = _common.resolve_backend(backend)
    if backend == "reference" or (backend == "pallas" and _common.platform() == "tpu"):
        return sparsity_reference(q, k, idx, causal_samples=causal_samples)
    if backend == "tpu_interpret":
        raise ValueError("sparsity_measure has no Mosaic TPU kernel: use backend='interpret'")
    if block_q is None:
        block_q = 64 if idx.ndim == 1 else 32
    return _measure_pallas(q, k, idx, causal_samples=causal_samples, block_q=block_q,
                           num_warps=num_warps, num_stages=num_stages, unroll=unroll,
                           blocks=blocks, interpret=backend == "interpret")


def top_u(m_BHL, u: int, *, backend: str | None = None, permutation: bool = False):
    """Positions [B, H, u] (int32, increasing) of the u largest entries of each row of m [B, H, L]
    (f32, no NaN); ties go to the lower positions, so the set is lax.top_k's. With
    `permutation` (Pallas backends): [B, H, max(16, next_pow2(L))], the u positions followed by
    all the others (then the padding positions >= L), each in increasing order."""
    _common.check_rank("m", m_BHL, 3, "[batch, heads, length]")
    b, h, length = m_BHL.shape
    if not 1 <= u <= length:
        raise ValueError(f"u must be in [1, {length}], got {u}")
    backend = _common.resolve_backend(backend)
    if backend == "reference" or (backend == "pallas" and _common.platform() == "tpu"):
        return top_u_reference(m_BHL, u)
    if backend == "tpu_interpret":
        raise ValueError("top_u has no Mosaic TPU kernel: use backend='interpret'")
    l_pad = max(16, pl.next_power_of_2(length))
    out = pl.pallas_call(
        functools.partial(_top_u_kernel, length=length, l_pad=l_pad, u=u),
        grid=(b, h),
        in_specs=[pl.BlockSpec((None, None, length), lambda b_, h_: (b_, h_, 0))],
        out_specs=pl.BlockSpec((None, None, l_pad), lambda b_, h_: (b_, h_, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, l_pad), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=backend == "interpret", name="probsparse_top_u",
    )(m_BHL.astype(jnp.float32))
    return out if permutation else out[..., :u]


# --------------------------------------------------------------------------------------------
# The active rows: lazy fill + u full rows in one kernel each way (bidirectional)
# --------------------------------------------------------------------------------------------
def active_rows_reference(q, k, v, top_BHU, *, sm_scale: float):
    """mean(V) for every query, full softmax attention for the rows top [B, H, U]."""
    b, l_q, h, _ = q.shape
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, None, :]
    top_BUH = jnp.swapaxes(top_BHU, 1, 2)
    q_top = q[bi, top_BUH, hi]                                         # [B, U, H, D]
    s = jnp.einsum("buhd,bkhd->bhuk", q_top, k, preferred_element_type=jnp.float32) * sm_scale
    o_top = jnp.einsum("bhuk,bkhd->buhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
    fill = v.astype(jnp.float32).mean(1, keepdims=True)
    out = jnp.broadcast_to(fill, (b, l_q) + v.shape[2:])
    return out.at[bi, top_BUH, hi].set(o_top).astype(q.dtype)


def _rows_specs(l_q, l_k, d, u_pad):
    top = pl.BlockSpec((None, None, u_pad), lambda b_, h_: (b_, h_, 0))
    seq_q = pl.BlockSpec((None, l_q, None, d), lambda b_, h_: (b_, 0, h_, 0))
    seq_k = pl.BlockSpec((None, l_k, None, d), lambda b_, h_: (b_, 0, h_, 0))
    return top, seq_q, seq_k


def _rows_forward(q, k, v, top_ext, cfg):
    u, u_pad, block_k, num_warps, interpret, sm_scale = cfg
    b, l_q, h, d = q.shape
    l_k = k.shape[1]
    top, seq_q, seq_k = _rows_specs(l_q, l_k, d, u_pad)
    return pl.pallas_call(
        functools.partial(_rows_fwd_kernel, u=u, l_q=l_q, l_k=l_k, block_k=block_k,
                          scale=sm_scale * LOG2E),
        grid=(b, h), in_specs=[top, seq_q, seq_k, seq_k],
        out_specs=[seq_q, pl.BlockSpec((None, None, u_pad), lambda b_, h_: (b_, h_, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, u_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="probsparse_rows_fwd",
    )(top_ext, q, k, v)


def _rows_backward(q, k, v, top_ext, out, lse, dout, cfg):
    u, u_pad, block_k, num_warps, interpret, sm_scale = cfg
    b, l_q, h, d = q.shape
    l_k = k.shape[1]
    top, seq_q, seq_k = _rows_specs(l_q, l_k, d, u_pad)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_rows_bwd_kernel, u=u, l_q=l_q, l_k=l_k, block_k=block_k,
                          scale=sm_scale * LOG2E, sm_scale=sm_scale),
        grid=(b, h),
        in_specs=[top, seq_q, seq_k, seq_k, seq_q, seq_q,
                  pl.BlockSpec((None, None, u_pad), lambda b_, h_: (b_, h_, 0))],
        out_specs=[seq_q, seq_k, seq_k],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="probsparse_rows_bwd",
    )(top_ext, q, k, v, dout, out, lse)
    return dq, dk, dv


_rows = _common.lse_attention_vjp(_rows_forward, _rows_backward)


def rows_padding(l_q: int, u: int) -> int:
    """Rows per program of the active-rows kernels: u padded to a power of 2 (>= 16); 0 when
    the padding needs more rows than the sequence has (then use the flash path)."""
    u_pad = max(16, pl.next_power_of_2(u))
    return u_pad if u_pad <= l_q else 0


def active_rows_attention(q, k, v, top_BHU, *, sm_scale: float | None = None,
                          backend: str | None = None, block_k: int = 64, num_warps: int = 4,
                          top_is_extended: bool = False, u: int | None = None):
    """Bidirectional ProbSparse output: mean(V) for every query of q [B, Lq, H, D], full softmax
    attention over k/v [B, Lk, H, D] for the rows top [B, H, U] (distinct positions per row).

    One Pallas program per (batch, head) gathers its U query rows, attends over all keys (and
    sums V), and writes the whole output of the head: the attention rows and mean(V) elsewhere;
    the backward kernel does the same for dq, dk, dv (all U rows of a head in one program: dk,
    dv without atomics). head_dim: a power of 2 >= 16; Lq >= `rows_padding(Lq, U)` > 0.
    `top_is_extended`: top [B, H, >= U_pad] already holds U_pad distinct rows, the u active ones
    first (pallas_kernels.probsparse top_u's permutation), with `u` given.
    """
    b, l_q, h, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if d < 16 or d & (d - 1):
        raise ValueError(f"active_rows_attention needs a power-of-2 head_dim >= 16, got {d}")
    u = top_BHU.shape[-1] if u is None else u
    u_pad = rows_padding(l_q, u)
    if not u_pad:
        raise ValueError(f"active_rows_attention needs Lq >= {max(16, pl.next_power_of_2(u))} "
                         f"rows for u = {u}, got Lq = {l_q}")
    backend = _common.resolve_backend(backend)
    if backend == "reference" or backend == "tpu_interpret" or (
            backend == "pallas" and _common.platform() == "tpu"):
        return active_rows_reference(q, k, v, top_BHU[..., :u], sm_scale=sm_scale)
    if top_is_extended:
        top_ext = top_BHU[..., :u_pad]
    else:                               # padding: the first u_pad - u lazy positions
        active = jnp.zeros((b, h, l_q), jnp.int32).at[
            jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], top_BHU].set(1)
        lazy_first = jnp.argsort(active, axis=-1, stable=True)[..., :u_pad - u]
        top_ext = jnp.concatenate([top_BHU, lazy_first], axis=-1)
    cfg = (u, u_pad, min(block_k, max(16, pl.next_power_of_2(max(l_q, k.shape[1])))),
           num_warps, backend == "interpret", sm_scale)
    return _rows(q, k, v, top_ext.astype(jnp.int32), cfg)

"""Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"): references, Pallas kernels (GPU and TPU) and the public dispatch.

Per batch and head, with state S [Dk, Dv] kept in float32:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

Shapes: q/k [B, L, H, Dk], v [B, L, H, Dv], log_g [B, L, H, Dk] (log forget gate, <= 0),
initial/final state [B, H, Dk, Dv] float32, output [B, L, H, Dv] in the dtype of v.

Two references: `gla_recurrent_reference` runs the recurrence step by step (the ground truth of
the tests); `gla_chunked_reference` is the chunkwise form (intra-chunk attention-like matmuls plus
an inter-chunk state recurrence) that makes long sequences usable on CPU. In the chunked form every
exponent is a difference b_t - b_s of cumulative log gates with s <= t, hence <= 0: nothing
overflows however strong the decay.

The kernels (`gla_pallas`) walk each (batch, head) through chunks of 64 rows, each in state
steps (`sub_chunk` rows) made of 16-row blocks: the f32 state carries everything before a step,
a 16 x 16 block is scored with gates relative to its middle row and blocks further apart with
the decay split at the earlier block's end (see the comment above `GLABlocks`). Two schedules: one
program walks a whole sequence, or a light pass stores the state entering each chunk and one
program per chunk does the rest. The backward recomputes instead of storing: a dq pass re-runs
the state recurrence (and stores one state per chunk), dk/dv passes walk the chunks backwards
with dS (fused, or a dv kernel and a dk kernel each carrying a block of dS), and dlog_g is a
reverse cumsum, inside each chunk, of q * dq - k * dk plus sum_v S_end * dS_end. GPU: Triton
lowering; TPU: Mosaic, with the chunk axis of the grid sequential and the state in VMEM.
`gla_step` is the exact one-token step for decoding (jnp: a [Dk, Dv] update per head, no
kernel).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

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
    out_dtype = v.dtype
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
    return o.astype(out_dtype), final


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


# --------------------------------------------------------------------------------------------
# Pallas kernels (GPU, Triton lowering).
#
# A program owns one (batch, head) and a block of the state and walks chunks of `chunk_size`
# (64) rows (all of the sequence, or one chunk from a stored state: `GLABlocks.schedule`), each
# done as steps of `sub_chunk` rows, each step as blocks of `intra_block` (16) rows. With C the
# cumulative log gate from the step's start:
#   * inter part: rows read the f32 state entering the step, q * exp(C) @ S, and the state
#     leaving it is exp(C_end) * S + (k * exp(C_end - C))^T v: every exponent is <= 0;
#   * diagonal blocks: A = (q * exp(c - m)) (k * exp(m - c))^T masked to s <= t, with c the
#     cumsum inside the block and m its value at the middle row: exponents stay within +-8
#     steps of log_g, so nothing overflows for log_g >= -11 per step (f32 exp overflows at 88.7);
#   * block i after block j of the same step: (q_i * exp(c_i) * exp(E_<i - E_<=j)) @
#     (k_j * exp(e_j - c_j))^T, E the step's cumsum at block ends: every factor <= 1.
# One state step per 16 rows is the old kernel (4 dependent state updates per chunk); 64-row
# steps trade them for the 6 cross-block scores (fewer FLOPs at D >= 64, GLA's secondary level).
# Matmul operands are in the input dtype (bf16 stays bf16), accumulation and state in f32.
# --------------------------------------------------------------------------------------------

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GLABlocks:
    """Tiling of the Pallas kernels (static; hashable)."""

    chunk_size: int = 64        # rows per loop iteration (unrolled into sub-chunks)
    # Defaults: one state step and one (guarded) diagonal block per 64-row chunk, bf16 stored
    # states, chunk-parallel: the fastest forward+backward measured (H200, docs/kernels/gla.md).
    sub_chunk: int = 64         # rows per state step (the f32 state is updated once per step)
    # Rows of a diagonal block: inside it the scores use gates relative to its middle row
    # (|exponent| <= intra_block / 2 steps of log_g); blocks of a step further apart are scored
    # with decays split at the earlier block's end (every factor <= 1). GPU kernels only.
    intra_block: int = 64
    block_v: int = 64           # state columns per program in the sequential forward
    # Columns of v (and o) per program of the chunk-parallel per-chunk forward; its state is
    # read, not carried, so 4 warps unless num_warps_fwd says otherwise. 128 (all of Dv up to
    # 128): the scores and decays once per chunk, not once per 64 columns (H200, session 3 call 3).
    chunk_block_v: int = 128
    block_k: int = 64           # state rows per program in the dq backward (and the dS pass)
    # Tile of the chunk-parallel states pass (forward) and dS pass (backward), the light
    # sequential walks: rows and columns of the state are independent there. The per-chunk
    # cumsum and exps of the gates cost as much as the update, so the tile spans all of Dv up
    # to 128 (each gate column done once) and 64 rows of Dk (H200, session 3). None: all of Dk
    # (forward) / block_k (dS), and block_v (forward) / all of Dv (dS).
    states_block_k: int | None = 64
    states_block_v: int | None = 128
    # States / dS passes: load the next chunk's tiles one iteration ahead (`_state_walk`).
    states_prefetch: bool = False
    # The decay guard of diagonal blocks > 16 rows (`_walk_steps`): "cond" branches inside each
    # kernel; "split" (chunk-parallel kernels) runs each per-chunk kernel twice, "fast" (the
    # long blocks where the guard holds, nothing elsewhere), then "safe" (16-row blocks where
    # it fails) into the same outputs, so the common kernel is compiled without the long
    # fallback code and its registers.
    guard: str = "cond"
    # With guard "split" and one 64-row block per chunk: the common per-chunk forward, dv and
    # (split) dk kernels contract their wide dimension (Dk in the forward and dv kernels, Dv in
    # the dk kernel) in slices of this width, accumulating the scores and the state products,
    # so their live tiles are [64, contract_slice] instead of [64, D]. None: all at once.
    contract_slice: int | None = None
    # dk/dv backward: fused (one program carries all of dS) or split into a dv kernel over
    # blocks of dS's columns and a dk kernel over blocks of its rows (both exact, each carries a
    # block of dS; the dS recurrence runs in both). None: split when Dk * Dv > 64 * 128.
    dkv_split: bool | None = None
    block_k_dkv: int = 64       # state rows per program of the split dk kernel
    # State columns per program of the split dv kernel. None: the chunk-parallel kernel (dS
    # read, not carried) spans all of Dv up to 128 with 4 warps while Dk <= 128 (the scores
    # and gates once per chunk: dv 356 -> 255 us at D=128 T=2k, H200, session 4 call 2), else
    # and in the sequential kernel 64.
    block_v_dkv: int | None = None
    num_warps_fwd: int | None = None   # None: one warp per 2048 f32 state entries, 4..8
    num_warps_dq: int | None = None
    num_warps_dkv: int | None = None
    num_stages: int = 2
    # GPU kernels: the gate factors as exp2(x * log2(e)), one ex2.approx instruction (~2 ulp),
    # instead of jnp.exp (libdevice expf, ~10 instructions per element; about a quarter of
    # the per-chunk kernels' instructions at D=128 by the PTX). Forward chunks -9%, dv -8% at
    # D=128 T=2k (H200, session 4 call 1).
    fast_exp: bool = True
    # GPU kernels with bf16 / f16 gates: the cumulative gates inside a chunk as a matmul by a
    # triangular ones matrix (`_cumsum_rows`) instead of a scan (by the PTX about a third of
    # the per-chunk kernels' instructions at D=128). With fast_exp: dk -16%, states / dS
    # passes -8 / -13% at D=128 T=2k (H200, session 4 call 2).
    cumsum_matmul: bool = True
    # Chunk-parallel backward: the dS pass also writes dlog_g's chunk-end term sum_v S_end *
    # dS_end per chunk ([Dk] in f32), so the dk kernels read that instead of the [Dk, Dv]
    # state at the chunk's end. Opt-in: measured slower (dS pass +33 us, dk unchanged at D=128
    # T=2k, H200, session 4 call 2).
    dstates_acc: bool = False
    # With bf16 inputs: store the per-chunk states (chunk-parallel: states and dS; sequential:
    # the dq pass's states for dlog_g) in bf16 instead of f32, half the traffic; the kernels
    # feed them to bf16 matmuls anyway.
    bf16_states: bool = True
    # "sequential": one program walks a whole sequence (no stored states in the forward);
    # "chunk_parallel": a light pass writes the state entering each chunk (f32, one per chunk),
    # then one program per chunk (and the same for dS in the backward). GPU kernels only.
    # "hybrid": the sequential forward, which also writes the state entering each chunk, and the
    # chunk-parallel backward. "auto": chosen by shape (`_pick_schedule`).
    schedule: str = "auto"

    def __post_init__(self):
        if self.guard not in ("cond", "split", "fast", "safe"):
            raise ValueError(f"guard must be 'cond' or 'split', got {self.guard!r}")
        if self.schedule not in ("auto", "sequential", "chunk_parallel", "hybrid"):
            raise ValueError(f"schedule must be 'auto', 'sequential', 'chunk_parallel' or "
                             f"'hybrid', got {self.schedule!r}")
        if (self.chunk_size % self.sub_chunk or self.sub_chunk % self.intra_block
                or self.intra_block < 16):
            raise ValueError(f"chunk_size ({self.chunk_size}) must be a multiple of sub_chunk "
                             f"({self.sub_chunk}), a multiple of intra_block "
                             f"({self.intra_block}) >= 16")


_MAX_BLOCK_DECAY = 80.0     # largest |total log gate| of a diagonal block > 16 rows (_walk_steps)
_DKV_FUSED_MAX = 64 * 128   # largest Dk * Dv of the fused dk/dv kernel (GLABlocks.dkv_split)
_LOG2E = 1.4426950408889634


def _pick_schedule(blocks, b, h, dv):
    """The schedule "auto" resolves to. Measured (H200, bf16, T=2k, 64-row steps): the
    chunk-parallel forward+backward is the fastest at B*H = 128 with D=128 and at B*H = 48 / 96
    with Dk=64, Dv=128; the sequential forward with 64-row steps is 2x slower. So: always
    chunk-parallel (the sequential schedule with 16-row steps is ~9% faster in a forward-only
    pass at B*H*Dv/64 = 256, docs/kernels/gla.md)."""
    del b, h, dv
    if blocks.schedule != "auto":
        return blocks
    return dataclasses.replace(blocks, schedule="chunk_parallel")


def _num_warps(given, state_rows, state_cols):
    # The f32 state lives in registers: about 64 of them per thread (measured on an H200:
    # dk/dv pass at Dk=Dv=128 unsplit with 8 warps took half the time of two 64-row blocks
    # with 4 warps each; docs/kernels/gla.md).
    if given is not None:
        return given
    return max(4, min(8, state_rows * state_cols // 2048))


def _states_dtype(blocks, x):
    return jnp.bfloat16 if blocks.bf16_states and x.dtype == jnp.bfloat16 else _F32


def _gpu_params(blocks, warps, state_rows, state_cols, interpret):
    return dict(compiler_params=plgpu.CompilerParams(
        num_warps=_num_warps(warps, state_rows, state_cols), num_stages=blocks.num_stages),
        interpret=interpret)


def _exp_fn(blocks):
    """The exp of the GPU kernels' gate factors (GLABlocks.fast_exp)."""
    if blocks.fast_exp:
        return lambda x: jnp.exp2(x * _LOG2E)
    return jnp.exp


def _dot(a, b, *, ta=False, tb=False):
    """a @ b with optional transposes, accumulated in f32."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _cumsum_rows(g, blocks):
    """Cumulative sum along the rows of a gate tile, f32. GLABlocks.cumsum_matmul with bf16 /
    f16 gates: one matmul by the lower-triangular ones matrix (exact products, f32
    accumulation) instead of Triton's scan across the warps."""
    if blocks.cumsum_matmul and g.dtype in (jnp.bfloat16, jnp.float16):
        n = g.shape[0]
        tril = (lax.broadcasted_iota(jnp.int32, (n, n), 0)
                >= lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(g.dtype)
        return _dot(tril, g)
    return jnp.cumsum(g.astype(_F32), axis=0)


def _sub_chunk_gates(g, sub, blocks):
    """Cumulative log gate inside a sub-chunk: c [C, K], its total c_end [K], midpoint m [K]
    (f32; g in the input dtype)."""
    c_CK = _cumsum_rows(g, blocks)
    g_CK = g.astype(_F32)
    c_end_K = jnp.sum(g_CK, axis=0)
    rows = lax.broadcasted_iota(jnp.int32, g_CK.shape, 0)
    m_K = jnp.sum(jnp.where(rows < sub // 2, g_CK, 0.0), axis=0)
    return c_CK, c_end_K, m_K


def _causal_mask(sub):
    t = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    s = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    return t >= s


def _step_blocks(base, blocks, load):
    """The intra blocks of one state step starting at row `base`: for each, its rows, what
    `load(rows)` returns (a dict of tiles, "g" included), its gates c/e/m (`_sub_chunk_gates`),
    pre = the step's log-gate sum before it (E_{<i}, None for the first), pre_end (E_{<=i}) and
    total (E, the step's sum)."""
    ib = blocks.intra_block
    out, pre = [], None
    for i in range(blocks.sub_chunk // ib):
        rows = pl.ds(base + i * ib, ib)
        blk = load(rows)
        blk["rows"] = rows
        blk["c"], blk["e"], blk["m"] = _sub_chunk_gates(blk.pop("g"), ib, blocks)
        blk["exp"] = _exp_fn(blocks)
        blk["pre"] = pre
        pre = blk["e"] if pre is None else pre + blk["e"]
        blk["pre_end"] = pre
        out.append(blk)
    for blk in out:
        blk["total"] = pre
    return out


def _memo(b, name, fn):
    if name not in b:
        b[name] = fn()
    return b[name]


def _exp_c(b):      # exp(c) [ib, K]: decay from the block's start to each row
    return _memo(b, "exp_c", lambda: b["exp"](b["c"]))


def _exp_out(b):    # exp(e - c): decay from each row to the block's end
    return _memo(b, "exp_out", lambda: b["exp"](b["e"][None, :] - b["c"]))


def _from_step_start(b):
    """exp(C) for the block's rows: the decay from the step's start to each row."""
    if b["pre"] is None:
        return _exp_c(b)
    return _memo(b, "from_start", lambda: _exp_c(b) * b["exp"](b["pre"])[None, :])


def _to_step_end(b):
    """exp(E - C) for the block's rows: the decay from each row to the step's end."""
    if b["pre_end"] is b["total"]:
        return _exp_out(b)
    return _memo(b, "to_end", lambda: _exp_out(b) * b["exp"](b["total"] - b["pre_end"])[None, :])


def _q_loc(b):      # q * exp(c)
    return _memo(b, "q_loc", lambda: b["q"] * _exp_c(b))


def _k_out(b):      # k * exp(e - c)
    return _memo(b, "k_out", lambda: b["k"] * _exp_out(b))


def _q_loc_d(b, dot_dtype):
    return _memo(b, "q_loc_d", lambda: _q_loc(b).astype(dot_dtype))


def _k_out_d(b, dot_dtype):
    return _memo(b, "k_out_d", lambda: _k_out(b).astype(dot_dtype))


def _q_in(b):       # q decayed from the step's start: reads the state entering the step
    return _memo(b, "q_in", lambda: b["q"] * _from_step_start(b))


def _k_end(b):      # k decayed to the step's end: writes the state leaving it
    return _memo(b, "k_end", lambda: b["k"] * _to_step_end(b))


def _cross(later, earlier):
    """exp(E_{<i} - E_{<=j}) [K] for blocks i > j: with exp(c_i) on the rows of i and
    exp(e_j - c_j) on those of j, the decay between them; every factor <= 1."""
    return later["exp"](later["pre"] - earlier["pre_end"])


def _walk_steps(step, g_ref, base, carry, blocks, reverse=False):
    """The state steps of a chunk at row `base` (in reverse for the backward): carry =
    step(first row, carry, blocks). Diagonal blocks longer than 16 rows are scored from their
    middle row: exact while the block's total log gate is >= -_MAX_BLOCK_DECAY in every column
    (no exponent above it), which each step checks; steps with stronger decay run with 16-row
    blocks (safe down to log_g = -11 per step)."""
    n = blocks.chunk_size // blocks.sub_chunk
    safe = dataclasses.replace(blocks, intra_block=16)
    for st in (reversed(range(n)) if reverse else range(n)):
        at = base + st * blocks.sub_chunk
        if blocks.intra_block <= 16:
            carry = step(at, carry, blocks)
            continue
        g = g_ref[pl.ds(at, blocks.sub_chunk), :].astype(_F32)
        ok = jnp.min(jnp.sum(g, axis=0)) >= -_MAX_BLOCK_DECAY
        fast = functools.partial(step, at, blocks=blocks)
        slow = functools.partial(step, at, blocks=safe)
        if blocks.guard == "fast":     # GLABlocks.guard: the other kernel does the rest
            slow = lambda carry: carry
        elif blocks.guard == "safe":
            fast = lambda carry: carry
        carry = lax.cond(ok, fast, slow, carry)
    return carry


def _split_guard(blocks):
    return blocks.guard == "split" and blocks.intra_block > 16


def _guarded_calls(blocks, call):
    """Runs call(blocks, outputs so far) -> outputs: once, or with GLABlocks.guard == "split"
    as the "fast" kernel and then the "safe" kernel writing into its outputs."""
    if not _split_guard(blocks):
        return call(blocks, ())
    out = call(dataclasses.replace(blocks, guard="fast"), ())
    return call(dataclasses.replace(blocks, guard="safe"), out)


def _aliased(kernel, n_in, n_prev):
    """kernel(*inputs, *outputs) as a kernel that also takes n_prev inputs aliased to its
    outputs (written in place, not read)."""
    return lambda *refs: kernel(*refs[:n_in], *refs[n_in + n_prev:])


def _chunk_call(kernel, blocks, prev, *, in_specs, out_specs, out_shape, **kw):
    """A chunk-parallel pallas_call of `kernel` (a partial without `blocks`); prev: outputs
    of the same call to write into. Returns a tuple of outputs."""
    out_specs, out_shape = list(out_specs), list(out_shape)
    n_in = len(in_specs)
    fn = pl.pallas_call(
        _aliased(functools.partial(kernel, blocks=blocks), n_in, len(prev)),
        in_specs=list(in_specs) + out_specs[:len(prev)], out_specs=out_specs,
        out_shape=out_shape, input_output_aliases={n_in + i: i for i in range(len(prev))},
        **kw)
    return lambda *args: tuple(fn(*args, *prev))


def _fwd_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, base, s_KV, *, scale, blocks, dot_dtype):
    """Rows [base, base + chunk_size) of one program: writes o, returns the state after them."""
    # q/k/g [*, K], v/o [*, BV], s [K, BV] f32
    def step(at, s_KV, blocks):
        causal = _causal_mask(blocks.intra_block)
        load = lambda rows: dict(q=q_ref[rows, :].astype(_F32), k=k_ref[rows, :].astype(_F32),
                                 g=g_ref[rows, :], v=v_ref[rows, :].astype(dot_dtype))
        blks = _step_blocks(at, blocks, load)
        s_dot = s_KV.astype(dot_dtype)
        for i, b in enumerate(blks):
            q, k, c, m = b["q"], b["k"], b["c"], b["m"]
            q_mid = (q * b["exp"](c - m[None, :])).astype(dot_dtype)
            k_mid = (k * b["exp"](m[None, :] - c)).astype(dot_dtype)
            a = jnp.where(causal, _dot(q_mid, k_mid, tb=True), 0.0).astype(dot_dtype)
            o = _dot(_q_in(b).astype(dot_dtype), s_dot) + _dot(a, b["v"])
            for e in blks[:i]:   # earlier blocks of the step
                q_x = (_q_loc(b) * _cross(b, e)[None, :]).astype(dot_dtype)
                a_x = _dot(q_x, _k_out_d(e, dot_dtype), tb=True).astype(dot_dtype)
                o = o + _dot(a_x, e["v"])
            o_ref[b["rows"], :] = (scale * o).astype(o_ref.dtype)
            s_KV = _block_update(s_KV, b, _k_out_d(b, dot_dtype), b["v"])
        return s_KV
    return _walk_steps(step, g_ref, base, s_KV, blocks)


def _block_update(s_KV, b, key, val, scale=None):
    """The state across one block: exp(e) * S + (scale *) key^T val. Forward: key = k decayed
    to the block's end, S walks forward; backward: key = q decayed from the block's start and
    S = dS walks back. The step's outputs read the state at the step's edge (converted once),
    so these updates are off their path."""
    term = _dot(key, val, ta=True)
    return b["exp"](b["e"])[:, None] * s_KV + (term if scale is None else scale * term)


def _gla_fwd_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, st_ref, *states_ref, n_chunks,
                    **kw):
    # Sequential schedule: q/k/g [Lp, K], v/o [Lp, BV], s0/st [K, BV]; "hybrid" also writes
    # states [N + 1, K, BV], the state entering each chunk and then the final one.
    step = kw["blocks"].chunk_size

    def chunk(ci, s_KV):
        if states_ref:
            states_ref[0][ci] = s_KV.astype(states_ref[0].dtype)
        return _fwd_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, ci * step, s_KV, **kw)

    final = lax.fori_loop(0, n_chunks, chunk, s0_ref[...].astype(_F32))
    st_ref[...] = final
    if states_ref:
        states_ref[0][n_chunks] = final.astype(states_ref[0].dtype)


def _state_walk(n_chunks, chunk_of, load, update, s_KV, store, prefetch):
    """The serial chain of the states / dS passes: for i < n_chunks, with ci = chunk_of(i),
    store(ci, s) then s = update(load(ci), s); returns the last s. prefetch: each iteration
    loads the next chunk's tiles (carried to the next iteration) before this chunk's update,
    so their memory latency overlaps the update instead of adding to the chain."""
    if not prefetch:
        def body(i, s_KV):
            ci = chunk_of(i)
            store(ci, s_KV)
            return update(load(ci), s_KV)
        return lax.fori_loop(0, n_chunks, body, s_KV)

    def body_prefetch(i, carry):
        s_KV, tiles = carry
        ci = chunk_of(i)
        following = load(chunk_of(jnp.minimum(i + 1, n_chunks - 1)))
        store(ci, s_KV)
        return update(tiles, s_KV), following
    return lax.fori_loop(0, n_chunks, body_prefetch, (s_KV, load(chunk_of(0))))[0]


def _gla_states_kernel(k_ref, v_ref, g_ref, s0_ref, states_ref, final_ref, *, blocks, n_chunks,
                       dot_dtype):
    # Chunk-parallel schedule, pass 1: k/g [Lp, K], v [Lp, BV], s0 [K, BV],
    # states [N + 1, K, BV] (f32 or bf16): the state entering each chunk, then the final state,
    # which also goes to final [K, BV] in f32.
    size = blocks.chunk_size
    exp = _exp_fn(blocks)

    def load(ci):
        rows = pl.ds(ci * size, size)
        return k_ref[rows, :], v_ref[rows, :], g_ref[rows, :]

    def update(tiles, s_KV):
        k, v, g = tiles
        b, b_end = _cumsum_rows(g, blocks), jnp.sum(g.astype(_F32), axis=0)
        # exp(b_end - b) may underflow for strong decays: then so does the true contribution.
        k_out = (k.astype(_F32) * exp(b_end[None, :] - b)).astype(dot_dtype)
        return exp(b_end)[:, None] * s_KV + _dot(k_out, v.astype(dot_dtype), ta=True)

    def store(ci, s_KV):
        states_ref[ci] = s_KV.astype(states_ref.dtype)

    final = _state_walk(n_chunks, lambda i: i, load, update, s0_ref[...].astype(_F32), store,
                        blocks.states_prefetch)
    states_ref[n_chunks] = final.astype(states_ref.dtype)
    final_ref[...] = final


def _gla_fwd_chunk_kernel(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, **kw):
    # Chunk-parallel schedule, pass 2: one chunk, q/k/g [C, K], v/o [C, BV], s [K, BV] entering.
    if _sliced(kw["blocks"]):
        _fwd_chunk_sliced(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, **kw)
        return
    _fwd_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, 0, s_ref[...].astype(_F32), **kw)


def _sliced(blocks):
    """The common kernel of guard "split" with one 64-row block per chunk, contracting in
    slices (GLABlocks.contract_slice): `_fwd_chunk_sliced`, `_dv_chunk_sliced`,
    `_dk_chunk_sliced`. Chunks failing the guard are left to the "safe" kernel; under the
    guard |m| <= 80 and |e - m| <= 80, so exp(c) = exp(c - m) exp(m) and exp(e - c) =
    exp(m - c) exp(e - m) stay in f32 range and one exp of each sign serves every factor."""
    return (blocks.guard == "fast" and blocks.contract_slice is not None
            and blocks.sub_chunk == blocks.intra_block == blocks.chunk_size)


def _guard_ok(g_ref):
    return jnp.min(jnp.sum(g_ref[...].astype(_F32), axis=0)) >= -_MAX_BLOCK_DECAY


def _scores_by_slices(q_ref, k_ref, g_ref, blocks, dot_dtype, term, acc):
    """(A, acc) for one guarded chunk: A = sum over slices of Dk of q_mid k_mid^T [C, C] and
    acc + sum of term(cols, q_mid, k_mid, e, m) (f32 q_mid, k_mid of the slice)."""
    size, dk = q_ref.shape
    kb = min(blocks.contract_slice, dk)
    exp = _exp_fn(blocks)
    a = jnp.zeros((size, size), _F32)
    for h in range(dk // kb):
        cols = pl.ds(h * kb, kb)
        c, e, m = _sub_chunk_gates(g_ref[:, cols], size, blocks)
        q_mid = q_ref[:, cols].astype(_F32) * exp(c - m[None, :])
        k_mid = k_ref[:, cols].astype(_F32) * exp(m[None, :] - c)
        a = a + _dot(q_mid.astype(dot_dtype), k_mid.astype(dot_dtype), tb=True)
        acc = acc + term(cols, q_mid, k_mid, e, m)
    return a, acc


def _fwd_chunk_sliced(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, *, scale, blocks, dot_dtype):
    """o of one chunk (see _sliced): A = sum over slices of Dk of q_mid k_mid^T and o_inter =
    sum of (q * exp(c)) @ S, with q * exp(c) = q_mid * exp(m)."""
    size = q_ref.shape[0]
    exp = _exp_fn(blocks)

    def q_in_s(cols, q_mid, k_mid, e, m):
        return _dot((q_mid * exp(m)[None, :]).astype(dot_dtype),
                    s_ref[cols, :].astype(dot_dtype))

    @pl.when(_guard_ok(g_ref))
    def _():
        a, o = _scores_by_slices(q_ref, k_ref, g_ref, blocks, dot_dtype, q_in_s,
                                 jnp.zeros(o_ref.shape, _F32))
        a = jnp.where(_causal_mask(size), a, 0.0).astype(dot_dtype)
        o = o + _dot(a, v_ref[...].astype(dot_dtype))
        o_ref[...] = (scale * o).astype(o_ref.dtype)


def _gla_fwd_call(q, k, v, log_g, s0, *, scale, blocks, interpret):
    """Returns (o, final state, chunk states or None)."""
    b, lp, h, dk = q.shape
    dv = v.shape[-1]
    bv = min(blocks.block_v, dv)
    n_chunks, size = lp // blocks.chunk_size, blocks.chunk_size
    kw = dict(blocks=blocks, dot_dtype=_dot_dtype(q))
    params = _gpu_params(blocks, blocks.num_warps_fwd, dk, bv, interpret)
    seq_k = pl.BlockSpec((None, lp, None, dk), lambda i, j, n: (i, 0, j, 0))
    seq_v = pl.BlockSpec((None, lp, None, bv), lambda i, j, n: (i, 0, j, n))
    state = pl.BlockSpec((None, None, dk, bv), lambda i, j, n: (i, j, 0, n))
    o_shape = jax.ShapeDtypeStruct((b, lp, h, dv), v.dtype)
    states_spec = pl.BlockSpec((None, None, n_chunks + 1, dk, bv), lambda i, j, n: (i, j, 0, 0, n))
    states_shape = jax.ShapeDtypeStruct((b, h, n_chunks + 1, dk, dv), _states_dtype(blocks, q))
    if blocks.schedule in ("sequential", "hybrid"):
        store = blocks.schedule == "hybrid"
        res = pl.pallas_call(
            functools.partial(_gla_fwd_kernel, scale=scale, n_chunks=n_chunks, **kw),
            grid=(b, h, dv // bv),
            in_specs=[seq_k, seq_k, seq_v, seq_k, state],
            out_specs=[seq_v, state] + [states_spec] * store,
            out_shape=[o_shape, jax.ShapeDtypeStruct((b, h, dk, dv), _F32)]
            + [states_shape] * store,
            name="gla_fwd", **params,
        )(q, k, v, log_g, s0)
        return res[0], res[1], (res[2] if store else None)
    sk, sv = min(blocks.states_block_k or dk, dk), min(blocks.states_block_v or bv, dv)
    tile = lambda width, blk: pl.BlockSpec((None, lp, None, width),
                                           lambda i, j, m, n: (i, 0, j, blk(m, n)))
    states, final = pl.pallas_call(
        functools.partial(_gla_states_kernel, n_chunks=n_chunks, **kw),
        grid=(b, h, dk // sk, dv // sv),
        in_specs=[tile(sk, lambda m, n: m), tile(sv, lambda m, n: n), tile(sk, lambda m, n: m),
                  pl.BlockSpec((None, None, sk, sv), lambda i, j, m, n: (i, j, m, n))],
        out_specs=[pl.BlockSpec((None, None, n_chunks + 1, sk, sv),
                                lambda i, j, m, n: (i, j, 0, m, n)),
                   pl.BlockSpec((None, None, sk, sv), lambda i, j, m, n: (i, j, m, n))],
        out_shape=[states_shape, jax.ShapeDtypeStruct((b, h, dk, dv), _F32)],
        name="gla_fwd_states", **_gpu_params(blocks, blocks.num_warps_fwd, sk, sv, interpret),
    )(k, v, log_g, s0)
    bv = min(blocks.chunk_block_v, dv)
    chunk_k = pl.BlockSpec((None, size, None, dk), lambda i, j, c, n: (i, c, j, 0))
    chunk_v = pl.BlockSpec((None, size, None, bv), lambda i, j, c, n: (i, c, j, n))
    state_c = pl.BlockSpec((None, None, None, dk, bv), lambda i, j, c, n: (i, j, c, 0, n))
    kern = functools.partial(_gla_fwd_chunk_kernel, scale=scale, dot_dtype=kw["dot_dtype"])
    params = _gpu_params(blocks, blocks.num_warps_fwd or 4, dk, bv, interpret)
    (o,) = _guarded_calls(blocks, lambda blk, prev: _chunk_call(
        kern, blk, prev, grid=(b, h, n_chunks, dv // bv),
        in_specs=[chunk_k, chunk_k, chunk_v, chunk_k, state_c], out_specs=[chunk_v],
        out_shape=[o_shape], name="gla_fwd_chunks", **params,
    )(q, k, v, log_g, states))
    return o, final, states


# --------------------------------------------------------------------------------------------
# Backward. The forward stores nothing (sequential schedule) or one f32 state per chunk
# (chunk-parallel schedule); the rest is recomputed.
#   dq pass (forward order, grid over blocks of K rows of the state): re-runs the state
#     recurrence and writes dq = scale * (exp(c) * (do @ S^T) + exp(c - m) * (dA @ k_mid)), f32.
#   dk/dv pass (reverse order): carries dS, the gradient w.r.t. the state at the sub-chunk's
#     end, dS_start = exp(c_end) * dS_end + scale * (q * exp(c))^T do, and
#     dv = A^T do + k_out dS_end, dk = exp(m - c) * (dA^T q_mid) + exp(c_end - c) * (v dS_end^T),
#     dlog_g = reverse cumsum inside the chunk of (q * dq - k * dk) + sum_v S_end * dS_end.
#   Chunk-parallel schedule: a reverse pass first writes dS at every chunk end; then the dq and
#     dk/dv passes run one program per chunk from the stored S and dS.
# --------------------------------------------------------------------------------------------


def _dq_block(blks, i, s_dot, causal, *, scale, dot_dtype):
    """dq of block i of a step: do S^T from the state entering the step (s_dot [BK, V]) plus
    dA k inside the step. blks hold k (this program's K columns), v and do (all of V)."""
    b = blks[i]
    k, c, m, do, exp = b["k"], b["c"], b["m"], b["do"], b["exp"]
    k_mid = (k * exp(m[None, :] - c)).astype(dot_dtype)
    da = jnp.where(causal, _dot(do, b["v"], tb=True), 0.0).astype(dot_dtype)
    dq = (_from_step_start(b) * _dot(do, s_dot, tb=True)
          + exp(c - m[None, :]) * _dot(da, k_mid))
    if i:   # earlier blocks of the step
        x = 0.0
        for e in blks[:i]:
            da_x = _dot(do, e["v"], tb=True).astype(dot_dtype)
            x = x + _cross(b, e)[None, :] * _dot(da_x, _k_out_d(e, dot_dtype))
        dq = dq + _exp_c(b) * x
    return scale * dq


def _dq_chunk(k_ref, v_ref, g_ref, do_ref, dq_ref, base, s_KV, *, scale, blocks, dot_dtype):
    # k/g/dq [*, BK], v/do [*, V], s [BK, V] f32 entering the chunk; returns the state after it
    def step(at, s_KV, blocks):
        causal = _causal_mask(blocks.intra_block)
        load = lambda rows: dict(k=k_ref[rows, :].astype(_F32), g=g_ref[rows, :],
                                 v=v_ref[rows, :].astype(dot_dtype),
                                 do=do_ref[rows, :].astype(dot_dtype))
        blks = _step_blocks(at, blocks, load)
        s_dot = s_KV.astype(dot_dtype)
        for i, b in enumerate(blks):
            dq_ref[b["rows"], :] = _dq_block(blks, i, s_dot, causal, scale=scale,
                                             dot_dtype=dot_dtype)
            s_KV = _block_update(s_KV, b, _k_out_d(b, dot_dtype), b["v"])
        return s_KV
    return _walk_steps(step, g_ref, base, s_KV, blocks)


def _gla_bwd_dq_kernel(k_ref, v_ref, g_ref, do_ref, s0_ref, dq_ref, s_end_ref, *, n_chunks,
                       **kw):
    # k/g/dq [Lp, BK], v/do [Lp, V], s0 [BK, V], s_end [N, BK, V]: the state after each chunk
    step = kw["blocks"].chunk_size

    def chunk(ci, s_KV):
        s_KV = _dq_chunk(k_ref, v_ref, g_ref, do_ref, dq_ref, ci * step, s_KV, **kw)
        s_end_ref[ci] = s_KV.astype(s_end_ref.dtype)
        return s_KV

    lax.fori_loop(0, n_chunks, chunk, s0_ref[...].astype(_F32))


def _gla_bwd_dq_chunk_kernel(k_ref, v_ref, g_ref, do_ref, s_ref, dq_ref, **kw):
    _dq_chunk(k_ref, v_ref, g_ref, do_ref, dq_ref, 0, s_ref[...].astype(_F32), **kw)


def _gla_dstates_kernel(q_ref, g_ref, do_ref, dst_ref, *refs, scale, blocks, n_chunks,
                        dot_dtype):
    # Chunks in reverse: q/g [Lp, BK], do [Lp, BV], dst/ds0 [BK, BV], dstates [N, BK, BV]: the
    # gradient w.r.t. the state at the end of each chunk. With GLABlocks.dstates_acc refs =
    # (states [N + 1, BK, BV], dstates, ds0, acc [N, BK]): acc = sum over this tile's columns
    # of S_end * dS_end per chunk (S_end = the stored state entering the next chunk).
    if blocks.dstates_acc:
        states_ref, dstates_ref, ds0_ref, acc_ref = refs
    else:
        (dstates_ref, ds0_ref), states_ref = refs, None
    size = blocks.chunk_size
    exp = _exp_fn(blocks)

    def load(ci):
        rows = pl.ds(ci * size, size)
        return q_ref[rows, :], g_ref[rows, :], do_ref[rows, :]

    def update(tiles, ds_KV):
        q, g, do = tiles
        b, b_end = _cumsum_rows(g, blocks), jnp.sum(g.astype(_F32), axis=0)
        q_in = (q.astype(_F32) * exp(b)).astype(dot_dtype)
        return exp(b_end)[:, None] * ds_KV + scale * _dot(q_in, do.astype(dot_dtype), ta=True)

    def store(ci, ds_KV):
        dstates_ref[ci] = ds_KV.astype(dstates_ref.dtype)
        if states_ref is not None:
            acc_ref[ci] = jnp.sum(states_ref[ci + 1].astype(_F32) * ds_KV, axis=1)

    ds0_ref[...] = _state_walk(n_chunks, lambda i: n_chunks - 1 - i, load, update,
                               dst_ref[...].astype(_F32), store, blocks.states_prefetch)


def _q_mid(b, dot_dtype):
    return _memo(b, "q_mid", lambda: (b["q"] * b["exp"](b["c"] - b["m"][None, :])
                                      ).astype(dot_dtype))


def _dv_block(blks, j, ds_dot, causal, *, scale, dot_dtype):
    """dv of block j of a step (reverse walk): A^T do inside the step plus k decayed to the
    step's end times dS there. blks hold q, k (all of K), do (this program's V columns)."""
    b = blks[j]
    k_mid = (b["k"] * b["exp"](b["m"][None, :] - b["c"])).astype(dot_dtype)
    a = jnp.where(causal, scale * _dot(_q_mid(b, dot_dtype), k_mid, tb=True), 0.0)
    dv = (_dot(_k_end(b).astype(dot_dtype), ds_dot)
          + _dot(a.astype(dot_dtype), b["do"], ta=True))
    for later in blks[j + 1:]:
        q_x = (_q_loc(later) * _cross(later, b)[None, :]).astype(dot_dtype)
        a_x = scale * _dot(q_x, _k_out_d(b, dot_dtype), tb=True)
        dv = dv + _dot(a_x.astype(dot_dtype), later["do"], ta=True)
    return dv


def _dk_block(blks, j, ds_dot, causal, *, scale, dot_dtype):
    """dk of block j of a step (reverse walk). blks hold q, k (this program's K columns), v and
    do (all of V); ds_dot [BK, V] at the step's end."""
    b = blks[j]
    c, m = b["c"], b["m"]
    da = jnp.where(causal, scale * _dot(b["do"], b["v"], tb=True), 0.0).astype(dot_dtype)
    dk = (b["exp"](m[None, :] - c) * _dot(da, _q_mid(b, dot_dtype), ta=True)
          + _to_step_end(b) * _dot(b["v"], ds_dot, tb=True))
    if j + 1 < len(blks):
        x = 0.0
        for later in blks[j + 1:]:
            da_x = (scale * _dot(later["do"], b["v"], tb=True)).astype(dot_dtype)
            x = x + _cross(later, b)[None, :] * _dot(da_x, _q_loc_d(later, dot_dtype), ta=True)
        dk = dk + _exp_out(b) * x
    return dk


def _reverse_cumsum_rows(x, blocks, dot_dtype):
    """Inclusive reverse cumulative sum along the rows of an f32 tile. GLABlocks.cumsum_matmul
    with bf16 operands: upper-triangular ones @ (x in two bf16 parts, x_hi + x_lo, ~2^-16
    relative), f32 accumulation; otherwise total - cumsum + x."""
    if blocks.cumsum_matmul and dot_dtype == jnp.bfloat16:
        n = x.shape[0]
        triu = (lax.broadcasted_iota(jnp.int32, (n, n), 0)
                <= lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(dot_dtype)
        hi = x.astype(dot_dtype)
        return _dot(triu, hi) + _dot(triu, (x - hi.astype(_F32)).astype(dot_dtype))
    return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x


def _write_dq_dk_dg(b, dk, acc_K, dq_ref, dk_ref, dg_ref, blocks, dot_dtype):
    """dq (cast), dk and dlog_g = reverse cumsum in the chunk of q * dq - k * dk; returns the
    running sum for the rows before this block."""
    x = b["q"] * b["dq"] - b["k"] * dk
    total = jnp.sum(x, axis=0)
    rows = b["rows"]
    dg_ref[rows, :] = (acc_K[None, :] + _reverse_cumsum_rows(x, blocks, dot_dtype)
                       ).astype(dg_ref.dtype)
    dq_ref[rows, :] = b["dq"].astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    return acc_K + total


def _ds_update(ds_KV, b, scale, dot_dtype):
    """dS at the start of block b from dS at its end."""
    return _block_update(ds_KV, b, _q_loc_d(b, dot_dtype), b["do"], scale)


def _loader(q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, dot_dtype):
    def load(rows):
        out = dict(q=q_ref[rows, :].astype(_F32), k=k_ref[rows, :].astype(_F32),
                   g=g_ref[rows, :], v=v_ref[rows, :].astype(dot_dtype),
                   do=do_ref[rows, :].astype(dot_dtype))
        if dq32_ref is not None:
            out["dq"] = dq32_ref[rows, :]
        return out
    return load


def _fill_dq(blks, s0_KV, causal, dot_dtype, scale):
    """One step per chunk, chunk-parallel: dq of every block from the stored state entering
    the chunk (no dq pass)."""
    if s0_KV is None:
        return
    s0_dot = s0_KV.astype(dot_dtype)
    for i, b in enumerate(blks):
        b["dq"] = _dq_block(blks, i, s0_dot, causal, scale=scale, dot_dtype=dot_dtype)


def _dkv_chunk(q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, dq_ref, dk_ref, dv_ref, dg_ref,
               base, ds_KV, s_end_KV, *, scale, blocks, dot_dtype, s0_KV=None):
    # dk, dq, dlog_g (and dv unless dv_ref is None) of the chunk at row `base`, steps and blocks
    # in reverse; returns dS at the chunk's start. Fused (dv_ref given): q/k/g/dq32/dq/dk/dg
    # [*, K], v/do/dv [*, V], ds/s_end [K, V] at the chunk's end. Split dk kernel (dv_ref None):
    # q/k/g/dq32/dq/dk/dg [*, BK], ds/s_end [BK, V], this program's rows of dS and S (dk and
    # dlog_g are exact per block of rows). With s0 (the state entering the chunk; one step per
    # chunk) dq is computed here and dq32 is unused.
    kw = dict(scale=scale, dot_dtype=dot_dtype)
    load = _loader(q_ref, k_ref, g_ref, v_ref, do_ref, None if s0_KV is not None else dq32_ref,
                   dot_dtype)

    def step(at, carry, blocks):
        ds_KV, acc_K = carry
        causal = _causal_mask(blocks.intra_block)
        blks = _step_blocks(at, blocks, load)
        _fill_dq(blks, s0_KV, causal, dot_dtype, scale)
        ds_dot = ds_KV.astype(dot_dtype)
        for j in reversed(range(len(blks))):
            if dv_ref is not None:
                dv = _dv_block(blks, j, ds_dot, causal, **kw)
                dv_ref[blks[j]["rows"], :] = dv.astype(dv_ref.dtype)
            dk = _dk_block(blks, j, ds_dot, causal, **kw)
            acc_K = _write_dq_dk_dg(blks[j], dk, acc_K, dq_ref, dk_ref, dg_ref, blocks,
                                    dot_dtype)
            ds_KV = _ds_update(ds_KV, blks[j], scale, dot_dtype)
        return ds_KV, acc_K
    # The gate of a row in this chunk scales every later row's view of the chunk's end state:
    # that part of dlog_g is sum_v S_end * dS_end, so the reverse cumsum stays inside the chunk
    # and its rounding does not grow with the length.
    # s_end_KV [K] (GLABlocks.dstates_acc): that sum, from the dS pass.
    acc_K = s_end_KV if s_end_KV.ndim == 1 else jnp.sum(s_end_KV * ds_KV, axis=1)
    return _walk_steps(step, g_ref, base, (ds_KV, acc_K), blocks, reverse=True)[0]


def _dv_chunk(q_ref, k_ref, g_ref, do_ref, dv_ref, base, ds_KV, *, scale, blocks, dot_dtype):
    # Split dv pass: q/k/g [*, K], do/dv [*, BV], ds [K, BV] (this program's columns of dS) at
    # the chunk's end. dv = A^T do + k_out dS is exact per block of columns.
    def step(at, ds_KV, blocks):
        causal = _causal_mask(blocks.intra_block)
        load = lambda rows: dict(q=q_ref[rows, :].astype(_F32), k=k_ref[rows, :].astype(_F32),
                                 g=g_ref[rows, :], do=do_ref[rows, :].astype(dot_dtype))
        blks = _step_blocks(at, blocks, load)
        ds_dot = ds_KV.astype(dot_dtype)
        for j in reversed(range(len(blks))):
            dv = _dv_block(blks, j, ds_dot, causal, scale=scale, dot_dtype=dot_dtype)
            dv_ref[blks[j]["rows"], :] = dv.astype(dv_ref.dtype)
            ds_KV = _ds_update(ds_KV, blks[j], scale, dot_dtype)
        return ds_KV
    return _walk_steps(step, g_ref, base, ds_KV, blocks, reverse=True)


def _reverse_walk(n_chunks, step, ds_KV, chunk_fn):
    """Sequential schedule: chunk_fn(row base, chunk index, dS at its end) over chunks in
    reverse; returns dS at the start."""
    def body(i, ds_KV):
        ci = n_chunks - 1 - i
        return chunk_fn(ci * step, ci, ds_KV)
    return lax.fori_loop(0, n_chunks, body, ds_KV)


def _gla_bwd_dkv_kernel(q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, s_end_ref, dst_ref, dq_ref,
                        dk_ref, *outs, n_chunks, with_dv, **kw):
    # Sequential: whole sequences ([Lp, *]), s_end [N, K, V], dst [K, V]. Fused (with_dv):
    # outs = dv, dlog_g, ds0 [K, V]; the split dk kernel (rows BK of the state): outs = dlog_g.
    dv_ref, dg_ref, *ds0_ref = outs if with_dv else (None, *outs)
    refs = (q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, dq_ref, dk_ref, dv_ref, dg_ref)
    fn = lambda base, ci, ds: _dkv_chunk(*refs, base, ds, s_end_ref[ci].astype(_F32), **kw)
    ds0 = _reverse_walk(n_chunks, kw["blocks"].chunk_size, dst_ref[...].astype(_F32), fn)
    if ds0_ref:
        ds0_ref[0][...] = ds0


def _gla_bwd_dkv_chunk_kernel(q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, s_end_ref, ds_ref,
                              dq_ref, dk_ref, *outs, fuse_dq, with_dv, **kw):
    # Chunk-parallel: one chunk ([C, *]), s_end/ds at its end; outs = dv, dlog_g (with_dv) or
    # dlog_g (split dk kernel). fuse_dq: dq32_ref is the state entering the chunk and dq is
    # computed here.
    dv_ref, dg_ref = outs if with_dv else (None, *outs)
    if fuse_dq and not with_dv and _sliced(kw["blocks"]):
        _dk_chunk_sliced(q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, s_end_ref, ds_ref, dq_ref,
                         dk_ref, dg_ref, **kw)
        return
    refs = (q_ref, k_ref, g_ref, v_ref, do_ref, dq32_ref, dq_ref, dk_ref, dv_ref, dg_ref)
    s0 = dq32_ref[...].astype(_F32) if fuse_dq else None
    _dkv_chunk(*refs, 0, ds_ref[...].astype(_F32), s_end_ref[...].astype(_F32), s0_KV=s0, **kw)


def _gla_bwd_dv_kernel(q_ref, k_ref, g_ref, do_ref, dst_ref, dv_ref, ds0_ref, *, n_chunks, **kw):
    # Sequential, split: q/k/g [Lp, K], do/dv [Lp, BV], dst/ds0 [K, BV]
    fn = lambda base, ci, ds: _dv_chunk(q_ref, k_ref, g_ref, do_ref, dv_ref, base, ds, **kw)
    ds0_ref[...] = _reverse_walk(n_chunks, kw["blocks"].chunk_size,
                                 dst_ref[...].astype(_F32), fn)


def _gla_bwd_dv_chunk_kernel(q_ref, k_ref, g_ref, do_ref, ds_ref, dv_ref, **kw):
    if _sliced(kw["blocks"]):
        _dv_chunk_sliced(q_ref, k_ref, g_ref, do_ref, ds_ref, dv_ref, **kw)
        return
    _dv_chunk(q_ref, k_ref, g_ref, do_ref, dv_ref, 0, ds_ref[...].astype(_F32), **kw)


def _dv_chunk_sliced(q_ref, k_ref, g_ref, do_ref, ds_ref, dv_ref, *, scale, blocks, dot_dtype):
    """dv = A^T do + (k * exp(e - c)) @ dS of one chunk (see _sliced), A and the second term
    summed over slices of Dk. q/k/g [C, K], do/dv [C, BV], ds [K, BV] at the chunk's end."""
    size = q_ref.shape[0]
    exp = _exp_fn(blocks)

    def k_end_ds(cols, q_mid, k_mid, e, m):
        return _dot((k_mid * exp(e - m)[None, :]).astype(dot_dtype),
                    ds_ref[cols, :].astype(dot_dtype))

    @pl.when(_guard_ok(g_ref))
    def _():
        a, dv = _scores_by_slices(q_ref, k_ref, g_ref, blocks, dot_dtype, k_end_ds,
                                  jnp.zeros(dv_ref.shape, _F32))
        a = jnp.where(_causal_mask(size), scale * a, 0.0).astype(dot_dtype)
        dv = dv + _dot(a, do_ref[...].astype(dot_dtype), ta=True)
        dv_ref[...] = dv.astype(dv_ref.dtype)


def _dk_chunk_sliced(q_ref, k_ref, g_ref, v_ref, do_ref, s0_ref, s_end_ref, ds_ref, dq_ref,
                     dk_ref, dg_ref, *, scale, blocks, dot_dtype):
    """dq, dk and dlog_g of one chunk (see _sliced; the split dk kernel with dq inside): the
    products over Dv (dA = do v^T, do @ S0^T, v @ dS^T, sum_v S_end * dS) summed over slices
    of Dv. q/k/g/dq/dk/dg [C, BK], v/do [C, V], s0/s_end/ds [BK, V]."""
    size, bk = q_ref.shape
    dv = v_ref.shape[1]
    vb = min(blocks.contract_slice, dv)
    exp = _exp_fn(blocks)

    @pl.when(_guard_ok(g_ref))
    def _():
        da = jnp.zeros((size, size), _F32)
        do_s = jnp.zeros((size, bk), _F32)
        v_ds = jnp.zeros((size, bk), _F32)
        acc = jnp.zeros((bk,), _F32)
        for h in range(dv // vb):
            cols = pl.ds(h * vb, vb)
            do = do_ref[:, cols].astype(dot_dtype)
            v = v_ref[:, cols].astype(dot_dtype)
            ds = ds_ref[:, cols]
            da = da + _dot(do, v, tb=True)
            do_s = do_s + _dot(do, s0_ref[:, cols].astype(dot_dtype), tb=True)
            v_ds = v_ds + _dot(v, ds.astype(dot_dtype), tb=True)
            acc = acc + jnp.sum(s_end_ref[:, cols].astype(_F32) * ds.astype(_F32), axis=1)
        c, e, m = _sub_chunk_gates(g_ref[...], size, blocks)
        up, down = exp(c - m[None, :]), exp(m[None, :] - c)
        causal = _causal_mask(size)
        q_mid = (q_ref[...].astype(_F32) * up).astype(dot_dtype)
        k_mid = (k_ref[...].astype(_F32) * down).astype(dot_dtype)
        dq = scale * (up * (exp(m)[None, :] * do_s
                            + _dot(jnp.where(causal, da, 0.0).astype(dot_dtype), k_mid)))
        da_s = jnp.where(causal, scale * da, 0.0).astype(dot_dtype)
        dk = down * (_dot(da_s, q_mid, ta=True) + exp(e - m)[None, :] * v_ds)
        x = q_ref[...].astype(_F32) * dq - k_ref[...].astype(_F32) * dk
        dg_ref[...] = (acc[None, :] + _reverse_cumsum_rows(x, blocks, dot_dtype)
                       ).astype(dg_ref.dtype)
        dq_ref[...] = dq.astype(dq_ref.dtype)
        dk_ref[...] = dk.astype(dk_ref.dtype)


def _dstates_acc(blocks):
    """GLABlocks.dstates_acc where it applies: the chunk-parallel dk kernels that take the
    state at the chunk's end (not the sliced one of guard "split")."""
    return (blocks.dstates_acc and blocks.schedule != "sequential"
            and not (_split_guard(blocks) and blocks.contract_slice is not None))


def _dkv_split(blocks, dk, dv):
    return blocks.dkv_split if blocks.dkv_split is not None else dk * dv > _DKV_FUSED_MAX


class _Specs:
    """BlockSpecs of one schedule: sequential grids (B, H, n), chunk-parallel (B, H, N, n) with n
    the block of the state; `rows(d, blocked)` tiles [B, Lp, H, D] inputs, `state(...)` the
    [B, H, (N,) K, V] states."""

    def __init__(self, sequential, lp, size):
        self.sequential, self.lp, self.size = sequential, lp, size

    def rows(self, width, blocked):
        blk = (lambda n: n) if blocked else (lambda n: 0)
        if self.sequential:
            return pl.BlockSpec((None, self.lp, None, width),
                                lambda i, j, n: (i, 0, j, blk(n)))
        return pl.BlockSpec((None, self.size, None, width),
                            lambda i, j, c, n: (i, c, j, blk(n)))

    def state(self, rows, cols, block_axis, shift=0, all_chunks=None):
        """[rows, cols] of a state; block_axis 0/1 is the one `n` walks. all_chunks=N: the
        sequential program's [N, rows, cols] (every chunk); shift: chunk-parallel chunk c + 1."""
        at = lambda n: (n, 0) if block_axis == 0 else (0, n)
        if self.sequential and all_chunks:
            return pl.BlockSpec((None, None, all_chunks, rows, cols),
                                lambda i, j, n: (i, j, 0, *at(n)))
        if self.sequential:
            return pl.BlockSpec((None, None, rows, cols), lambda i, j, n: (i, j, *at(n)))
        return pl.BlockSpec((None, None, None, rows, cols),
                            lambda i, j, c, n: (i, j, c + shift, *at(n)))


def _bwd_dq_pass(k, v, log_g, s0, states, do, *, scale, blocks, interpret):
    """dq in f32 and (sequential schedule) the state after each chunk; chunk-parallel: the
    stored states in, None out."""
    b, lp, h, dk = k.shape
    dv = v.shape[-1]
    n_chunks = lp // blocks.chunk_size
    kw = dict(scale=scale, blocks=blocks, dot_dtype=_dot_dtype(k))
    bk = min(blocks.block_k, dk)
    sp = _Specs(blocks.schedule == "sequential", lp, blocks.chunk_size)
    params = _gpu_params(blocks, blocks.num_warps_dq, bk, dv, interpret)
    dq_shape = jax.ShapeDtypeStruct(k.shape, _F32)
    if sp.sequential:
        return pl.pallas_call(
            functools.partial(_gla_bwd_dq_kernel, n_chunks=n_chunks, **kw),
            grid=(b, h, dk // bk),
            in_specs=[sp.rows(bk, True), sp.rows(dv, False), sp.rows(bk, True),
                      sp.rows(dv, False), sp.state(bk, dv, 0)],
            out_specs=[sp.rows(bk, True), sp.state(bk, dv, 0, all_chunks=n_chunks)],
            out_shape=[dq_shape, jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv),
                                                      _states_dtype(blocks, k))],
            name="gla_bwd_dq", **params,
        )(k, v, log_g, do, s0)
    dq32 = pl.pallas_call(
        functools.partial(_gla_bwd_dq_chunk_kernel, **kw),
        grid=(b, h, n_chunks, dk // bk),
        in_specs=[sp.rows(bk, True), sp.rows(dv, False), sp.rows(bk, True), sp.rows(dv, False),
                  sp.state(bk, dv, 0)],
        out_specs=sp.rows(bk, True),
        out_shape=dq_shape,
        name="gla_bwd_dq_chunks", **params,
    )(k, v, log_g, do, states)
    return dq32, None


def _bwd_dstates_pass(q, log_g, do, dst, *, scale, blocks, interpret, states=None):
    """Chunk-parallel schedule: dS at every chunk's end [B, H, N, K, V] and at the start; with
    `states` (GLABlocks.dstates_acc) also sum_v S_end * dS_end per chunk [B, H, N, K] f32."""
    b, lp, h, dk = q.shape
    dv = do.shape[-1]
    n_chunks = lp // blocks.chunk_size
    bk = min(blocks.states_block_k or blocks.block_k, dk)
    bv = min(blocks.states_block_v or dv, dv)
    tile = lambda width, blk: pl.BlockSpec((None, lp, None, width),
                                           lambda i, j, m, n: (i, 0, j, blk(m, n)))
    state = lambda *chunks: pl.BlockSpec((None, None, *chunks, bk, bv),
                                         lambda i, j, m, n: (i, j, *(0,) * len(chunks), m, n))
    in_specs = [tile(bk, lambda m, n: m), tile(bk, lambda m, n: m), tile(bv, lambda m, n: n),
                state()]
    out_specs = [state(n_chunks), state()]
    out_shape = [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), _states_dtype(blocks, q)),
                 jax.ShapeDtypeStruct(dst.shape, _F32)]
    args = (q, log_g, do, dst)
    with_acc = states is not None
    if with_acc:   # partial sums per tile of columns, summed below
        in_specs.append(state(n_chunks + 1))
        out_specs.append(pl.BlockSpec((None, None, None, n_chunks, bk),
                                      lambda i, j, m, n: (i, j, n, 0, m)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, dv // bv, n_chunks, dk), _F32))
        args += (states,)
    kernel = functools.partial(_gla_dstates_kernel, n_chunks=n_chunks, scale=scale,
                               blocks=dataclasses.replace(blocks, dstates_acc=with_acc),
                               dot_dtype=_dot_dtype(q))
    res = pl.pallas_call(
        kernel, grid=(b, h, dk // bk, dv // bv), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        name="gla_bwd_dstates", **_gpu_params(blocks, blocks.num_warps_dq, bk, bv, interpret),
    )(*args)
    if with_acc:
        return res[0], res[1], jnp.sum(res[2], axis=2)
    return res[0], res[1], None


def _bwd_dkv_pass(q, k, v, log_g, do, dq32, s_end, ds_in, *, scale, blocks, interpret,
                  acc=None):
    """dq (input dtype), dk, dv, dlog_g, and (sequential) dS at the start.

    Sequential: s_end [B, H, N, K, V] = the state after each chunk, ds_in = dS at the end of
    the sequence. Chunk-parallel: s_end = the stored states entering each chunk (N + 1 of
    them; a chunk's end state is the next one's), ds_in = dS at each chunk's end; dq32 None
    (one state step per chunk): the dk kernels compute dq from the state entering the chunk.
    acc [B, H, N, K] (GLABlocks.dstates_acc): sum_v S_end * dS_end per chunk, read by the dk
    kernels instead of the end states."""
    b, lp, h, dk = q.shape
    dv = v.shape[-1]
    n_chunks = lp // blocks.chunk_size
    ckw = dict(scale=scale, dot_dtype=_dot_dtype(q))   # chunk-parallel kernels take blocks later
    kw = dict(blocks=blocks, **ckw)
    sp = _Specs(blocks.schedule == "sequential", lp, blocks.chunk_size)
    shape = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
    shift = 0 if sp.sequential else 1
    end_states = lambda rows, cols, axis: (sp.state(rows, cols, axis, all_chunks=n_chunks)
                                           if sp.sequential else
                                           sp.state(rows, cols, axis, shift=shift))
    if acc is not None:   # the dk kernels' chunk-end term, [rows] of chunk c instead of S_end
        end_states = lambda rows, cols, axis: pl.BlockSpec(
            (None, None, None, rows), lambda i, j, c, n: (i, j, c, n))
        s_end_dk = acc
    else:
        s_end_dk = s_end
    grid = lambda nblk: (b, h, nblk) if sp.sequential else (b, h, n_chunks, nblk)
    seq = "" if sp.sequential else "_chunks"
    fuse = dq32 is None
    if fuse:
        assert not sp.sequential and blocks.sub_chunk == blocks.chunk_size
        dq32 = s_end   # the state entering each chunk takes dq32's place
    dq_spec = lambda rows, blocked: (sp.state(rows, dv, 0) if fuse else sp.rows(rows, blocked))
    chunk_kw = {} if sp.sequential else dict(fuse_dq=fuse)
    if not _dkv_split(blocks, dk, dv):
        rk, rv = sp.rows(dk, False), sp.rows(dv, False)
        outs = [shape(q), shape(k), shape(v), shape(log_g)]
        out_specs = [rk, rk, rv, rk]
        in_specs = [rk, rk, rk, rv, rv, dq_spec(dk, False), end_states(dk, dv, 0),
                    sp.state(dk, dv, 0)]
        params = dict(grid=grid(1), name="gla_bwd_dkv" + seq,
                      **_gpu_params(blocks, blocks.num_warps_dkv, dk, dv, interpret))
        args = (q, k, log_g, v, do, dq32, s_end_dk, ds_in)
        if sp.sequential:
            return tuple(pl.pallas_call(
                functools.partial(_gla_bwd_dkv_kernel, n_chunks=n_chunks, with_dv=True, **kw),
                in_specs=in_specs, out_specs=out_specs + [sp.state(dk, dv, 0)],
                out_shape=outs + [jax.ShapeDtypeStruct((b, h, dk, dv), _F32)], **params,
            )(*args))
        kern = functools.partial(_gla_bwd_dkv_chunk_kernel, with_dv=True, **chunk_kw, **ckw)
        res = _guarded_calls(blocks, lambda blk, prev: _chunk_call(
            kern, blk, prev, in_specs=in_specs, out_specs=out_specs, out_shape=outs,
            **params)(*args))
        return (*res, None)
    # Split: dv over blocks of dS's columns, dk / dlog_g over blocks of its rows; each program
    # carries half (or less) of dS and its outputs are exact (no partial sums).
    wide = not sp.sequential and dk <= 128   # GLABlocks.block_v_dkv None
    bv = min(blocks.block_v_dkv or (128 if wide else 64), dv)
    bk = min(blocks.block_k_dkv, dk)
    rk, rbv = sp.rows(dk, False), sp.rows(bv, True)
    dv_in = [rk, rk, rk, rbv, sp.state(dk, bv, 1)]
    dv_warps = blocks.num_warps_dkv or (4 if wide and blocks.block_v_dkv is None else None)
    dv_params = dict(grid=grid(dv // bv), name="gla_bwd_dv" + seq,
                     **_gpu_params(blocks, dv_warps, dk, bv, interpret))
    dv_args = (q, k, log_g, do, ds_in)
    if sp.sequential:
        dv_res = pl.pallas_call(
            functools.partial(_gla_bwd_dv_kernel, n_chunks=n_chunks, **kw), in_specs=dv_in,
            out_specs=[rbv, sp.state(dk, bv, 1)],
            out_shape=[shape(v), jax.ShapeDtypeStruct((b, h, dk, dv), _F32)], **dv_params,
        )(*dv_args)
    else:
        dv_res = _guarded_calls(blocks, lambda blk, prev: _chunk_call(
            functools.partial(_gla_bwd_dv_chunk_kernel, **ckw), blk, prev, in_specs=dv_in,
            out_specs=[rbv], out_shape=[shape(v)], **dv_params)(*dv_args))
    rbk, rv = sp.rows(bk, True), sp.rows(dv, False)
    dk_in = [rbk, rbk, rbk, rv, rv, dq_spec(bk, True), end_states(bk, dv, 0),
             sp.state(bk, dv, 0)]
    dk_out = dict(out_specs=[rbk, rbk, rbk], out_shape=[shape(q), shape(k), shape(log_g)])
    dk_params = dict(grid=grid(dk // bk), name="gla_bwd_dk" + seq,
                     **_gpu_params(blocks, blocks.num_warps_dkv, bk, dv, interpret))
    dk_args = (q, k, log_g, v, do, dq32, s_end_dk, ds_in)
    if sp.sequential:
        dq, dk_, dg = pl.pallas_call(
            functools.partial(_gla_bwd_dkv_kernel, n_chunks=n_chunks, with_dv=False, **kw),
            in_specs=dk_in, **dk_out, **dk_params)(*dk_args)
    else:
        dq, dk_, dg = _guarded_calls(blocks, lambda blk, prev: _chunk_call(
            functools.partial(_gla_bwd_dkv_chunk_kernel, with_dv=False, **chunk_kw, **ckw),
            blk, prev, in_specs=dk_in, **dk_out, **dk_params)(*dk_args))
    return dq, dk_, dv_res[0], dg, (dv_res[1] if sp.sequential else None)


def _gla_bwd_call(q, k, v, log_g, s0, states, do, dst, *, scale, blocks, interpret):
    kw = dict(scale=scale, blocks=blocks, interpret=interpret)
    if blocks.schedule != "sequential" and blocks.sub_chunk == blocks.chunk_size:
        dq32 = None   # computed in the dk kernels from the stored states: no dq pass
    else:
        dq32, s_end = _bwd_dq_pass(k, v, log_g, s0, states, do, **kw)
    if blocks.schedule == "sequential":
        return _bwd_dkv_pass(q, k, v, log_g, do, dq32, s_end, dst, **kw)
    acc_states = states if _dstates_acc(blocks) else None
    dstates, ds0, acc = _bwd_dstates_pass(q, log_g, do, dst, states=acc_states, **kw)
    dq, dk_, dv_, dg, _ = _bwd_dkv_pass(q, k, v, log_g, do, dq32, states, dstates, acc=acc,
                                        **kw)
    return dq, dk_, dv_, dg, ds0


# --------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: the same math, with the sequence walked by the grid instead of a loop.
# Inputs go to [B, H, L, D] so a chunk is a (C, D) tile; the grid is (B, H, chunks) with the
# chunk axis sequential ("arbitrary") and the state in a VMEM scratch. The state is kept
# transposed, S^T [Dv, Dk], so per-Dk decays scale lanes (no lane-to-sublane relayout), and
# the in-sub-chunk cumsum is a lower-triangular matmul (exact with HIGHEST precision).
# --------------------------------------------------------------------------------------------


def _tpu_dot(a, b, contract):
    """dot_general over `contract` = ((lhs dims), (rhs dims)), f32 accumulation."""
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=_F32)


_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))
_TPU_SUB = 16   # TPU kernels: one state step per 16 rows


def _tpu_gates(g_CK, sub):
    """As _sub_chunk_gates, the cumsum as a triangular matmul (Mosaic has no scan)."""
    tril = _causal_mask(sub).astype(_F32)
    c_CK = _tpu_dot(tril, g_CK, _NN)
    rows = lax.broadcasted_iota(jnp.int32, g_CK.shape, 0)
    m_K = jnp.sum(jnp.where(rows < sub // 2, g_CK, 0.0), axis=0)
    return c_CK, jnp.sum(g_CK, axis=0), m_K


def _tpu_carried(scratch_ref, init_ref):
    """The [V, K] state carried over the chunk axis (grid axis 2) in VMEM scratch: set from
    `init_ref` at the first chunk; returns its value."""
    @pl.when(pl.program_id(2) == 0)
    def _():
        scratch_ref[...] = init_ref[...]

    return scratch_ref[...]


def _tpu_rows(blocks, reverse=False):
    """Row slices of a chunk's sub-chunks (TPU: one state step per _TPU_SUB rows)."""
    order = range(blocks.chunk_size // _TPU_SUB)
    return [slice(j * _TPU_SUB, (j + 1) * _TPU_SUB)
            for j in (reversed(order) if reverse else order)]


def _tpu_advance(s_VK, k, v, c, c_end, dot_dtype):
    """S^T <- S^T diag(exp(c_end)) + V^T (K * exp(c_end - c)) over one sub-chunk."""
    k_out = (k * jnp.exp(c_end[None, :] - c)).astype(dot_dtype)
    return jnp.exp(c_end)[None, :] * s_VK + _tpu_dot(v, k_out, _TN)


def _gla_fwd_tpu_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, st_ref, s_ref, *, scale,
                        blocks, dot_dtype):
    # q/k/g [C, K], v/o [C, V], s0/st [V, K] (transposed), scratch s [V, K] f32
    causal = _causal_mask(_TPU_SUB)
    s_VK = _tpu_carried(s_ref, s0_ref)
    for rows in _tpu_rows(blocks):
        q = q_ref[rows, :].astype(_F32)
        k = k_ref[rows, :].astype(_F32)
        v = v_ref[rows, :].astype(dot_dtype)
        c, c_end, m = _tpu_gates(g_ref[rows, :].astype(_F32), _TPU_SUB)
        q_in = (q * jnp.exp(c)).astype(dot_dtype)
        q_mid = (q * jnp.exp(c - m[None, :])).astype(dot_dtype)
        k_mid = (k * jnp.exp(m[None, :] - c)).astype(dot_dtype)
        a = jnp.where(causal, _tpu_dot(q_mid, k_mid, _NT), 0.0).astype(dot_dtype)
        o = _tpu_dot(q_in, s_VK.astype(dot_dtype), _NT) + _tpu_dot(a, v, _NN)
        o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
        s_VK = _tpu_advance(s_VK, k, v, c, c_end, dot_dtype)
    s_ref[...] = s_VK
    st_ref[...] = s_VK


def _gla_bwd_dq_tpu_kernel(k_ref, v_ref, g_ref, do_ref, s0_ref, dq_ref, s_end_ref, s_ref, *,
                           scale, blocks, dot_dtype):
    # k/g/dq [C, K], v/do [C, V], s0/s_end [V, K], scratch s [V, K] f32
    causal = _causal_mask(_TPU_SUB)
    s_VK = _tpu_carried(s_ref, s0_ref)
    for rows in _tpu_rows(blocks):
        k = k_ref[rows, :].astype(_F32)
        v = v_ref[rows, :].astype(dot_dtype)
        do = do_ref[rows, :].astype(dot_dtype)
        c, c_end, m = _tpu_gates(g_ref[rows, :].astype(_F32), _TPU_SUB)
        k_mid = (k * jnp.exp(m[None, :] - c)).astype(dot_dtype)
        da = jnp.where(causal, _tpu_dot(do, v, _NT), 0.0).astype(dot_dtype)
        dq = (jnp.exp(c) * _tpu_dot(do, s_VK.astype(dot_dtype), _NN)
              + jnp.exp(c - m[None, :]) * _tpu_dot(da, k_mid, _NN))
        dq_ref[rows, :] = scale * dq
        s_VK = _tpu_advance(s_VK, k, v, c, c_end, dot_dtype)
    s_ref[...] = s_VK
    s_end_ref[...] = s_VK


def _gla_bwd_dkv_tpu_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dq32_ref, s_end_ref, dst_ref,
                            dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, ds_ref, *, scale, blocks,
                            dot_dtype):
    # Chunks in reverse order. q/k/g/dq32/dq/dk/dg [C, K], v/do/dv [C, V],
    # s_end/dst/ds0 [V, K], scratch ds [V, K] f32 (dS^T)
    sub = _TPU_SUB
    causal = _causal_mask(sub)
    ds_VK = _tpu_carried(ds_ref, dst_ref)
    acc_K = jnp.sum(s_end_ref[...] * ds_VK, axis=0)
    for rows in _tpu_rows(blocks, reverse=True):
        q = q_ref[rows, :].astype(_F32)
        k = k_ref[rows, :].astype(_F32)
        v = v_ref[rows, :].astype(dot_dtype)
        do = do_ref[rows, :].astype(dot_dtype)
        dq = dq32_ref[rows, :]
        c, c_end, m = _tpu_gates(g_ref[rows, :].astype(_F32), sub)
        q_mid = (q * jnp.exp(c - m[None, :])).astype(dot_dtype)
        k_mid = (k * jnp.exp(m[None, :] - c)).astype(dot_dtype)
        k_out = (k * jnp.exp(c_end[None, :] - c)).astype(dot_dtype)
        a = jnp.where(causal, scale * _tpu_dot(q_mid, k_mid, _NT), 0.0).astype(dot_dtype)
        da = jnp.where(causal, scale * _tpu_dot(do, v, _NT), 0.0).astype(dot_dtype)
        ds = ds_VK.astype(dot_dtype)
        dv = _tpu_dot(a, do, _TN) + _tpu_dot(k_out, ds, _NT)
        dk = (jnp.exp(m[None, :] - c) * _tpu_dot(da, q_mid, _TN)
              + jnp.exp(c_end[None, :] - c) * _tpu_dot(v, ds, _NN))
        x = q * dq - k * dk
        # Reverse cumsum inside the sub-chunk as an upper-triangular matmul.
        triu = jnp.logical_not(_causal_mask(sub)).astype(_F32) + jnp.eye(sub, dtype=_F32)
        dg_ref[rows, :] = (acc_K[None, :] + _tpu_dot(triu, x, _NN)).astype(dg_ref.dtype)
        acc_K = acc_K + jnp.sum(x, axis=0)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        q_in = (q * jnp.exp(c)).astype(dot_dtype)
        ds_VK = jnp.exp(c_end)[None, :] * ds_VK + scale * _tpu_dot(do, q_in, _TN)
    ds_ref[...] = ds_VK
    ds0_ref[...] = ds_VK


def _tpu_specs(b, h, lp, dk, dv, chunk, reverse=False):
    n = lp // chunk
    at = (lambda c: n - 1 - c) if reverse else (lambda c: c)
    seq = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, c: (i, j, at(c), 0))
    state = pl.BlockSpec((None, None, dv, dk), lambda i, j, c: (i, j, 0, 0))
    states = pl.BlockSpec((None, None, None, dv, dk), lambda i, j, c: (i, j, at(c), 0, 0))
    return seq(dk), seq(dv), state, states


def _tpu_params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False)


def _gla_fwd_tpu_call(q, k, v, log_g, s0, *, scale, blocks, interpret):
    # q/k/g [B, H, Lp, K], v [B, H, Lp, V], s0 [B, H, V, K]
    b, h, lp, dk = q.shape
    dv = v.shape[-1]
    seq_k, seq_v, state, _ = _tpu_specs(b, h, lp, dk, dv, blocks.chunk_size)
    return pl.pallas_call(
        functools.partial(_gla_fwd_tpu_kernel, scale=scale, blocks=blocks,
                          dot_dtype=_dot_dtype(q)),
        grid=(b, h, lp // blocks.chunk_size),
        in_specs=[seq_k, seq_k, seq_v, seq_k, state],
        out_specs=[seq_v, state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(s0.shape, _F32)],
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        name="gla_fwd_tpu",
        **_tpu_params(interpret),
    )(q, k, v, log_g, s0)


def _gla_bwd_tpu_call(q, k, v, log_g, s0, do, dst, *, scale, blocks, interpret):
    b, h, lp, dk = q.shape
    dv = v.shape[-1]
    n = lp // blocks.chunk_size
    dot_dtype = _dot_dtype(q)
    seq_k, seq_v, state, states = _tpu_specs(b, h, lp, dk, dv, blocks.chunk_size)
    dq32, s_end = pl.pallas_call(
        functools.partial(_gla_bwd_dq_tpu_kernel, scale=scale, blocks=blocks,
                          dot_dtype=dot_dtype),
        grid=(b, h, n),
        in_specs=[seq_k, seq_v, seq_k, seq_v, state],
        out_specs=[seq_k, states],
        out_shape=[jax.ShapeDtypeStruct(q.shape, _F32),
                   jax.ShapeDtypeStruct((b, h, n, dv, dk), _F32)],
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        name="gla_bwd_dq_tpu",
        **_tpu_params(interpret),
    )(k, v, log_g, do, s0)
    seq_k, seq_v, state, states = _tpu_specs(b, h, lp, dk, dv, blocks.chunk_size, reverse=True)
    shape = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
    return pl.pallas_call(
        functools.partial(_gla_bwd_dkv_tpu_kernel, scale=scale, blocks=blocks,
                          dot_dtype=dot_dtype),
        grid=(b, h, n),
        in_specs=[seq_k, seq_k, seq_v, seq_k, seq_v, seq_k, states, state],
        out_specs=[seq_k, seq_k, seq_v, seq_k, state],
        out_shape=[shape(q), shape(k), shape(v), shape(log_g), shape(s0, _F32)],
        scratch_shapes=[pltpu.VMEM((dv, dk), _F32)],
        name="gla_bwd_dkv_tpu",
        **_tpu_params(interpret),
    )(q, k, v, log_g, do, dq32, s_end, dst)


# --------------------------------------------------------------------------------------------
# custom_vjp over padded inputs: L a multiple of chunk_size, head dims powers of two >= 16.
# --------------------------------------------------------------------------------------------


def _dot_dtype(x):
    # bf16 feeds the tensor cores as is; f16 would overflow on the scaled operands, so f32.
    return jnp.bfloat16 if x.dtype == jnp.bfloat16 else _F32


def _fwd_call(mode, *args, **kwargs):
    """(o, final state, chunk states or None) from the kernels `mode` names."""
    interpret = mode.endswith("interpret")
    if mode.startswith("tpu"):
        return (*_gla_fwd_tpu_call(*args, interpret=interpret, **kwargs), None)
    return _gla_fwd_call(*args, interpret=interpret, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gla_pallas(q, k, v, log_g, s0, scale, blocks, mode):
    if blocks.schedule == "hybrid":   # no backward: no stored states
        blocks = dataclasses.replace(blocks, schedule="sequential")
    o, st, _ = _fwd_call(mode, q, k, v, log_g, s0, scale=scale, blocks=blocks)
    return o, st


def _gla_pallas_fwd(q, k, v, log_g, s0, scale, blocks, mode):
    o, st, states = _fwd_call(mode, q, k, v, log_g, s0, scale=scale, blocks=blocks)
    return (o, st), (q, k, v, log_g, s0, states)


def _gla_pallas_bwd(scale, blocks, mode, res, cotangents):
    q, k, v, log_g, s0, states = res
    do, dst = cotangents
    do, dst = do.astype(v.dtype), dst.astype(_F32)
    interpret = mode.endswith("interpret")
    if mode.startswith("tpu"):
        return _gla_bwd_tpu_call(q, k, v, log_g, s0, do, dst, scale=scale, blocks=blocks,
                                 interpret=interpret)
    return _gla_bwd_call(q, k, v, log_g, s0, states, do, dst, scale=scale, blocks=blocks,
                         interpret=interpret)


_gla_pallas.defvjp(_gla_pallas_fwd, _gla_pallas_bwd)


def _pow2_at_least_16(n):
    return max(16, 1 << (n - 1).bit_length())


def gla_pallas(q, k, v, log_g, *, scale=None, initial_state=None, blocks=GLABlocks(),
               interpret=False, target="gpu"):
    """The Pallas kernels on any shape: pads L and the head dims, runs, crops.

    target="gpu": the GPU-style kernels (Triton lowering); target="tpu": the Mosaic TPU kernels
    ([B, H, L, D] inside). interpret=True runs either in its interpret mode on CPU.
    Returns (o [B, L, H, Dv], final_state [B, H, Dk, Dv] f32).
    """
    b, length, h, dk = q.shape
    dv = v.shape[-1]
    scale = float(dk ** -0.5 if scale is None else scale)
    dkp, dvp = _pow2_at_least_16(dk), _pow2_at_least_16(dv)
    s0 = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None
          else initial_state.astype(_F32))
    # Padding rows have k = v = q = 0 and log_g = 0: they leave the state unchanged.
    pad = lambda x, d: jnp.pad(_common.pad_axis(x, 1, blocks.chunk_size),
                               ((0, 0), (0, 0), (0, 0), (0, d - x.shape[-1])))
    qp, kp, gp = (pad(x, dkp) for x in (q, k, log_g))
    vp = pad(v, dvp)
    s0p = jnp.pad(s0, ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
    mode = target + ("_interpret" if interpret else "")
    blocks = _pick_schedule(blocks, b, h, dvp)
    if target == "tpu":
        to_bhld = lambda x: rearrange(x, "b l h d -> b h l d")
        o, st = _gla_pallas(*map(to_bhld, (qp, kp, vp, gp)), jnp.swapaxes(s0p, 2, 3), scale,
                            blocks, mode)
        o, st = rearrange(o, "b h l d -> b l h d"), jnp.swapaxes(st, 2, 3)
    else:
        o, st = _gla_pallas(qp, kp, vp, gp, s0p, scale, blocks, mode)
    return o[:, :length, :, :dv], st[:, :, :dk, :dv]


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
    backend = _common.resolve_backend(backend)
    if backend == "reference":
        o, final = gla_chunked_reference(q, k, v, log_g, scale=scale,
                                         initial_state=initial_state)
    else:
        on_tpu = backend == "tpu_interpret" or (backend == "pallas"
                                                and _common.platform() == "tpu")
        o, final = gla_pallas(q, k, v, log_g, scale=scale, initial_state=initial_state,
                              interpret=backend.endswith("interpret"),
                              target="tpu" if on_tpu else "gpu")
    return (o, final) if return_state else o

"""Scaled dot-product attention: the pure-jnp reference and the public dispatch.

    o[b, i, h] = sum_j softmax_j(sm_scale * q[b, i, h] . k[b, j, g]) v[b, j, g]
    with g = h // (Hq // Hkv)

Shapes (batch-major, heads after length): q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], out [B, Lq, Hq, D].
Masks, all optional and combined:
  causal      query i sits at absolute position Lk - Lq + i (queries are the last Lq tokens) and
              sees keys j <= that position;
  window      sliding (local) window: query at position p sees keys p - window < j <= p (needs
              causal); window=None is unlimited;
  segment_ids [B, L] int (Lq == Lk): tokens see only keys of their own segment (packed sequences).
`decode_attention` is the single-step form used with a KV cache: q [B, T, Hq, D] against the first
`lengths[b]` entries of k/v caches [B, S, Hkv, D].

Kernels (FlashAttention-2, Dao 2023; FlashDecoding for the split-KV decode):
  forward   one program per (query block, batch, query head); an online softmax over KV blocks
            in base 2 (exp2, scale folded with log2 e) keeps the running max m, sum l and an f32
            accumulator, and saves lse = m + log2 l per row for the backward;
  backward  delta = rowsum(dO * O) (XLA), then a dq kernel (one program per query block, loops
            over KV blocks) and a dk/dv kernel (one program per KV block and KV head, loops over
            the query heads of its GQA group and their query blocks: K/V are never repeated);
  decode    one program per (batch, KV head, KV split): the GQA query heads x T tokens of a KV head
            form one tile; each split writes a partial output and its lse, combined exactly in XLA.
KV blocks that are fully masked (above the causal diagonal, outside the window) are never visited;
blocks that are fully visible skip the mask arithmetic. Lengths are padded to the block sizes and
the padding is masked inside. These GPU-style kernels lower through Pallas-Triton (see
docs/kernels/flash_attention.md); the Mosaic TPU variant lives in `attention_tpu.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common

MASK_VALUE = -1e30


def attention_mask(lq: int, lk: int, *, causal: bool, window: int | None,
                   segment_ids=None, q_offset=None):
    """Boolean mask [B or 1, Lq, Lk]: True where query i may attend to key j."""
    q_pos = jnp.arange(lq)[:, None] + (lk - lq if q_offset is None else q_offset)
    k_pos = jnp.arange(lk)[None, :]
    mask = jnp.ones((lq, lk), bool)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def attention_reference(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None):
    """Dense softmax attention in f32 (materialises the [B, H, Lq, Lk] scores)."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    q_BGRLD = rearrange(q.astype(jnp.float32), "b l (g r) d -> b g r l d", g=hkv)
    s = jnp.einsum("bgrqd,bkgd->bgrqk", q_BGRLD, k.astype(jnp.float32)) * sm_scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window,
                          segment_ids=segment_ids)
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    # Rows with no visible key (possible only with odd segment layouts) give zeros, not NaN.
    p = jnp.where(mask[:, None, None].any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bgrqk,bkgd->bgrqd", p, v.astype(jnp.float32))
    del hq
    return rearrange(o, "b g r l d -> b l (g r) d").astype(q.dtype)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, sm_scale=None, window=None):
    """q [B, T, Hq, D] are the last T of `lengths[b]` valid cache entries; causal among them."""
    t, s_max = q.shape[1], k_cache.shape[1]
    hkv, d = k_cache.shape[2], q.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    q_BGRTD = rearrange(q.astype(jnp.float32), "b t (g r) d -> b g r t d", g=hkv)
    s = jnp.einsum("bgrtd,bsgd->bgrts", q_BGRTD, k_cache.astype(jnp.float32)) * sm_scale
    q_pos = lengths[:, None, None] - t + jnp.arange(t)[None, :, None]     # [B, T, 1]
    k_pos = jnp.arange(s_max)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bgrts,bsgd->bgrtd", p, v_cache.astype(jnp.float32))
    return rearrange(o, "b g r t d -> b t (g r) d").astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Forward kernel (GPU-style; Triton lowering, or interpret mode on CPU)
# --------------------------------------------------------------------------------------------

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static description of one flash-attention call (hashable: it keys the custom_vjp)."""
    causal: bool
    window: int | None
    sm_scale: float
    lq: int                  # true lengths (the arrays the kernels see are padded)
    lk: int
    has_segments: bool
    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 3
    num_stages_bwd: int = 2
    fwd_impl: str = "triton"     # "mosaic": the Mosaic GPU forward (attention_mgpu, Hopper)
    mgpu_stages: int = 2
    mgpu_ping_pong: bool = True  # alternate the two consumer warpgroups (FA3 ping-pong)
    mgpu_tiles_fastest: bool = False  # Mosaic fwd/bwd grid: query (KV) tiles as the fastest
    #                                   CUDA grid axis instead of heads (L2 reuse at long N)
    mgpu_fwd_regs: tuple[int, int] = (232, 40)  # Mosaic fwd registers: consumer, producer
    mgpu_fwd_wgs: int = 2        # Mosaic fwd consumer warpgroups (block_q rows each); 3 wants
    #                              registers like (160, 24): 3 * 160 + 24 <= 512
    mgpu_fwd_opt_barrier: bool = False  # Mosaic fwd: optimization_barrier on (O, l, m, P) before
    #                                     the ping-pong arrive (JAX's attention_mgpu ordering)
    mgpu_fwd_overlap: bool = False  # Mosaic fwd: S_j issued with P_{j-1} V_{j-1}, softmax of
    #                                 S_j while P V runs (FA3's intra-warpgroup overlap)
    mgpu_fold_scale: bool = False  # Mosaic fwd: row max on raw scores, softmax scale folded
    #                                into exp2's argument (an FFMA instead of FMUL + FADD)
    mgpu_fwd_nab: bool = False  # Mosaic fwd compiled with unsafe_no_auto_barriers and no
    #                             cross-warp reduction scratch (row reductions stay in a warp)
    mgpu_fwd_reverse: bool = False  # Mosaic fwd: query tiles walked last-first (causal: the
    #                                 longest tiles start first, the short ones fill the tail)
    mgpu_fwd_persistent: int = 0  # Mosaic fwd: that many persistent CTAs (-1: one per SM)
    #                               walk the tiles, one K/V ring across tiles, the next Q
    #                               prefetched during the epilogue; 0: one CTA per tile
    mgpu_fwd_fa3_sched: bool = False  # Mosaic fwd, 2 consumers: FA3's ping-pong on two named
    #                                   barriers (S issue lets the other go; sync before P V)
    mgpu_fwd_skip_pad: bool = False  # Mosaic fwd: warpgroups whose rows are all length padding
    #                                  only wait/release their steps (no wgmma, no softmax)
    mgpu_fwd_early_kwait: bool = False  # Mosaic fwd: the next K awaited while P V runs (not
    #                                     at the start of the next step)
    mgpu_fwd_named_free: bool = False  # Mosaic fwd: "K/V slot consumed" signalled on hardware
    #                                    named barriers (bar.arrive / bar.sync) instead of
    #                                    mbarriers that every consumer thread arrives on
    mgpu_fwd_snake: bool = False  # Mosaic fwd, persistent: tiles in rounds, query tiles
    #                               slowest, CTA order alternating per round (causal balance)
    mgpu_fwd_q2: bool = False  # Mosaic fwd, persistent: two Q buffers per warpgroup, the next
    #                            tile's Q loaded after this tile's first step, O through Q's
    mgpu_fwd_warp_producer: bool = False  # Mosaic fwd (GPU path): one producer warp issues
    #                                       the K/V loads (the other three producer warps exit)
    mgpu_fwd_ob_split: bool = False  # Mosaic fwd: optimization barriers on (O, P) and on
    #                                  (l, m) after the row sum, before the V wait (tokamax)
    mgpu_fwd_lean_end: bool = False  # Mosaic fwd, FA3 + persistent (GPU path): consumer 0
    #                                  leaves a tile once consumer 1 is at its last P V sync
    mgpu_fwd_read_wait: bool = False  # Mosaic fwd: a CTA's last O / lse stores awaited only
    #                                   until SMEM is read (CUTLASS's tma_store_wait), not written
    mgpu_fwd_q_l2: bool = False  # Mosaic fwd, persistent (GPU path): the next tile's Q
    #                              prefetched into L2 at the start of each tile
    mgpu_fwd_tiles_fastest: bool = False  # Mosaic fwd only: query tiles fastest, then heads
    #                                       (tokamax's order; mgpu_tiles_fastest also
    #                                       reorders the backward's grid)
    bwd_impl: str = "split"      # "atomic": dq fused into the dk/dv kernel (f32 atomic adds);
    #                              "mosaic": the Mosaic GPU backward (attention_mgpu, Hopper)
    mgpu_stages_bwd: int = 2
    mgpu_bwd_dq: str = "halves"  # Mosaic dq: "halves" of D over both warpgroups' keys, or "own"
    mgpu_bwd_overlap: bool = False  # Mosaic bwd: S^T and dP^T issued together (P^T computed
    #                                 while dP^T runs), dS^T computed while dV runs (FA3 order)
    # Mosaic bwd registers (consumer, producer): 240/24 measured 1.13-1.16x 232/40 at D=128
    # (session 3, call 2; ptxas spills ~740 bytes per thread at D=128 with either).
    mgpu_bwd_regs: tuple[int, int] = (240, 24)
    mgpu_bwd_p_lo: bool = False  # Mosaic bwd, fewer live registers at the dV/dP^T step: dS^T
    #                              from the bf16 P^T, delta loaded after dP^T, scale in exp2
    mgpu_bwd_defer_dq: bool = False  # Mosaic bwd: dq of step t-1 issued with S^T/dP^T of step
    #                                  t (split dS barrier: the warpgroups are not in lock-step)
    mgpu_bwd_rows: bool = False  # Mosaic bwd: S, dP with query rows (row lse/delta), P and dS
    #                              through SMEM (FlashAttention-3's D=128 layout)
    mgpu_bwd_ds_early: bool = False  # Mosaic bwd with mgpu_bwd_rows: dS computed as soon as dP
    #                                  is done, before dV/dK are issued (no f32 P/dP tile live
    #                                  while the dK/dV accumulators are on the tensor cores)
    mgpu_bwd_dv_early: bool = False  # with mgpu_bwd_ds_early (or, session 8, mgpu_bwd_dk_late:
    #                                  the deferred dq's dV before the dP wait): dV issued as
    #                                  soon as P is in SMEM,
    #                                  dS computed while dV runs (GPU path; interpret mode runs
    #                                  the ds_early order)
    mgpu_bwd_persistent: int = 0  # Mosaic bwd without producer: that many persistent CTAs (-1:
    #                               one per SM) walk the KV tiles; the Q/dO ring runs on across
    #                               tiles and the next K/V loads during the dK/dV store
    mgpu_bwd_profile: str = ""   # Mosaic bwd diagnostics: a directory for Mosaic GPU's on-device
    #                              profiler (per-warpgroup prologue / step / epilogue ranges)
    mgpu_bwd_dq_fused: bool = False  # with mgpu_bwd_dv_early or mgpu_bwd_overlap: the dS
    #                                  barrier and the dq wgmma follow the dK issue in one wgmma
    #                                  state (dK, dq in flight together; GPU path)
    bwd_delta: str = "rowsum_barrier"  # delta = rowsum(dO * O) in XLA: "einsum" (sessions 1-4)
    #                              and "rowsum" both become one fusion with the [lse; delta]
    #                              stack that took 274-276 us at 4k (H200, session 5 call 2);
    #                              "rowsum_barrier" (the row reduction behind an optimization
    #                              barrier) is a reduction fusion of 35 us + a 2.5 us concat
    mgpu_bwd_producer: bool = True  # Mosaic bwd: False = no producer warpgroup (warpgroup 0
    #                                 issues the Q/dO loads after the per-step dS barrier), so
    #                                 the 2 consumers get 255 registers each instead of 240
    # Session 7 (opt-in until measured): the Mosaic backward compiled without automatic
    # barriers around SMEM stores / TMA issues (GPU path; the kernel's own commit_smem and
    # barriers order its SMEM traffic)
    mgpu_bwd_nab: bool = False
    mgpu_bwd_named_sync: bool = False  # Mosaic bwd: the per-step dS barrier of both consumer
    #                                    warpgroups on a hardware named barrier (bar.sync, 256
    #                                    threads) instead of an mbarrier arrive + wait
    mgpu_bwd_dq_swizzle: bool = False  # Mosaic bwd: the f32 dq staging tile in SMEM tiled and
    #                                    128-byte swizzled (bank-conflict-free stores) before its
    #                                    TMA reduce-add
    mgpu_bwd_late_refill: bool = False  # Mosaic bwd without producer, dq "halves" over 2
    #                                     warpgroups: warpgroup 0 issues the ring refill after
    #                                     its dq wgmma (while dq runs), not before it
    mgpu_bwd_fold_scale: bool = False  # Mosaic bwd: lse - log2(sm_scale) in the [lse; delta]
    #                                    input, so P carries sm_scale: no dq / dK multiply per
    #                                    step, dV divided by sm_scale once
    mgpu_bwd_early_exit: bool = False  # Mosaic bwd: the CTA's last wait is for its bulk stores
    #                                    to have read SMEM, not for the writes to complete
    mgpu_bwd_one_loop: bool = False  # Mosaic bwd with masking (causal / window / key padding):
    #                                  one loop over the query blocks with the mask under a
    #                                  uniform branch, instead of masked-edge and unmasked loops
    #                                  (three copies of the step body)
    mgpu_bwd_one_bar: bool = False  # Mosaic bwd: a step's Q, dO and [lse; delta] TMAs complete
    #                                 one mbarrier (3 arrivals): one wait per step, not three
    mgpu_bwd_dq_first: bool = False  # Mosaic bwd, rows + dV early, no producer: FA3's order,
    #                                  dq issued before dK after the dS barrier, dq stored while
    #                                  dK runs; the slot is released on its "free" mbarrier
    mgpu_bwd_wait_other_k: bool = True  # Mosaic bwd, deferred dq (session 8 fix): a warpgroup
    #                                     whose dq reads both warpgroups' K tiles also waits for
    #                                     the other one's K TMA before its first dq ("step -1",
    #                                     zero dS times unloaded SMEM: NaN dq when the stale SMEM
    #                                     held NaN / inf bit patterns). False: the session-6/7
    #                                     race, kept only to reproduce it on the GPU
    mgpu_bwd_dk_late: bool = False  # Mosaic bwd, rows + deferred dq without producer (session
    #                                 8): dK / dV accumulate in CTA-long wgmma accumulators and
    #                                 a step does not wait for them (the next step's dq wait
    #                                 does); the ring slot is refilled after that wait, on its
    #                                 "free" mbarrier, instead of at the dS barrier
    mgpu_bwd_dq_split: bool = False  # Mosaic bwd at head_dim 64, dq "halves" (session 9): both
    #                                  warpgroups compute dq, 32 columns each (at D 64 the
    #                                  default leaves dq to warpgroup 0: 3 of the 5 wgmmas'
    #                                  FLOPs of a step on one warpgroup, 2 on the other)
    mgpu_bwd_s_first: tuple[int, ...] = ()  # Mosaic bwd, rows + deferred dq + dV early without
    #                                         producer (session 9): the warpgroups (0, 1) that
    #                                         issue S_t, dP_t before dq_{t-1} (P computed while
    #                                         dP and dq run; dq sent once dV is issued)
    mgpu_bwd_dq_mid: bool = False  # Mosaic bwd, rows + deferred dq + dV early without producer
    #                                (session 12, the D 128 full and causal defaults in
    #                                MOSAIC_BWD_OPTS, at every Mosaic length):
    #                                dq_{t-1} issued after dS_t is in SMEM, before
    #                                dK_t, and sent while dK_t runs (no dq accumulator live with
    #                                S, dP, P: 192 f32 accumulator registers at the peak, not 224)
    mgpu_bwd_pingpong: bool = False  # Mosaic bwd at head_dim 128, rows + deferred dq without
    #                                  producer (session 9b, not timed yet): the per-step dS
    #                                  barrier replaced by one-way mbarriers (dS written / read
    #                                  per warpgroup and buffer); warpgroup 1 starts half a
    #                                  step behind warpgroup 0, which issues dq two steps late
    interpret: bool = False


def _dot(a, b, trans_b: bool = False):
    """a @ b (or a @ b.T) of two 2-D tiles with f32 accumulation (tensor cores on GPU)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _cdiv(x, d: int):
    """Ceil division of a non-negative traced int32 by a static int (lax.div truncates)."""
    return lax.div(x + (d - 1), d)


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _kv_block_range(q0, block_q: int, block_k: int, cfg: FlashConfig):
    """KV block range [lo, hi) seen by queries [q0, q0 + block_q), and its unmasked middle.

    Returns (lo, mid_lo, mid_hi, hi): blocks in [mid_lo, mid_hi) need no mask at all.
    """
    n_kv, n_full = pl.cdiv(cfg.lk, block_k), cfg.lk // block_k
    off = cfg.lk - cfg.lq                                  # position of query i is i + off
    q_first, q_last = q0 + off, q0 + block_q - 1 + off
    zero = jnp.int32(0)
    if cfg.causal:
        hi = _cdiv(_clip(q_last + 1, 0, cfg.lk), block_k)
        mid_hi = jnp.minimum(lax.div(jnp.maximum(q_first + 1, 0), block_k), n_full)
    else:
        hi, mid_hi = jnp.int32(n_kv), jnp.int32(n_full)
    if cfg.window is not None:
        lo = lax.div(jnp.maximum(q_first - cfg.window + 1, 0), block_k)
        mid_lo = _cdiv(jnp.maximum(q_last - cfg.window + 1, 0), block_k)
    else:
        lo, mid_lo = zero, zero
    mid_lo = _clip(mid_lo, lo, hi)
    mid_hi = mid_lo if cfg.has_segments else _clip(mid_hi, mid_lo, hi)
    return lo, mid_lo, mid_hi, hi


def _q_block_range(k0, block_q: int, block_k: int, lq_pad: int, cfg: FlashConfig):
    """Query blocks [lo, hi) that see any key of [k0, k0 + block_k), and the unmasked middle."""
    n_q = lq_pad // block_q
    off = cfg.lk - cfg.lq
    if cfg.causal:
        lo = lax.div(jnp.maximum(k0 - off, 0), block_q)
        mid_lo = _cdiv(jnp.maximum(k0 + block_k - 1 - off, 0), block_q)
    else:
        lo = mid_lo = jnp.int32(0)
    if cfg.window is not None:
        hi = _cdiv(_clip(k0 + block_k + cfg.window - 1 - off, 0, lq_pad), block_q)
        mid_hi = lax.div(jnp.maximum(k0 + cfg.window - off, 0), block_q)
    else:
        hi = mid_hi = jnp.int32(n_q)
    lo, hi = jnp.minimum(lo, n_q), jnp.minimum(hi, n_q)
    mid_lo = _clip(mid_lo, lo, hi)
    mid_hi = _clip(mid_hi, mid_lo, hi)
    if cfg.has_segments:
        mid_hi = mid_lo
    elif cfg.lk % block_k:
        mid_hi = jnp.where(k0 + block_k > cfg.lk, mid_lo, mid_hi)   # the padded last KV block
    return lo, mid_lo, mid_hi, hi


SEG_LANES = 16      # per-block ranges travel as 16 equal lanes: a vector load, then a reduction


def _segment_block_ranges(seg, row_block: int, n_row_blocks: int, col_block: int,
                          n_col_blocks: int):
    """Column-block range [lo, hi) that can share a segment with each row block.

    For packed sequences (segment ids non-decreasing along each row of `seg` [B, L]) the keys of
    a row block's segments are contiguous: from the first key of its first segment to the last
    key of its last one. Rows of `seg` that are not sorted get the full range (no skipping).
    Returns lo, hi as int32 [B, n_row_blocks, SEG_LANES].
    """
    length = seg.shape[1]
    starts = jnp.arange(n_row_blocks) * row_block
    first = jnp.minimum(starts, length - 1)
    last = jnp.minimum(starts + row_block - 1, length - 1)
    key_lo = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="left"))(seg, seg[:, first])
    key_hi = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="right"))(seg, seg[:, last])
    packed = jnp.all(seg[:, 1:] >= seg[:, :-1], axis=1, keepdims=True)
    lo = jnp.where(packed, key_lo // col_block, 0)
    hi = jnp.where(packed, -(-key_hi // col_block), n_col_blocks)
    lanes = (*lo.shape, SEG_LANES)
    return (jnp.broadcast_to(lo[..., None], lanes).astype(jnp.int32),
            jnp.broadcast_to(hi[..., None], lanes).astype(jnp.int32))


def _narrow_to_segments(lo, hi, seg_lo_ref, seg_hi_ref):
    """Intersect a block range with the segment range; every visited block is then masked."""
    lo = jnp.maximum(lo, jnp.max(seg_lo_ref[...]))
    hi = jnp.maximum(jnp.minimum(hi, jnp.min(seg_hi_ref[...])), lo)
    return lo, lo, lo, hi


def _mask(q_pos, k_pos, q_seg, k_seg, cfg: FlashConfig, transposed: bool = False):
    """Visibility [len(q_pos), len(k_pos)] (or its transpose) from positions and segment ids."""
    def row(x):
        return x[None, :] if transposed else x[:, None]

    def col(x):
        return x[:, None] if transposed else x[None, :]

    q_pos, k_pos = row(q_pos), col(k_pos)
    mask = k_pos < cfg.lk
    if cfg.causal:
        mask &= k_pos <= q_pos
    if cfg.window is not None:
        mask &= k_pos > q_pos - cfg.window
    if q_seg is not None:
        mask &= row(q_seg) == col(k_seg)
    return mask


def _fwd_kernel(*refs, cfg: FlashConfig):
    if cfg.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, slo_ref, shi_ref, o_ref, lse_ref = refs
        q_seg = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg = None
    bq, bk = cfg.block_q, cfg.block_k
    q0 = pl.program_id(0) * bq
    q_BqD = q_ref[...]
    q_pos = q0 + jnp.arange(bq) + (cfg.lk - cfg.lq)
    scale = cfg.sm_scale * LOG2E                           # softmax in base 2: exp2 is cheaper

    def body(j, carry, masked):
        acc, m, l = carry
        k0 = j * bk
        k_BkD = k_ref[pl.ds(k0, bk), :]
        s = _dot(q_BqD, k_BkD, trans_b=True) * scale    # [bq, bk] f32
        if masked:
            k_seg = kseg_ref[pl.ds(k0, bk)] if cfg.has_segments else None
            mask = _mask(q_pos, k0 + jnp.arange(bk), q_seg, k_seg, cfg)
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v_BkD = v_ref[pl.ds(k0, bk), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v_BkD.dtype), v_BkD)
        return acc, m_new, l

    # m starts finite so that fully masked rows (s = -inf) give p = 0 instead of NaN.
    carry = (jnp.zeros((bq, q_BqD.shape[1]), jnp.float32),
             jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    lo, mid_lo, mid_hi, hi = _kv_block_range(q0, bq, bk, cfg)
    if cfg.has_segments:
        lo, mid_lo, mid_hi, hi = _narrow_to_segments(lo, hi, slo_ref, shi_ref)
    carry = lax.fori_loop(lo, mid_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(mid_hi, hi, functools.partial(body, masked=True), carry)
    empty = l == 0.0                                       # rows that see no key: output 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))   # +inf makes p = 0 in backward


def _pad_inputs(q, k, v, segment_ids, block_q: int, block_k: int):
    """Pad lengths to the block sizes (segment id -1 marks padding)."""
    q = _common.pad_axis(q, 1, block_q)
    k = _common.pad_axis(k, 1, block_k)
    v = _common.pad_axis(v, 1, block_k)
    segs = ()
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        segs = (_common.pad_axis(seg, 1, block_q, -1), _common.pad_axis(seg, 1, block_k, -1))
    return q, k, v, segs


def _flash_forward(q, k, v, segment_ids, cfg: FlashConfig):
    """Returns o [B, Lq, Hq, D] and lse [B, Hq, Lq_pad] (base 2, f32)."""
    if cfg.fwd_impl == "mosaic":
        from pallas_kernels import attention_mgpu
        return attention_mgpu.mosaic_forward(q, k, v, cfg, stages=cfg.mgpu_stages,
                                             ping_pong=cfg.mgpu_ping_pong,
                                             interpret=cfg.interpret)
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    bq, bk = cfg.block_q, cfg.block_k
    qp, kp, vp, segs = _pad_inputs(q, k, v, segment_ids, bq, bk)
    lq_pad, lk_pad = qp.shape[1], kp.shape[1]
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
        pl.BlockSpec((None, lk_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0)),
        pl.BlockSpec((None, lk_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0)),
    ]
    if segs:
        segs += _segment_block_ranges(segment_ids, bq, lq_pad // bq, bk, lk_pad // bk)
        lanes = pl.BlockSpec((None, None, SEG_LANES), lambda i, b_, h: (b_, i, 0))
        in_specs += [pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
                     pl.BlockSpec((None, lk_pad), lambda i, b_, h: (b_, 0)), lanes, lanes]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(lq_pad // bq, b, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, lq_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(qp, kp, vp, *segs)
    return o[:, :lq], lse


# --------------------------------------------------------------------------------------------
# Backward kernels: dq (one program per query block) and dk/dv (one per KV block and KV head)
# --------------------------------------------------------------------------------------------

def _dq_kernel(*refs, cfg: FlashConfig):
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, slo_ref, shi_ref,
         dq_ref) = refs
        q_seg = qseg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg = None
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    q0 = pl.program_id(0) * bq
    q_BqD, do_BqD = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = q0 + jnp.arange(bq) + (cfg.lk - cfg.lq)
    scale = cfg.sm_scale * LOG2E

    def body(j, dq, masked):
        k0 = j * bk
        k_BkD, v_BkD = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
        s = _dot(q_BqD, k_BkD, trans_b=True) * scale
        if masked:
            k_seg = kseg_ref[pl.ds(k0, bk)] if cfg.has_segments else None
            s = jnp.where(_mask(q_pos, k0 + jnp.arange(bk), q_seg, k_seg, cfg), s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do_BqD, v_BkD, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k_BkD.dtype), k_BkD)

    dq = jnp.zeros((bq, q_BqD.shape[1]), jnp.float32)
    lo, mid_lo, mid_hi, hi = _kv_block_range(q0, bq, bk, cfg)
    if cfg.has_segments:
        lo, mid_lo, mid_hi, hi = _narrow_to_segments(lo, hi, slo_ref, shi_ref)
    dq = lax.fori_loop(lo, mid_lo, functools.partial(body, masked=True), dq)
    dq = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(mid_hi, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: FlashConfig, rep: int, lq_pad: int):
    """dk, dv of one KV block; with bwd_impl="atomic" also dq += dS K by f32 atomic adds
    (FlashAttention-2's fused backward: S and dP are computed once instead of twice)."""
    fused_dq = cfg.bwd_impl == "atomic"
    if fused_dq:
        dq_ref = refs[-1]                                  # aliased to the zero dq_acc input
        refs = refs[:-4] + refs[-3:-1]
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, slo_ref, shi_ref,
         dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    k0 = pl.program_id(0) * bk
    g = pl.program_id(2)
    k_BkD, v_BkD = k_ref[...], v_ref[...]
    k_pos = k0 + jnp.arange(bk)
    k_seg = kseg_ref[...] if cfg.has_segments else None
    scale = cfg.sm_scale * LOG2E
    lo, mid_lo, mid_hi, hi = _q_block_range(k0, bq, bk, lq_pad, cfg)
    if cfg.has_segments:
        lo, mid_lo, mid_hi, hi = _narrow_to_segments(lo, hi, slo_ref, shi_ref)

    def body(i, carry, h, masked):
        dk, dv = carry
        q0 = i * bq
        q_BqD, do_BqD = q_ref[pl.ds(q0, bq), h, :], do_ref[pl.ds(q0, bq), h, :]
        lse, delta = lse_ref[h, pl.ds(q0, bq)], delta_ref[h, pl.ds(q0, bq)]
        st = _dot(k_BkD, q_BqD, trans_b=True) * scale        # s transposed: [bk, bq]
        if masked:
            q_seg = qseg_ref[pl.ds(q0, bq)] if cfg.has_segments else None
            q_pos = q0 + jnp.arange(bq) + (cfg.lk - cfg.lq)
            st = jnp.where(_mask(q_pos, k_pos, q_seg, k_seg, cfg, transposed=True), st,
                           -jnp.inf)
        pt = jnp.exp2(st - lse[None, :])
        dv = dv + _dot(pt.astype(do_BqD.dtype), do_BqD)
        dpt = _dot(v_BkD, do_BqD, trans_b=True)
        dst = pt * (dpt - delta[None, :])
        ds_lo = dst.astype(q_BqD.dtype)
        dk = dk + _dot(ds_lo, q_BqD)
        if fused_dq:
            dq = lax.dot_general(ds_lo, k_BkD, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            plgpu.atomic_add(dq_ref, (pl.ds(q0, bq), h, slice(None)), dq * cfg.sm_scale)
        return dk, dv

    def head(r, carry):                                     # the query heads of this KV head
        h = g * rep + r
        carry = lax.fori_loop(lo, mid_lo, functools.partial(body, h=h, masked=True), carry)
        carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, h=h, masked=False), carry)
        return lax.fori_loop(mid_hi, hi, functools.partial(body, h=h, masked=True), carry)

    zeros = jnp.zeros(k_BkD.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, rep, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_delta(o, do, mode: str = "rowsum_barrier"):
    """delta [B, H, L] (f32): delta_i = sum_d dO_id O_id, the row term of the softmax
    Jacobian; padded rows give 0. `mode`: FlashConfig.bwd_delta."""
    o32, do32 = o.astype(jnp.float32), do.astype(jnp.float32)
    if mode == "einsum":
        return jnp.einsum("blhd,blhd->bhl", o32, do32)
    if mode not in ("rowsum", "rowsum_barrier"):
        raise ValueError(f"bwd_delta must be 'einsum', 'rowsum' or 'rowsum_barrier', got {mode!r}")
    delta = jnp.sum(o32 * do32, axis=-1)                   # [B, L, H]: reduce the minor dim
    if mode == "rowsum_barrier":
        delta = lax.optimization_barrier(delta)
    return jnp.swapaxes(delta, 1, 2)


def _flash_backward(q, k, v, segment_ids, o, lse, do, cfg: FlashConfig):
    if cfg.bwd_impl == "mosaic":
        from pallas_kernels import attention_mgpu
        return attention_mgpu.mosaic_backward(q, k, v, o, lse, do, cfg,
                                              stages=cfg.mgpu_stages_bwd,
                                              interpret=cfg.interpret)
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    cparams = plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    delta = backward_delta(o, do, cfg.bwd_delta)

    # dq: blocks (block_q_dq, block_k_dq); lse was saved with the forward's padding.
    fused_dq = cfg.bwd_impl == "atomic"
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    blk = max(bq, cfg.block_q_dkv, cfg.block_q)
    qp, kp, vp, segs = _pad_inputs(q, k, v, segment_ids, blk, max(bk, cfg.block_k_dkv))
    dop = _common.pad_axis(do, 1, blk)
    lq_pad, lk_pad = qp.shape[1], kp.shape[1]
    lse = _common.pad_axis(lse[:, :, :lq], 2, blk)
    delta = _common.pad_axis(delta, 2, blk)
    if segs:
        seg = segment_ids.astype(jnp.int32)
        segs = (_common.pad_axis(seg, 1, blk, -1), _common.pad_axis(seg, 1, lk_pad, -1))
    full_kv = pl.BlockSpec((None, lk_pad, None, d), lambda i, b_, h: (b_, 0, h // rep, 0))
    q_blk = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    in_specs = [q_blk, full_kv, full_kv, q_blk, row_blk, row_blk]
    seg_ranges = ()
    if segs:
        seg_ranges = _segment_block_ranges(seg, bq, lq_pad // bq, bk, lk_pad // bk)
        lanes = pl.BlockSpec((None, None, SEG_LANES), lambda i, b_, h: (b_, i, 0))
        in_specs += [pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
                     pl.BlockSpec((None, lk_pad), lambda i, b_, h: (b_, 0)), lanes, lanes]
    dq = None if fused_dq else pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(lq_pad // bq, b, hq),
        in_specs=in_specs,
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(qp, kp, vp, dop, lse, delta, *segs, *seg_ranges)

    # dk, dv: each program owns one KV block of one KV head and visits its `rep` query heads.
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, b_, g: (b_, j, g, 0))
    full_q = pl.BlockSpec((None, lq_pad, hq, d), lambda j, b_, g: (b_, 0, 0, 0))
    full_rows = pl.BlockSpec((None, hq, lq_pad), lambda j, b_, g: (b_, 0, 0))
    in_specs = [full_q, kv_blk, kv_blk, full_q, full_rows, full_rows]
    if segs:
        seg_ranges = _segment_block_ranges(seg, bk, lk_pad // bk, bq, lq_pad // bq)
        lanes = pl.BlockSpec((None, None, SEG_LANES), lambda j, b_, g: (b_, j, 0))
        in_specs += [pl.BlockSpec((None, lq_pad), lambda j, b_, g: (b_, 0)),
                     pl.BlockSpec((None, bk), lambda j, b_, g: (b_, j)), lanes, lanes]
    out_specs = [kv_blk, kv_blk]
    out_shape = [jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)]
    extra, aliases = (), {}
    if fused_dq:                                           # dq accumulates in f32 across programs
        extra = (jnp.zeros(qp.shape, jnp.float32),)
        in_specs.append(full_q)
        out_specs.append(full_q)
        out_shape.append(jax.ShapeDtypeStruct(qp.shape, jnp.float32))
        aliases = {len(in_specs) - 1: 2}
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, rep=rep, lq_pad=lq_pad),
        grid=(lk_pad // bk, b, hkv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=cparams,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(qp, kp, vp, dop, lse, delta, *segs, *seg_ranges, *extra)
    dk, dv = outs[:2]
    if fused_dq:
        dq = outs[2].astype(q.dtype)
    lk = k.shape[1]
    return dq[:, :lq], dk[:, :lk], dv[:, :lk]


# --------------------------------------------------------------------------------------------
# custom_vjp glue
# --------------------------------------------------------------------------------------------

_flash = _common.lse_attention_vjp(_flash_forward, _flash_backward)


# --------------------------------------------------------------------------------------------
# Decode: split-KV forward (FlashDecoding) with an exact log-sum-exp combine
# --------------------------------------------------------------------------------------------

def _decode_kernel(q_ref, k_ref, v_ref, len_ref, o_ref, lse_ref, *, sm_scale: float,
                   window: int | None, t: int, block_k: int, blocks_per_split: int):
    """One (batch, KV head, split): rows are the GQA heads x T tokens of that KV head."""
    q_MD = q_ref[...]
    m_rows = q_MD.shape[0]
    lens = len_ref[...]                                    # [M] the same value in every row
    length = jnp.max(lens)
    # Row m is token m % T (rows past rep * T are padding and see what token T - 1 sees).
    q_pos = lens - t + jnp.minimum(jnp.arange(m_rows) % t, t - 1)
    split = pl.program_id(2)
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, _cdiv(jnp.maximum(length, 0), block_k))
    if window is not None:
        lo = jnp.maximum(lo, lax.div(jnp.maximum(length - t - window + 1, 0), block_k))
    scale = sm_scale * LOG2E

    def body(j, carry):
        acc, m, l = carry
        k0 = j * block_k
        k_BkD, v_BkD = k_ref[pl.ds(k0, block_k), :], v_ref[pl.ds(k0, block_k), :]
        s = _dot(q_MD, k_BkD, trans_b=True) * scale
        k_pos = (k0 + jnp.arange(block_k))[None, :]
        mask = k_pos <= q_pos[:, None]
        if window is not None:
            mask &= k_pos > q_pos[:, None] - window
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v_BkD.dtype), v_BkD)
        return acc, m_new, l

    carry = (jnp.zeros(q_MD.shape, jnp.float32), jnp.full((m_rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((m_rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    empty = l == 0.0                                       # an empty split weighs 0 in the combine
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(l))


def _decode_forward(q, k_cache, v_cache, lengths, *, sm_scale, window, interpret,
                    block_k=None, num_splits=None, num_warps=4, num_stages=2):
    b, t, hq, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    rep = hq // hkv
    block_k = block_k or min(128, max(16, pl.next_power_of_2(s_max)))
    n_blocks = pl.cdiv(s_max, block_k)
    if num_splits is None:
        # Enough programs to cover the H200's 132 SMs about twice, splits of >= 4 KV blocks.
        num_splits = max(1, min(pl.cdiv(264, b * hkv), n_blocks // 4))
    blocks_per_split = pl.cdiv(n_blocks, num_splits)
    num_splits = pl.cdiv(n_blocks, blocks_per_split)
    m_rows = max(16, pl.next_power_of_2(rep * t))          # tensor-core tiles need >= 16 rows
    q_BGMD = rearrange(q, "b t (g r) d -> b g (r t) d", g=hkv)
    q_BGMD = jnp.pad(q_BGMD, ((0, 0), (0, 0), (0, m_rows - rep * t), (0, 0)))
    kp = _common.pad_axis(k_cache, 1, block_k)
    vp = _common.pad_axis(v_cache, 1, block_k)
    lens_BM = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None], (b, m_rows))
    kv_spec = pl.BlockSpec((None, kp.shape[1], None, d), lambda b_, g, s: (b_, 0, g, 0))
    o_part, lse_part = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=sm_scale, window=window, t=t,
                          block_k=block_k, blocks_per_split=blocks_per_split),
        grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, None, m_rows, d), lambda b_, g, s: (b_, g, 0, 0)),
                  kv_spec, kv_spec,
                  pl.BlockSpec((None, m_rows), lambda b_, g, s: (b_, 0))],
        out_specs=[pl.BlockSpec((None, None, None, m_rows, d), lambda b_, g, s: (b_, g, s, 0, 0)),
                   pl.BlockSpec((None, None, None, m_rows), lambda b_, g, s: (b_, g, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, m_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, m_rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_decode",
    )(q_BGMD, kp, vp, lens_BM)
    # Exact combine of the splits' partial softmaxes (base-2 lse).
    lse_max = jnp.max(lse_part, axis=2, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse_part - lse_max)                       # [B, G, S, M]
    denom = jnp.sum(w, axis=2)
    o = jnp.einsum("bgsm,bgsmd->bgmd", w, o_part) / jnp.where(denom == 0, 1.0, denom)[..., None]
    o = rearrange(o[:, :, :rep * t], "b g (r t) d -> b t (g r) d", t=t)
    return o.astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Public functions and dispatch
# --------------------------------------------------------------------------------------------

def _check_attention_args(q, k, v, segment_ids, window, causal):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(name, x, 4, "[batch, length, heads, head_dim]")
        _common.check_float(name, x)
    b, lq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Lk, Hkv, D], got k {k.shape}, "
                         f"v {v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must have shape [{b}, Lk, Hkv, {d}] to match q {q.shape}, "
                         f"got {k.shape}")
    if hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[2]})")
    if segment_ids is not None:
        if lq != k.shape[1]:
            raise ValueError("segment_ids needs q and k of the same length, got "
                             f"{lq} and {k.shape[1]}")
        if segment_ids.shape != (b, lq):
            raise ValueError(f"segment_ids must have shape [{b}, {lq}], got {segment_ids.shape}")
    if window is not None:
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")


# Mosaic GPU forward tiles per (head dim, causal): block_q rows per consumer warpgroup, block_k,
# ring depth. D=128 from the call-1 msweep (block_k 128 with 2 stages 597 TFLOP/s at 4k; 3 stages
# exceed SMEM); D=64 from the call-2 sweep at 4k (full: 128 x 128 / 2 stages 387 vs Triton 329;
# causal: 64 x 128 / 3 stages 324 vs Triton 268; 128 x 128 is 226 there).
# mgpu_fold_scale (scale folded into exp2's argument) where it measured faster (session 3, call 2,
# N=4k forward TFLOP/s: D=128 full 616 vs 593, causal 519 vs 504, D=64 full 405 vs 382; D=64
# causal 317 vs 326 keeps the plain form). D=64 full since session 4: three consumer warpgroups of
# 64 rows without ping-pong (no spills at 160 registers; the 128 x 128 tiles spill 156 bytes),
# N=4k forward 419 vs 413 (call 1) and 425 vs 414 (call 2), GPU-checked (D 64 full GQA 1000).
# Session 5 (call 2, same GPU, TFLOP/s at 4k / 16k / 1k; GPU-checked): causal cells walk the
# query tiles last-first (mgpu_fwd_reverse) and compile without automatic barriers
# (mgpu_fwd_nab): D=128 causal 539 / 584 / 370 vs 526 / 563 / 371; D=64 causal in addition
# FA3's named-barrier ping-pong, the folded scale and a 2-deep ring: 391 / 443 / 249 vs
# 350 / 396 / 229 (cuDNN 383 / 422 / 281, tokamax 374 / 432 / 261).
# Session 6 (same process each, GPU-checked; docs/kernels/flash_attention.md): D=128 full without
# automatic barriers (nab) at 4k 575 vs 569 / 570 (call 1) and 577 vs 569 / 571 (call 2);
# D=128 causal with FA3's named-barrier ping-pong and the next K awaited during P V (kw) at 4k
# 575 vs 524 / 542 (call 1) and 518 vs 514 / 559 (call 2: the default's two rows 9% apart),
# 16k 588 vs 583, 1k 384 vs 375 (call 2).
# Session 7 (interleaved A B A B timing, 20 rounds, GPU-checked; docs/kernels/flash_attention.md
# "Session 7: forward"): D=128 full on tokamax's structure (_TOKAMAX_FWD: persistent CTAs, FA3's
# named barriers, the early K wait, one producer warp, named-barrier slot release, the split
# optimization barriers, tokamax's tile end, the last stores awaited until read) 574 vs 538
# TFLOP/s at 4k (vs_default 1.069), 601 vs 578 at 16k, 520 vs 495 at 1k; D=128 causal with the
# read wait, one producer warp, named slot release and the split barriers at 16k 590 vs 578
# (call 2) and 597 vs 585 (call 1), 4k 529 vs 523 (call 1); D=64 full at 4k two warpgroups on
# _TOKAMAX_FWD 436 vs 416 (MOSAIC_FWD_SHORT).
_TOKAMAX_FWD = dict(mgpu_fwd_nab=True, mgpu_fwd_persistent=-1, mgpu_fwd_fa3_sched=True,
                    mgpu_fwd_early_kwait=True, mgpu_fwd_warp_producer=True,
                    mgpu_fwd_named_free=True, mgpu_fwd_ob_split=True, mgpu_fwd_lean_end=True,
                    mgpu_fwd_read_wait=True)
_CAUSAL_128_S7 = dict(mgpu_fwd_read_wait=True, mgpu_fwd_warp_producer=True,
                      mgpu_fwd_named_free=True, mgpu_fwd_ob_split=True)
MOSAIC_FWD_BLOCKS = {(128, False): dict(block_q=64, block_k=128, mgpu_stages=2,
                                        mgpu_fold_scale=True, **_TOKAMAX_FWD),
                     (128, True): dict(block_q=64, block_k=128, mgpu_stages=2,
                                       mgpu_fold_scale=True, mgpu_fwd_reverse=True,
                                       mgpu_fwd_nab=True, mgpu_fwd_fa3_sched=True,
                                       mgpu_fwd_early_kwait=True, **_CAUSAL_128_S7),
                     (64, False): dict(block_q=64, block_k=128, mgpu_stages=2,
                                       mgpu_fold_scale=True, mgpu_fwd_wgs=3,
                                       mgpu_fwd_regs=(160, 24), mgpu_ping_pong=False),
                     (64, True): dict(block_q=64, block_k=128, mgpu_stages=2,
                                      mgpu_fold_scale=True, mgpu_fwd_fa3_sched=True,
                                      mgpu_fwd_reverse=True, mgpu_fwd_nab=True)}


# Mosaic GPU forward options for short queries, per (head dim, causal): ((max_lq, options), ...);
# the first entry with lq <= max_lq is applied on top of MOSAIC_FWD_BLOCKS. Session 5, call 1,
# N=1k (GPU-checked): persistent CTAs, one per SM (the prologue and epilogue of 8-step CTAs
# overlap the next tile's loads): D=128 full with nab 531 vs 483 TFLOP/s (tokamax 533). At 4k
# persistent CTAs measured -1% to +1%. D=64 full, session 6 call 1 (same process, GPU-checked):
# two 64-row warpgroups with FA3's named-barrier ping-pong on persistent CTAs without automatic
# barriers (tokamax's structure) 385 vs 315 (three warpgroups, persistent, skip_pad) at 1k and
# 417 vs 383 (three warpgroups) at 2k; tokamax 405 / 437, cuDNN 385 / 419; call 2: 384 at 1k
# (tokamax 405, cuDNN 388). D=64 causal at 1k, session 6 call 2: persistent CTAs over snake
# rounds (mgpu_fwd_snake) with the named-barrier slot release 263 vs 249 (cuDNN 283).
# Session 7: D=128 full needs no entry (its default is persistent at every length); D=128
# causal up to 1k keeps the session-6 options (the session-7 ones were timed at 4k / 16k only);
# D=64 full at 2k-4k: two warpgroups on tokamax's structure (436 vs 416 at 4k, call 2).
# Session 8 (20 interleaved rounds, medians): the same up to 2k (was session 6's two persistent
# ping-pong warpgroups), 383 vs 363 (call 1, vs_default 1.049) and 381 vs 358 (call 2, 1.061) at
# 1k, 402 vs 391 (call 2, 1.031) and 418 vs 397 (call 2b, 1.050) at 2k (tokamax 386 / 384 / 402 /
# 412).
_WG2_TK = dict(mgpu_fwd_wgs=2, mgpu_fwd_regs=(232, 40), mgpu_ping_pong=True, **_TOKAMAX_FWD)
MOSAIC_FWD_SHORT: dict[tuple[int, bool], tuple[tuple[int, dict], ...]] = {
    (128, True): ((1024, {k: False for k in _CAUSAL_128_S7}),),
    (64, False): ((4096, _WG2_TK),),
    (64, True): ((1024, dict(mgpu_fwd_persistent=-1, mgpu_fwd_snake=True,
                             mgpu_fwd_named_free=True)),),
}


def _default_blocks(lq: int, lk: int, d: int) -> dict:
    """Block sizes, warps and pipeline stages per kernel, from the H200 sweeps in
    docs/kernels/flash_attention.md (D=128, N=4k: forward 3 stages +22%, block_k 128 +9%;
    backward 4 warps 1.9x faster than 8). D=64 and D=256 were not swept."""
    def fit(pref, n):
        return min(pref, max(16, pl.next_power_of_2(n)))
    big = d > 128
    block_k = 32 if big else (128 if d > 64 else 64)
    return dict(block_q=fit(64 if big else 128, lq), block_k=fit(block_k, lk),
                block_q_dq=fit(32 if big else 64, lq), block_k_dq=fit(32 if big else 64, lk),
                block_q_dkv=fit(32 if big else 64, lq), block_k_dkv=fit(32 if big else 64, lk),
                num_warps=4 if d <= 64 else 8, num_warps_bwd=4, num_stages=3, num_stages_bwd=2)


# Head dims (after padding) whose forward runs the Mosaic GPU kernel on Hopper by default: where
# it measured faster than the Triton forward (docs/kernels/flash_attention.md, "Which path runs
# where"). Other head dims, f32 inputs, segment ids and pre-Hopper GPUs take the Triton path.
MOSAIC_FWD_DIMS = (128, 64)
# (head dim, causal) cells whose backward runs the Mosaic GPU kernel (dq fused by TMA reduce-add)
# on Hopper by default: where it measured faster than the Triton backward in the same run, N=4k
# fwd+bwd TFLOP/s: D=64 full 378 vs 321 (session 2, call 3) and 381 vs 323 (session 3, call 1);
# D=64 causal 324 vs 297 (session 3, call 1, with the causal GQA/window GPU checks); D=128 full
# with the 240/24 register split 417 vs 408 (session 3, call 2). D=128 causal: the Mosaic
# backward without a producer warpgroup (session 5, call 1: 382 vs Triton 365 at 4k, 459 vs 400
# at 16k; GPU checks at D 128 causal GQA 1000, full GQA 777, D 64 causal window 300 MQA 2048).
MOSAIC_BWD_CELLS: tuple[tuple[int, bool], ...] = ((64, False), (64, True), (128, False),
                                                  (128, True))
# Mosaic backward options per (head dim, causal) cell, applied when the dispatch picks the Mosaic
# backward (an explicit bwd_impl keeps FlashConfig's defaults unless given). D=128 full: the lean
# dV/dP step (session 3, call 3, N=4k fwd+bwd: 442 vs 424 TFLOP/s; GPU-checked). At D=64 it lost
# (360 vs 386). D=64: the deferred dq (session 4: full 417 vs 387 at 4k and 290 vs 276 at 1k,
# causal 330 vs 322 at 4k; GPU-checked at D 64 full GQA ragged and causal window MQA).
# Session 5, call 1 (N=4k fwd+bwd, same process; cuDNN 517 / 446): D=128 full: rows layout, dS
# and dV issued early, no producer warpgroup (255 registers: 16 B of spills where the 240/24
# lean default spilled 204) 489 vs 440 (lean default); D=128 causal: the lean step without the
# producer 382 (the rows layout lost there: 344). Call 2 (same process): full 478 vs 435 (lean)
# at 4k, 523 vs 473 at 16k (cuDNN 514 / 545); causal 384 vs Triton 358 at 4k, 455 vs 396 at 16k
# (cuDNN 439 / 524); GPU checks of both option sets passed (D 128 causal GQA 1000 and window 300
# MQA 2048, full GQA 777). At D=64 the deferred dq stays (409 vs rows_dv_np 369, dq "own"
# without producer 320-326, cuDNN 414).
# Session 7, call 2 (A B A B in one process, N=4k fwd+bwd TFLOP/s, medians; GPU-checked):
# D=128 full: query rows with the deferred dq and no producer 518 vs 473 (rows + early dS / dV,
# the session-5 default), cuDNN 530 (session 6: +2.6% at 4k, -0.5% at 16k, -0.7% at 1k in
# single runs). D=128 causal: the lean step with one step loop (the masked / unmasked loop
# copies spilled 476 B; 0-40 B with one loop) and one ring mbarrier per slot 440 vs 410 at 4k,
# 489 vs 454 at 16k (cuDNN 456 / 546).
# Session 8 (lead's call 5, 20 interleaved rounds in one process, fwd+bwd TFLOP/s, medians):
# D=128 causal at every length: query rows with dS / dV issued early, one step loop and one ring
# mbarrier per slot (the <= 2k option set of MOSAIC_BWD_SHORT, below) 460 vs 425 (the lean step
# above) at 4k and 526 vs 474 at 16k (cuDNN 440 / 531); GPU stress-checked (SMEM poisoned
# between fwd and bwd) at causal n4096 and MQA 8:1 n4097, and through the dispatch at 1k / 2k
# (causal GQA, MQA window 300).
# Session 12 (bench/attention_bwd.py part ab, interleaved, fwd+bwd TFLOP/s, medians of 20
# rounds; stress-checked, SMEM poisoned, on D 128 full b2 n2048 / n4096 and GQA 4:1 n1000):
# D=128 full at every Mosaic length: the deferred dq issued after dS, before dK
# (mgpu_bwd_dq_mid; with dV before the dP wait and one ring mbarrier; ptxas 0 B of spills where
# the previous sets spilled 172-200 B). Against the session-10 set above 2k keys (dV early,
# warpgroup 1's S first, one mbarrier; call 1, three processes): 541 / 547 / 546 vs 513 / 520 /
# 518 at 16k (cuDNN 531 / 530 / 530), 519 / 517 / 519 vs 499 / 500 / 499 at 4k (cuDNN 501 /
# 503 / 505). Against the rows + deferred dq set (the <= 2k path until then; call 2, two
# processes): 493 / 494 vs 469 / 470 at 2k (cuDNN 471 / 467), 433 / 439 vs 416 / 417 at 1k
# (cuDNN 397 / 394). D=128 causal at every Mosaic length: the same mid-step deferred dq with
# one step loop (no early dS, which the deferred dq excludes); the numbers are at
# MOSAIC_BWD_LONG below, where it first went above 2k keys.
MOSAIC_BWD_OPTS: dict[tuple[int, bool], dict] = {(128, False): dict(mgpu_bwd_rows=True,
                                                                    mgpu_bwd_defer_dq=True,
                                                                    mgpu_bwd_producer=False,
                                                                    mgpu_bwd_dv_early=True,
                                                                    mgpu_bwd_one_bar=True,
                                                                    mgpu_bwd_dq_mid=True),
                                                 (128, True): dict(mgpu_bwd_rows=True,
                                                                   mgpu_bwd_defer_dq=True,
                                                                   mgpu_bwd_dv_early=True,
                                                                   mgpu_bwd_producer=False,
                                                                   mgpu_bwd_one_loop=True,
                                                                   mgpu_bwd_one_bar=True,
                                                                   mgpu_bwd_dq_mid=True),
                                                 (64, False): dict(mgpu_bwd_defer_dq=True),
                                                 (64, True): dict(mgpu_bwd_defer_dq=True)}
# Shortest key length (per cell of MOSAIC_BWD_CELLS) from which the Mosaic backward is used;
# shorter calls take the Triton split backward. Session 4, call 2, N=1k fwd+bwd TFLOP/s: D=128
# full Triton 353 vs Mosaic (lean) 312-320; D=64 causal Triton 212 vs Mosaic 182-183 (at 4k the
# Mosaic kernels win: 440 vs 419, 322-330 vs 297). 2k was not measured. D=128 causal (session 5):
# the Mosaic backward is measured faster at 4k and 16k only (1k/2k were cut from call 2), so
# shorter keys keep the session-4 choice (Triton). Session 6, call 1 (N=1k fwd+bwd TFLOP/s, same
# process; cuDNN 406, tokamax 420): D=128 full with the session-5 options (rows layout, no
# producer) 423 vs Triton 354, so the Mosaic backward from 1k keys. Call 2 (N=1k, same process;
# cuDNN 291, tokamax 309): D=128 causal Triton 268, the causal Mosaic options (lean, no producer)
# 278, rows + the deferred dq without producer 283: the Mosaic backward from 1k keys, with the
# latter up to 1k keys (session 8: replaced by MOSAIC_BWD_SHORT's rows + one loop, up to 2k).
MOSAIC_BWD_MIN_LK: dict[tuple[int, bool], int] = {(128, False): 1024, (64, True): 2048,
                                                  (128, True): 1024}
# Mosaic backward options for short keys, per (head dim, causal): ((max_lk, options), ...); the
# first entry with lk <= max_lk is applied on top of MOSAIC_BWD_OPTS (session 6). D=128 causal up
# to 1k keys: query rows with the deferred dq and no producer (call 2 above; at 4k it measured
# 412 vs the lean step's 416, at 16k 450 vs 468, so longer keys keep the lean step). GPU checks:
# the deferred dq without producer (S^T layout) on D 128 causal GQA 1000, rows + deferred dq on
# D 128 full GQA 777 (call 1).
# Session 8, call 1 (20 interleaved rounds in one process, fwd+bwd TFLOP/s, medians; ptxas):
# D=128 causal up to 2k keys: query rows with dS / dV issued early, one step loop and one ring
# mbarrier per slot (no deferred dq) 298 vs 268 (rows + deferred dq, which spilled 468 B; 48 B)
# at 1k (tokamax 305, cuDNN 271) and 390 vs 368 (the lean step, the > 2k default) at 2k
# (tokamax 370); GPU-checked on causal GQA 1000 (session 7).
# Session 8, lead's call 5: that option set is also faster above 2k, so it became the D=128
# causal entry of MOSAIC_BWD_OPTS and no cell has short-key options now.
MOSAIC_BWD_SHORT: dict[tuple[int, bool], tuple[tuple[int, dict], ...]] = {}


# Mosaic backward options for long keys, per (head dim, causal): ((min_lk, options), ...); the
# first entry with lk > min_lk is applied on top of MOSAIC_BWD_OPTS (session 8; a
# MOSAIC_BWD_SHORT entry, none since session 8, takes precedence for the key lengths it covers).
# Session 9 (two independent interleaved processes per length, fwd+bwd TFLOP/s, medians): D=64
# full above 2k keys: the deferred dq with a producer plus one ring mbarrier per slot (one
# consumer wait per step for Q, dO and [lse; delta] instead of three) 455 vs 424 and 456 vs 425
# at 16k (cuDNN 441 / 440), 436 vs 419 and 438 vs 424 at 4k (cuDNN 408 / 410); stress-checked
# (SMEM poisoned between fwd and bwd) at D 64 full b2 n2048 and causal MQA 8:1 n4097. Not
# measured at 1k / 2k (kept there).
# Session 10 (stress-checked, SMEM poisoned between fwd and bwd; two interleaved processes with
# cuDNN, fwd+bwd TFLOP/s, medians; bench/attention_bwd.py part ab): D=64 causal above 2k keys:
# one ring mbarrier per slot, 434 vs 422 at 16k (cuDNN 415; session 9: +2.0 % at 16k, +2.4-3.4 %
# at 4k in three processes; call 3: 432 vs 419 at 16k, 382 vs 371 at 4k). D=128 full above 2k
# keys: dV issued before the dP wait, S of warpgroup 1 first, one ring mbarrier (the two small
# session-9 winners together), 523 vs 505 at 16k and 505 vs 492 at 4k (cuDNN 535 / 507) in
# call 2, 526 vs 512 and 509 vs 503 (cuDNN 542 / 514) in call 3.
# Session 12: the D=128 full entry (session 10's set) was replaced by MOSAIC_BWD_OPTS's
# mgpu_bwd_dq_mid set at every length (measured above, at MOSAIC_BWD_OPTS).
# Session 12, call 3 (stress-checked, SMEM poisoned, on causal b2 n2048, MQA 8:1 n4097, window
# 300 n4096 and GQA 4:1 n1024; two interleaved processes with cuDNN, fwd+bwd TFLOP/s, medians):
# D=128 causal above 2k keys: the deferred dq issued after dS, before dK (mgpu_bwd_dq_mid, with
# dV early, one step loop, one ring mbarrier; no early dS, which the deferred dq excludes)
# instead of the in-step dq after a mid-step dS barrier: 551 / 553 vs 511 / 506 at 16k (cuDNN
# 512 / 517), 486 / 483 vs 451 / 443 at 4k (cuDNN 430 / 429; process 1: 3 rounds), although
# ptxas spills more (112-116 B of spill stores vs 24-48 B). At 1k it measured 317 vs 304
# (cuDNN 279) in one process only and 2k was not measured. The lead's call 3 (two more
# interleaved processes, 20 rounds, against the session-8 set rows_ol1b): 417 / 417 vs 389 / 389
# at 2k (cuDNN 366 / 368), 319 / 323 vs 308 / 309 at 1k (cuDNN 281 / 282): +7 % / +4 %, so the
# set moved into MOSAIC_BWD_OPTS[(128, True)] (every Mosaic length) and this entry went.
MOSAIC_BWD_LONG: dict[tuple[int, bool], tuple[tuple[int, dict], ...]] = {
    (64, False): ((2048, dict(mgpu_bwd_one_bar=True)),),
    (64, True): ((2048, dict(mgpu_bwd_one_bar=True)),)}


def mosaic_bwd_options(d_pad: int, causal: bool, lk: int) -> dict:
    """The dispatch's Mosaic backward options of one call: MOSAIC_BWD_OPTS of the (head dim,
    causal) cell, updated by its first MOSAIC_BWD_SHORT entry that covers `lk` (or its first
    MOSAIC_BWD_LONG entry below `lk`)."""
    opts = dict(MOSAIC_BWD_OPTS.get((d_pad, bool(causal)), {}))
    for max_lk, short in MOSAIC_BWD_SHORT.get((d_pad, bool(causal)), ()):
        if lk <= max_lk:
            opts.update(short)
            break
    else:
        for min_lk, long_opts in MOSAIC_BWD_LONG.get((d_pad, bool(causal)), ()):
            if lk > min_lk:
                opts.update(long_opts)
                break
    return opts


def _cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device if it is an NVIDIA GPU, else None."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
    if not cc:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def choose_fwd_impl(d_pad: int, dtype, has_segments: bool, capability,
                    dims=None) -> str:
    """The forward kernel for one call: "mosaic" (wgmma/TMA, sm_90 only) or "triton".

    `capability` is the CUDA compute capability (major, minor) or None (not an NVIDIA GPU: the
    caller runs interpret mode). wgmma exists only on sm_90, so Blackwell (10.x) and Ampere /
    Ada (8.x) take the Triton path. `dims`: the head dims that run Mosaic (MOSAIC_FWD_DIMS).
    """
    dims = MOSAIC_FWD_DIMS if dims is None else dims
    if capability is None or capability[0] != 9:
        return "triton"
    if has_segments or d_pad not in dims:
        return "triton"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "triton"
    return "mosaic"


def choose_bwd_impl(d_pad: int, dtype, has_segments: bool, capability,
                    causal: bool = False, lk: int | None = None) -> str:
    """The backward for one call: "mosaic" in the MOSAIC_BWD_CELLS (Hopper, bf16/f16, no
    segment ids) from the cell's MOSAIC_BWD_MIN_LK key length on, else "split" (the Triton dq
    kernel plus the Triton dk/dv kernel)."""
    cell = (d_pad, bool(causal))
    if lk is not None and lk < MOSAIC_BWD_MIN_LK.get(cell, 0):
        return "split"
    dims = tuple(d for d, c in MOSAIC_BWD_CELLS if c == bool(causal))
    if choose_fwd_impl(d_pad, dtype, has_segments, capability, dims) == "mosaic":
        return "mosaic"
    return "split"


def flash_attention_kernel(q, k, v, *, causal=False, segment_ids=None, sm_scale=None,
                           window=None, interpret=False, **blocks):
    """The GPU-style Pallas kernels with explicit block sizes (keys of FlashConfig) for tuning.

    `fwd_impl`: None picks per GPU (`choose_fwd_impl`: the Mosaic GPU forward on Hopper at
    head_dim 64 and 128 (`MOSAIC_FWD_DIMS`), else Triton); "mosaic" forces the Mosaic GPU
    forward (with `interpret=True` it runs in Mosaic GPU interpret mode); "triton" forces the
    Triton-lowered one. `bwd_impl`: None picks per GPU (`choose_bwd_impl`), "split" (Triton dq +
    dk/dv kernels), "atomic" (Triton dk/dv kernel with dq by f32 atomic adds) or "mosaic" (Mosaic
    GPU, dq by TMA reduce-add).
    """
    lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    d_pad = max(16, pl.next_power_of_2(d))                 # Triton tiles need power-of-2 sizes
    if d_pad != d:
        q, k, v = (_common.pad_axis(x, 3, d_pad) for x in (q, k, v))
    defaults = _default_blocks(lq, lk, d_pad)
    if jnp.dtype(q.dtype).itemsize == 4:
        # f32 K/V: the bf16-tuned Triton forward (128-key blocks, 3 stages) asks for 393 KB of
        # shared memory at D=128 (session 4, call 3); session 1's tiles passed on the H200.
        defaults.update(block_k=min(defaults["block_k"], 64), num_stages=2)
    fwd_impl = blocks.pop("fwd_impl", None)
    if fwd_impl is None:
        fwd_impl = "triton" if interpret else choose_fwd_impl(
            d_pad, q.dtype, segment_ids is not None, _cuda_capability())
    if blocks.get("bwd_impl") is None:
        blocks["bwd_impl"] = "split" if interpret else choose_bwd_impl(
            d_pad, q.dtype, segment_ids is not None, _cuda_capability(), causal, lk)
        if blocks["bwd_impl"] == "mosaic":
            defaults.update(mosaic_bwd_options(d_pad, bool(causal), lk))
    if blocks["bwd_impl"] == "mosaic" and (segment_ids is not None or d_pad not in (64, 128)):
        raise ValueError("bwd_impl='mosaic' supports head_dim 64/128 without segment_ids")
    if fwd_impl == "mosaic":
        # Mosaic GPU forward: block_q rows per consumer warpgroup (two per CTA), 64-wide tiles.
        if segment_ids is not None or d_pad not in (64, 128):
            raise ValueError("fwd_impl='mosaic' supports head_dim 64/128 without segment_ids")
        defaults.update(MOSAIC_FWD_BLOCKS[d_pad, bool(causal)])
        for max_lq, opts in MOSAIC_FWD_SHORT.get((d_pad, bool(causal)), ()):
            if lq <= max_lq:
                defaults.update(opts)
                break
        # Default options that an explicit request excludes (FA3's schedule: two consumers and
        # no intra-warpgroup overlap; the overlap: one CTA per tile, mbarrier slot release).
        if blocks.get("mgpu_fwd_wgs", 2) != 2 or blocks.get("mgpu_fwd_overlap"):
            defaults.pop("mgpu_fwd_fa3_sched", None)
        if blocks.get("mgpu_fwd_overlap"):
            for key in ("mgpu_fwd_persistent", "mgpu_fwd_snake", "mgpu_fwd_named_free"):
                defaults.pop(key, None)
    cfg = FlashConfig(causal=bool(causal), window=window, sm_scale=sm_scale, lq=lq, lk=lk,
                      has_segments=segment_ids is not None, interpret=interpret,
                      fwd_impl=fwd_impl, **{**defaults, **blocks})
    return _flash(q, k, v, segment_ids, cfg)[..., :d]


def flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, window=None,
                    backend=None):
    """Attention of q [B, Lq, Hq, D] over k/v [B, Lk, Hkv, D]; returns [B, Lq, Hq, D]."""
    _check_attention_args(q, k, v, segment_ids, window, causal)
    backend = _common.resolve_backend(backend)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                                   sm_scale=sm_scale, window=window)
    if backend == "tpu_interpret" or (backend == "pallas" and _common.platform() == "tpu"):
        from pallas_kernels import attention_tpu
        return attention_tpu.flash_attention_tpu(
            q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
            interpret=backend == "tpu_interpret")
    return flash_attention_kernel(q, k, v, causal=causal, segment_ids=segment_ids,
                                  sm_scale=sm_scale, window=window,
                                  interpret=backend == "interpret")


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, window=None, backend=None):
    """Attention of the newest T queries q [B, T, Hq, D] over a KV cache [B, S, Hkv, D].

    `lengths` [B] int: valid cache entries per sequence (the T queries are the last T of them).
    """
    _common.check_rank("q", q, 4, "[batch, T, heads, head_dim]")
    _common.check_rank("k_cache", k_cache, 4, "[batch, max_length, kv_heads, head_dim]")
    _common.check_rank("v_cache", v_cache, 4, "[batch, max_length, kv_heads, head_dim]")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _common.check_float(name, x)
    b, t, hq, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape} "
                         f"and {v_cache.shape}")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must have shape [{b}, S, Hkv, {d}] to match q {q.shape}, "
                         f"got {k_cache.shape}")
    if hq % k_cache.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache heads ({k_cache.shape[2]})")
    if not hasattr(lengths, "shape") or tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape [{b}], got {getattr(lengths, 'shape', None)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    backend = _common.resolve_backend(backend)
    if backend == "reference":
        return decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale,
                                          window=window)
    if backend == "tpu_interpret" or (backend == "pallas" and _common.platform() == "tpu"):
        # The TPU has no split-KV kernel yet: its flash kernel over the cache is exact.
        from pallas_kernels import attention_tpu
        return attention_tpu.decode_attention_tpu(
            q, k_cache, v_cache, lengths, sm_scale=sm_scale, window=window,
            interpret=backend == "tpu_interpret")
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    d_pad = max(16, pl.next_power_of_2(d))
    if d_pad != d:
        q, k_cache, v_cache = (_common.pad_axis(x, 3, d_pad) for x in (q, k_cache, v_cache))
    return _decode_forward(q, k_cache, v_cache, lengths, sm_scale=sm_scale, window=window,
                           interpret=backend == "interpret")[..., :d]

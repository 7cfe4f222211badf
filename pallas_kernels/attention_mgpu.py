"""Flash attention forward and backward as Mosaic GPU kernels for Hopper (wgmma, TMA, warp
specialisation).

The forward is the Hopper default at head_dim 64 and 128 (bf16/f16, no segment ids; D=64 full
attention with three consumer warpgroups, `mgpu_fwd_wgs=3`); the backward (`mosaic_backward`, dq
fused by TMA reduce-add) is the default where it measured faster than the Triton backward: D=64
with the deferred dq (240/24 registers), D=128 full with the query-rows layout and the deferred dq
without a producer warpgroup (2 x 128 threads with 255 registers each; session 7), issued after
dS, before dK (`mgpu_bwd_dq_mid`, session 12: no spills), D=128 causal with query rows, dV
issued early, no producer, one step loop, one ring mbarrier per slot and the same mid-step
deferred dq (session 12; before it the early dS of session 8, and the lean step before that);
from 1k keys at D=128 and 2k at D=64 causal; see `choose_fwd_impl` / `choose_bwd_impl` /
`MOSAIC_BWD_CELLS` / `MOSAIC_BWD_OPTS` / `MOSAIC_BWD_MIN_LK` / `MOSAIC_BWD_SHORT` /
`MOSAIC_BWD_LONG` in attention.py and docs/kernels/flash_attention.md.
Opt-in variants (FlashConfig `mgpu_*` fields): the FA3 issue order, the deferred dq, the query-rows
layout, early dS / dV, dq fused after dK, dq "own", the producer-less CTA, persistent CTAs
(`mgpu_bwd_persistent`: measured slower), the deferred-dq warpgroups half a step apart
(`mgpu_bwd_pingpong`: measured slower) and the on-device profiler ranges (`mgpu_bwd_profile`) in
the backward, dS from the bf16 P, the tiles-fastest grid, the register splits, and in the forward
the intra-warpgroup overlap and an optimization barrier. Compiled and checked against the f32
reference on an H200 (jax 0.11.2) and run in Mosaic GPU interpret mode (`plgpu.InterpretGPUParams`)
in the CPU tests.

One CTA per (query head, 2 * block_q query rows, batch) runs three warpgroups: two consumers own
block_q rows each (three with `mgpu_fwd_wgs=3`) and a producer streams K/V blocks by TMA into a
`stages`-deep shared-memory ring (one mbarrier per slot for "loaded", one with an arrival per
consumer for "consumed"). A consumer
computes S = Q K^T by wgmma, the base-2 online softmax in registers, and O += P V by wgmma with P
from registers; a shared "schedule" barrier alternates the two consumers (FA3 ping-pong) so one's
softmax overlaps the other's matmuls. Both consumers step through the CTA's whole KV block range
in lock-step (the ring is shared): steps outside a consumer's own visible range only wait and
release the slot; steps inside are masked at the edges (causal diagonal, window, key padding)
and unmasked in the middle. Inputs bf16 or f16, head_dim 64 or 128; lengths padded outside.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels import attention as _attn
from pallas_kernels.attention import LOG2E, MASK_VALUE, FlashConfig, _kv_block_range

_q_block_range = _attn._q_block_range


# Forward defaults since session 7 (MOSAIC_FWD_BLOCKS / MOSAIC_FWD_SHORT in attention.py): D=128
# full, and D=64 full up to 4k queries (session 8: also <= 2k), on tokamax's structure (persistent
# CTAs, FA3's named barriers, the early K wait, one producer warp, named-barrier slot release,
# `mgpu_fwd_ob_split`, `mgpu_fwd_lean_end`, `mgpu_fwd_read_wait`); D=128 causal beyond 1k queries
# with the read wait, one producer warp, named slot release and the split barriers. Session 6's,
# otherwise: no automatic barriers (`mgpu_fwd_nab`) at D=128 and D=64 causal; causal query tiles
# walked last-first (`mgpu_fwd_reverse`) with FA3's named-barrier ping-pong (`mgpu_fwd_fa3_sched`),
# at D=128 also the next K awaited during P V (`mgpu_fwd_early_kwait`); D=128 full up to 1k queries
# on one persistent CTA per SM (`mgpu_fwd_persistent`); D=64 full up to 2k queries with two 64-row
# warpgroups, FA3's ping-pong and persistent CTAs (three warpgroups without ping-pong beyond); D=64
# causal up to 1k queries on persistent CTAs over snake rounds (`mgpu_fwd_snake`) with the slot
# release on named barriers (`mgpu_fwd_named_free`). Opt-in: `mgpu_fwd_skip_pad`, `mgpu_fwd_q2` (two
# Q buffers), `mgpu_fwd_q_l2` (the next tile's Q prefetched into L2), `mgpu_fwd_tiles_fastest`
# (session 8: tokamax's tile order in the forward only).
_FA3_BAR0 = 8    # first of the two hardware named barriers of mgpu_fwd_fa3_sched
_FREE_BAR0 = 10  # first of the 2 * stages named barriers of mgpu_fwd_named_free (ids < 16)
_BWD_SYNC_BAR = 8  # the backward's named dS barrier (mgpu_bwd_named_sync); Mosaic itself uses
#                    id 0 (CTA) and 1 + warpgroup index (warpgroup barriers)


def _named_barrier(op: str, barrier_id: int, num_threads: int):
    """`bar.<op> id, threads;` (op "arrive" or "sync"): a CTA hardware named barrier."""
    @plgpu.inline_mgpu()
    def bar(_):
        mgpu.utils.inline_ptx(f"bar.{op} {barrier_id}, {num_threads};", has_side_effects=True)
    bar()


class _FwdTile(NamedTuple):
    """One query tile of a forward CTA: batch, head, first query row, KV block range, ring
    steps taken before it."""
    b: jax.Array
    h: jax.Array
    q0: jax.Array
    lo: jax.Array
    hi: jax.Array
    c0: jax.Array


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, barriers, *, cfg: FlashConfig,
                    rep: int, stages: int, ping_pong: bool, gpu_path: bool, n_ctas: int):
    bq, bk = cfg.block_q, cfg.block_k
    nc = cfg.mgpu_fwd_wgs                                  # consumer warpgroups
    fold = cfg.mgpu_fold_scale
    overlap = cfg.mgpu_fwd_overlap
    # n_ctas: persistent CTAs (mgpu_fwd_persistent resolved), 0: one CTA per tile
    hq, n_tiles = q_ref.shape[2], q_ref.shape[1] // (nc * bq)
    wg = lax.axis_index("wg")
    qo_smem, k_smem, v_smem, lse_smem, p_smem, o_smem = smem
    k_ready, v_ready, q_ready, k_free, v_free, schedule = barriers

    def tile_at(b, h, tile, c0):
        """The CTA's work on one query tile: its KV block range [lo, hi) (blocks any of its
        rows sees) and c0, the ring steps taken before it (persistent CTAs)."""
        if cfg.mgpu_fwd_reverse:                           # longest (causal) tiles first
            tile = (n_tiles - 1) - tile
        q0 = tile * (nc * bq)
        lo, _, _, hi = _kv_block_range(q0, nc * bq, bk, cfg)
        return _FwdTile(b, h, q0, lo, hi, c0)

    if n_ctas:
        # Persistent: CTA `sm` takes the flat tiles sm, sm + n_ctas, ... (heads fastest, then
        # query tiles, then batch: the order of the one-CTA-per-tile grid; with
        # `mgpu_tiles_fastest` or the forward-only `mgpu_fwd_tiles_fastest` query tiles
        # fastest, then heads: tokamax's order, the CTAs in flight on a few heads' K/V).
        sm = lax.axis_index("sm")
        n_all = q_ref.shape[0] * hq * n_tiles
        n_local = lax.div(n_all - sm + (n_ctas - 1), n_ctas)

        def coords(i):
            f = sm + i * n_ctas
            if cfg.mgpu_tiles_fastest or cfg.mgpu_fwd_tiles_fastest:
                r = lax.div(f, n_tiles)
                return lax.div(r, hq), lax.rem(r, hq), lax.rem(f, n_tiles)
            r = lax.div(f, hq)
            return lax.div(r, n_tiles), lax.rem(f, hq), lax.rem(r, n_tiles)

        if cfg.mgpu_fwd_snake:
            # Rounds of n_ctas tiles, query tiles slowest (all heads and batches of one tile
            # index, then the next: with mgpu_fwd_reverse the longest causal tiles first), CTA
            # positions alternating direction per round, so that a CTA that got a longer tile
            # in one round gets a shorter one in the next (a static balance of the triangle).
            def snake_pos(i):
                return jnp.where(lax.rem(i, 2) == 0, sm, (n_ctas - 1) - sm)
            n_local = (n_all // n_ctas
                       + (snake_pos(jnp.int32(n_all // n_ctas)) < n_all % n_ctas).astype(
                           jnp.int32))

            def coords(i):
                f = i * n_ctas + snake_pos(i)
                r = lax.rem(f, q_ref.shape[0] * hq)
                return lax.div(r, hq), lax.rem(r, hq), lax.div(f, q_ref.shape[0] * hq)

    def for_tiles(fn):
        """fn(t, i) on each tile of this CTA (i: its index in the CTA's list, None when one
        CTA per tile); returns the ring steps taken in all."""
        if not n_ctas:
            t = tile_at(lax.axis_index("batch"), lax.axis_index("heads"),
                        lax.axis_index("q_tile"), jnp.int32(0))
            fn(t, None)
            return t.hi - t.lo

        def body(i, c0):
            t = tile_at(*coords(i), c0)
            fn(t, i)
            return c0 + (t.hi - t.lo)
        return lax.fori_loop(0, n_local, body, jnp.int32(0))

    def step_slot(t, j):
        return lax.rem(t.c0 + j - t.lo, jnp.int32(stages))

    # "Slot consumed" signals. Default: the k_free / v_free mbarriers (each consumer warpgroup's
    # 128 threads arrive, the producer waits). `mgpu_fwd_named_free` (GPU path): hardware named
    # barriers, ids _FREE_BAR0 + slot (K) and _FREE_BAR0 + stages + slot (V); the consumers'
    # threads `bar.arrive`, the producer's `bar.sync` completes the phase (tokamax's and FA3's
    # scheme). A consumer cannot arrive twice on one slot before the producer's sync: its next
    # use of the slot needs the load that follows that sync.
    named_free = cfg.mgpu_fwd_named_free and gpu_path
    warp_producer = cfg.mgpu_fwd_warp_producer and gpu_path
    free_threads = nc * 128 + (32 if warp_producer else 128)

    def free_named(op, which, slot):                       # slot: int or traced int32
        # One branch per stage with a static barrier id: a traced id costs a register that
        # spilled (session 6: 56 bytes at D=128 full, 4-44 at three warpgroups).
        base = _FREE_BAR0 + (0 if which == "k" else stages)
        if isinstance(slot, int):
            _named_barrier(op, base + slot, free_threads)
            return
        for s_ in range(stages):
            pl.when(slot == s_)(functools.partial(_named_barrier, op, base + s_, free_threads))

    def release(which, slot):                              # consumer: done reading the slot
        if named_free:
            free_named("arrive", which, slot)
        else:
            plgpu.barrier_arrive((k_free if which == "k" else v_free).at[slot])

    def await_free(which, slot):                           # producer: the slot may be refilled
        if named_free:
            free_named("sync", which, slot)
        else:
            plgpu.barrier_wait((k_free if which == "k" else v_free).at[slot])

    def sync_schedule():
        if ping_pong:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    def qk_scores(slot, q_smem, after_issue):
        """S = Q K^T of the K block in `slot` (`after_issue()` runs once the wgmma is issued);
        the K slot is released once S is in registers."""
        def qk(s_ref):
            plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            after_issue()
            return s_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
        release("k", slot)
        return s

    def softmax(s, m, l, j, q0, masked):
        """Online-softmax step on the scores S of KV block j for rows q0..: returns P (input
        dtype), the new running max and sum, and alpha = exp2(m - m_new) (the O rescale)."""
        c = cfg.sm_scale * LOG2E
        if not fold:
            s = s * c
        if masked:
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
            q_pos = rows + (q0 + cfg.lk - cfg.lq)
            k_pos = cols + j * bk
            mask = k_pos < cfg.lk
            if cfg.causal:
                mask &= k_pos <= q_pos
            if cfg.window is not None:
                mask &= k_pos > q_pos - cfg.window
            s = jnp.where(mask, s, -jnp.inf)
        if fold:    # max on raw scores; scale folded into exp2's argument (one FFMA)
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        else:
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + p.sum(axis=1)
        return p.astype(v_smem.dtype), m_new, l, alpha

    # mgpu_fwd_q2 (persistent): two Q buffers per warpgroup, tile i in buffer i % 2; the next
    # tile's Q is loaded into the other buffer right after this tile's first step (once the
    # O / lse stores of the tile before, which went through that buffer, have been read), so
    # its load latency is hidden by a whole tile instead of the epilogue; O leaves through the
    # tile's own Q buffer (no separate O buffer: the same SMEM as the one-buffer persistent CTA).
    q2 = cfg.mgpu_fwd_q2 and bool(n_ctas)

    def qbuf(i):
        return lax.rem(jnp.int32(i), 2) * nc + wg if q2 else wg

    def load_q(t, i=None):
        plgpu.copy_gmem_to_smem(q_ref.at[t.b, pl.ds(t.q0 + wg * bq, bq), t.h],
                                qo_smem.at[qbuf(i)], q_ready.at[qbuf(i)])

    def consumer_setup(t, i=None):
        """This warpgroup's Q in SMEM (loaded here, or prefetched when persistent); returns
        (q0, w_lo, w_mid_lo, w_mid_hi, w_hi, q_smem, m, l, acc): its rows, its KV block ranges
        inside the CTA's, the initial state."""
        q0 = t.q0 + wg * bq
        w_lo, w_mid_lo, w_mid_hi, w_hi = _kv_block_range(q0, bq, bk, cfg)
        w_lo, w_hi = jnp.maximum(w_lo, t.lo), jnp.minimum(w_hi, t.hi)
        w_mid_lo = jnp.minimum(jnp.maximum(w_mid_lo, w_lo), w_hi)
        w_mid_hi = jnp.minimum(jnp.maximum(w_mid_hi, w_mid_lo), w_hi)
        if cfg.mgpu_fwd_skip_pad:
            # Rows that are all length padding (e.g. 1024 rows in 192-row CTAs: 1152) do no
            # work: every step of the CTA's range is a skip step for this warpgroup.
            pad = q0 >= cfg.lq
            w_mid_lo, w_mid_hi, w_hi = (jnp.where(pad, w_lo, x) for x in (w_mid_lo, w_mid_hi,
                                                                          w_hi))
        q_smem = qo_smem.at[qbuf(i)]
        if not n_ctas:
            load_q(t)
        plgpu.barrier_wait(q_ready.at[qbuf(i)])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m = plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
                                plgpu.Layout.WGMMA)
        return q0, w_lo, w_mid_lo, w_mid_hi, w_hi, q_smem, m, l, acc

    def finish(t, q0, q_smem, acc, m, l):
        """o = acc / l and the base-2 lse (+inf for rows without visible keys) to HBM (through
        the Q buffer, or when persistent through an O buffer whose stores are awaited only
        before its next use)."""
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        out_smem = o_smem.at[wg] if n_ctas and not q2 else q_smem
        if n_ctas:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's stores
        out_smem[...] = acc.astype(out_smem.dtype)
        lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe) * LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, o_ref.at[t.b, pl.ds(q0, bq), t.h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[t.b, t.h, pl.ds(q0, bq)])
        if not n_ctas:
            plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.mgpu_fwd_read_wait)

    def prefetch_next_q(i):
        """Persistent: the next tile's Q into this warpgroup's Q buffer (every wgmma that
        read it was awaited), so that its load overlaps this tile's epilogue."""
        if n_ctas and not q2:
            pl.when(i + 1 < n_local)(lambda: load_q(tile_at(*coords(i + 1), 0)))

    def prefetch_next_q2(i):
        """mgpu_fwd_q2: the next tile's Q into the other buffer, after the stores of the tile
        before have read it."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        pl.when(i + 1 < n_local)(lambda: load_q(tile_at(*coords(i + 1), 0), i + 1))

    # The ping-pong protocols. Default: one `schedule` mbarrier with an arrival per consumer
    # and phase, consumer w starting w phases late; each step meets after its S issue, arrives
    # after its softmax and waits before its P V (2 consumers: FA3's alternation; 3: a
    # staggered round). `mgpu_fwd_fa3_sched` (2 consumers): FA3's pair of named barriers, one
    # per consumer: after issuing S a consumer lets the other one go on (arrive on the other's
    # barrier), before issuing P V it waits for the other's S issue (sync on its own): the GEMM
    # issues alternate, and no consumer waits for the other's softmax. On the GPU these are
    # hardware named barriers (`bar.arrive` / `bar.sync`, ids 8 and 9 of 16: Mosaic uses 0 and
    # 1 + warpgroup); interpret mode has no inline PTX and uses two 2-arrival mbarriers.
    fa3 = cfg.mgpu_fwd_fa3_sched and ping_pong

    def named_bar(op, which):
        for w in range(2):
            pl.when(which == w)(functools.partial(_named_barrier, op, _FA3_BAR0 + w, 256))

    def fa3_arrive_other():
        if gpu_path:
            named_bar("arrive", 1 - wg)
        else:
            plgpu.barrier_arrive(schedule.at[1 - wg])

    def fa3_sync_own():
        if gpu_path:
            named_bar("sync", wg)
        else:
            plgpu.barrier_arrive(schedule.at[wg])
            plgpu.barrier_wait(schedule.at[wg])

    def sched_tile_start():
        if fa3:
            pl.when(wg == 1)(fa3_sync_own)
        elif ping_pong:
            for w in range(1, nc):
                pl.when(wg >= w)(sync_schedule)

    def sched_after_s():
        if fa3:
            fa3_arrive_other()
        else:
            sync_schedule()

    def sched_after_softmax():
        if ping_pong and not fa3:
            plgpu.barrier_arrive(schedule)                 # softmax done

    def sched_before_pv():
        if fa3:
            fa3_sync_own()
        elif ping_pong:
            plgpu.barrier_wait(schedule)                   # the tensor cores are ours again

    def sched_tile_end():                                  # balance the phases again
        if fa3 and n_ctas and cfg.mgpu_fwd_lean_end and gpu_path:
            # tokamax's tile end: consumer 0 *syncs* on consumer 1's barrier, which completes
            # with consumer 1's last P V sync (the phase it needs anyway), so consumer 0 goes on
            # to its epilogue without waiting for that P V to finish, and cannot arrive on the
            # barrier again before consumer 1 has passed it. (Interpret mode tracks mbarrier
            # phases per thread: a wait on the other consumer's barrier has no phase there.)
            pl.when(wg == 0)(functools.partial(_named_barrier, "sync", _FA3_BAR0 + 1, 256))
        elif fa3:
            pl.when(wg == 0)(fa3_arrive_other)
            if n_ctas:
                # Persistent: consumer 0 would otherwise run into the next tile and arrive on
                # consumer 1's barrier again before consumer 1 synced on the last arrival (two
                # arrivals of one consumer complete a named barrier's phase on their own):
                # consumer 0 waits here until consumer 1 is past its last sync.
                pl.when(wg == 1)(fa3_arrive_other)
                pl.when(wg == 0)(fa3_sync_own)
        elif ping_pong:
            for w in range(1, nc):
                pl.when(wg < nc - w)(sync_schedule)

    def prefetch_next_q_l2(i):
        """mgpu_fwd_q_l2 (persistent, GPU path): the next tile's Q rows of this warpgroup
        into L2 at the start of this tile (tokamax's Q warp does the same), so that its SMEM
        load at the tile end is an L2 hit."""
        def go():
            nt = tile_at(*coords(i + 1), 0)
            plgpu.async_prefetch(q_ref.at[nt.b, pl.ds(nt.q0 + wg * bq, bq), nt.h])
        pl.when(i + 1 < n_local)(go)

    def _consumer(t, i):
        q0, w_lo, w_mid_lo, w_mid_hi, w_hi, q_smem, m, l, acc = consumer_setup(t, i)
        if n_ctas and cfg.mgpu_fwd_q_l2 and gpu_path:
            prefetch_next_q_l2(i)
        sched_tile_start()

        def skip(j, carry):
            slot = step_slot(t, j)
            plgpu.barrier_wait(k_ready.at[slot])
            sched_after_s()
            release("k", slot)
            sched_after_softmax()
            plgpu.barrier_wait(v_ready.at[slot])
            sched_before_pv()
            release("v", slot)
            return carry

        early = cfg.mgpu_fwd_early_kwait

        def next_k(j):
            """mgpu_fwd_early_kwait: K of this warpgroup's next visited step is awaited while
            this step's P V is on the tensor cores (the first one before the first visit).
            Returns the waiting function; its condition and slot are computed here, outside
            the wgmma's run_state (a constant closed over there fails to lower)."""
            more, nxt = j + 1 < w_hi, step_slot(t, j + 1)
            return lambda: pl.when(more)(lambda: plgpu.barrier_wait(k_ready.at[nxt]))

        def visit(j, carry, masked):
            acc, m, l = carry
            slot = step_slot(t, j)
            if not early:
                plgpu.barrier_wait(k_ready.at[slot])

            s = qk_scores(slot, q_smem, sched_after_s)
            p_lo, m_new, l, alpha = softmax(s, m, l, j, q0, masked)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if cfg.mgpu_fwd_opt_barrier:   # the softmax's results complete before the arrive
                acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
            if cfg.mgpu_fwd_ob_split:
                # tokamax's order: the O rescale and P, then the row statistics, complete
                # before the V wait and the ping-pong sync (nothing sinks past the sync onto
                # the path between getting the tensor cores and issuing P V).
                acc, p_lo = lax.optimization_barrier((acc, p_lo))
                l, m_new = lax.optimization_barrier((l, m_new))
            sched_after_softmax()
            plgpu.barrier_wait(v_ready.at[slot])
            sched_before_pv()

            wait_next_k = next_k(j) if early else None
            if gpu_path:                                   # P from registers, O in place
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                    if early:
                        wait_next_k()
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:
                # GPU interpret mode has no run_state and reads wgmma operands from SMEM only.
                p_smem.at[wg][...] = p_lo
                plgpu.commit_smem()

                def pv(pv_ref):
                    plgpu.wgmma(pv_ref, p_smem.at[wg], v_smem.at[slot])
                    return pv_ref[...]
                acc = acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
                if early:
                    wait_next_k()
            release("v", slot)
            if q2:
                pl.when(j == w_lo)(lambda: prefetch_next_q2(i))
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(t.lo, w_lo, skip, carry)
        if early:
            pl.when(w_lo < w_hi)(lambda: plgpu.barrier_wait(k_ready.at[step_slot(t, w_lo)]))
        carry = lax.fori_loop(w_lo, w_mid_lo, functools.partial(visit, masked=True), carry)
        carry = lax.fori_loop(w_mid_lo, w_mid_hi, functools.partial(visit, masked=False), carry)
        carry = lax.fori_loop(w_mid_hi, w_hi, functools.partial(visit, masked=True), carry)
        acc, m, l = lax.fori_loop(w_hi, t.hi, skip, carry)
        if q2:                                             # no visited step: prefetch here
            pl.when(w_lo >= w_hi)(lambda: prefetch_next_q2(i))
        sched_tile_end()
        prefetch_next_q(i)
        finish(t, q0, q_smem, acc, m, l)

    def _consumer_overlap(t, i):
        """`mgpu_fwd_overlap` (FA3's intra-warpgroup overlap, two consumers): step j issues
        S_j = Q K_j^T and P_{j-1} V_{j-1} back to back (the latter into a fresh accumulator),
        computes the softmax of S_j while P_{j-1} V_{j-1} is on the tensor cores, then
        O = (O + P_{j-1} V_{j-1}) * alpha_j. With ping-pong the two warpgroups pass a token
        (one 1-arrival barrier each) around their GEMM issues, so the issues alternate. V_j is
        released one step later than K_j (the producer waits for K and V separately)."""
        del i                                              # never persistent
        q0, w_lo, w_mid_lo, w_mid_hi, w_hi, q_smem, m, l, acc = consumer_setup(t)
        tok = schedule
        p0 = plgpu.layout_cast(jnp.zeros((bq, bk), v_smem.dtype), plgpu.Layout.WGMMA)

        def turn_begin():
            if ping_pong:
                plgpu.barrier_wait(tok.at[wg])

        def turn_end():
            if ping_pong:
                plgpu.barrier_arrive(tok.at[1 - wg])
        if ping_pong:
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(tok.at[0]))     # warpgroup 0 first

        def p_operand(p_prev):
            if gpu_path:
                return p_prev
            p_smem.at[wg][...] = p_prev                    # interpret: operands from SMEM
            plgpu.commit_smem()
            return p_smem.at[wg]

        def skip(j, carry):
            slot = step_slot(t, j)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            turn_begin()
            turn_end()
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

        def first(j, carry):                               # S only: no P V pending yet
            acc, m, l, _ = carry
            slot = step_slot(t, j)
            plgpu.barrier_wait(k_ready.at[slot])
            turn_begin()

            s_ = qk_scores(slot, q_smem, turn_end)
            p_lo, m, l, _ = softmax(s_, m, l, j, q0, True)
            return acc, m, l, p_lo

        def visit(j, carry, masked):
            acc, m, l, p_prev = carry
            slot, prev = step_slot(t, j), step_slot(t, j - 1)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[prev])
            turn_begin()
            p_op = p_operand(p_prev)

            def s_pv(s_ref, pv_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                plgpu.wgmma(pv_ref, p_op, v_smem.at[prev])
                turn_end()
                s_ = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
                plgpu.barrier_arrive(k_free.at[slot])
                p_lo, m_new, l_new, alpha = softmax(s_, m, l, j, q0, masked)
                return p_lo, m_new, l_new, alpha, pv_ref[...]
            p_lo, m, l, alpha, pv = pl.run_scoped(
                s_pv, plgpu.ACC((bq, bk), jnp.float32),
                plgpu.ACC((bq, q_ref.shape[-1]), jnp.float32))
            plgpu.barrier_arrive(v_free.at[prev])
            acc = (acc + pv) * lax.broadcast_in_dim(alpha, acc.shape, [0])
            return acc, m, l, p_lo

        def last(j, carry):                                # P V of the last visited block
            acc, m, l, p_prev = carry
            slot = step_slot(t, j)
            plgpu.barrier_wait(v_ready.at[slot])
            turn_begin()
            p_op = p_operand(p_prev)

            def pv(pv_ref):
                plgpu.wgmma(pv_ref, p_op, v_smem.at[slot])
                turn_end()
                return pv_ref[...]
            acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, q_ref.shape[-1]), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m, l, p_prev

        def idle_turn(_, carry):                           # keeps the turn count equal
            turn_begin()
            turn_end()
            return carry

        v0 = jnp.minimum(w_lo + 1, w_hi)
        m_lo = jnp.minimum(jnp.maximum(w_mid_lo, v0), w_hi)
        m_hi = jnp.minimum(jnp.maximum(w_mid_hi, m_lo), w_hi)
        carry = (acc, m, l, p0)
        carry = lax.fori_loop(t.lo, w_lo, skip, carry)
        carry = lax.fori_loop(w_lo, v0, first, carry)     # 0 or 1 step
        carry = lax.fori_loop(v0, m_lo, functools.partial(visit, masked=True), carry)
        carry = lax.fori_loop(m_lo, m_hi, functools.partial(visit, masked=False), carry)
        carry = lax.fori_loop(m_hi, w_hi, functools.partial(visit, masked=True), carry)
        carry = lax.fori_loop(jnp.maximum(w_hi - 1, w_lo), w_hi, last, carry)
        carry = lax.fori_loop(jnp.int32(0), (w_hi <= w_lo).astype(jnp.int32), idle_turn, carry)
        acc, m, l, _ = lax.fori_loop(w_hi, t.hi, skip, carry)
        if ping_pong:
            pl.when(wg == 0)(lambda: plgpu.barrier_wait(tok.at[0]))   # the last token
        finish(t, q0, q_smem, acc, m, l)

    @pl.when(wg < nc)
    def _consumers():
        plgpu.set_max_registers(cfg.mgpu_fwd_regs[0], action="increase")
        if n_ctas:                                         # the first tile's Q
            pl.when(n_local > 0)(lambda: load_q(tile_at(*coords(0), 0), 0))
        for_tiles(_consumer_overlap if overlap else _consumer)
        if n_ctas:
            # mgpu_fwd_read_wait: the CTA exits once the last stores have read SMEM (their
            # global writes complete with the kernel), not after the HBM write round trip.
            plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.mgpu_fwd_read_wait)

    @pl.when(wg == nc)
    def _producer():
        plgpu.set_max_registers(cfg.mgpu_fwd_regs[1], action="decrease")

        def produce(t, i):
            g = lax.div(t.h, jnp.int32(rep))

            def load(j, what=("k", "v")):
                slot = step_slot(t, j)
                at = (t.b, pl.ds(j * bk, bk), g)
                if "k" in what:
                    plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_ready.at[slot])
                if "v" in what:
                    plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_ready.at[slot])

            if n_ctas:
                # One ring over all tiles of the CTA: ring step n waits for the consumers to
                # free its slot from step n - stages (the next tile's first blocks load while
                # the consumers finish this one).
                @pl.loop(t.lo, t.hi)
                def _step(j):
                    slot = step_slot(t, j)

                    @pl.when(t.c0 + j - t.lo >= stages)
                    def _():
                        await_free("k", slot)
                        await_free("v", slot)
                    load(j)
                return

            lo, hi = t.lo, t.hi
            for s_ in range(stages):                        # fill the ring
                pl.when(lo + s_ < hi)(functools.partial(load, lo + s_))

            @pl.loop(lo + stages, jnp.maximum(hi, lo + stages))
            def _refill(j):
                slot = step_slot(t, j)
                await_free("k", slot)
                if overlap:               # K_j is released a step before V_j: load it first
                    load(j, "k")
                await_free("v", slot)
                load(j, "v" if overlap else ("k", "v"))

        def run_producer():
            total = for_tiles(produce)
            for s_ in range(stages):                       # drain: observe each slot's last use
                @pl.when(s_ < total)
                def _drain(s_=s_):
                    await_free("k", s_)
                    await_free("v", s_)

        if warp_producer:
            # mgpu_fwd_warp_producer (GPU path): one warp issues the loads and waits for the
            # slots; the producer warpgroup's other three warps finish at once (tokamax's
            # producer), instead of four warps polling mbarriers next to the consumers.
            @plgpu.warp_map
            def _per_warp(warp_id):
                pl.when(warp_id == 0)(run_producer)
        else:
            run_producer()


def _mask_bwd_scores_if(masked, st, i, k0, bq: int, bk: int, cfg: FlashConfig,
                        rows: bool = False):
    """`_mask_bwd_scores` where `masked`: a Python bool (separate masked / unmasked loops) or a
    traced scalar (`mgpu_bwd_one_loop`: one step body, the mask under a uniform branch)."""
    if isinstance(masked, bool):
        return _mask_bwd_scores(st, i, k0, bq, bk, cfg, rows) if masked else st
    return lax.cond(masked, lambda x: _mask_bwd_scores(x, i, k0, bq, bk, cfg, rows),
                    lambda x: x, st)


def _mask_bwd_scores(st, i, k0, bq: int, bk: int, cfg: FlashConfig, rows: bool = False):
    """S^T [bk keys, bq queries] (or S [bq, bk] with `rows`) of keys k0.. and query block i
    with invisible pairs at -inf (key padding, causal diagonal, left window)."""
    shape, k_axis = ((bq, bk), 1) if rows else ((bk, bq), 0)
    kk = plgpu.broadcasted_iota(jnp.int32, shape, k_axis, layout=plgpu.Layout.WGMMA)
    qq = plgpu.broadcasted_iota(jnp.int32, shape, 1 - k_axis, layout=plgpu.Layout.WGMMA)
    k_pos = kk + k0
    q_pos = qq + (i * bq + cfg.lk - cfg.lq)
    mask = k_pos < cfg.lk
    if cfg.causal:
        mask &= k_pos <= q_pos
    if cfg.window is not None:
        mask &= k_pos > q_pos - cfg.window
    return jnp.where(mask, st, -jnp.inf)


class _BwdItem(NamedTuple):
    """One (batch, KV head, KV tile) work item of a backward CTA: its query-block range
    [lo, hi), steps (rep * (hi - lo)) and c0, the ring steps taken before it (persistent)."""
    b: jax.Array
    g: jax.Array
    tile: jax.Array
    lo: jax.Array
    hi: jax.Array
    total: jax.Array
    c0: jax.Array


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, ld_ref, dq_ref, dk_ref, dv_ref, smem,
                     barriers, *, cfg: FlashConfig, rep: int, stages: int, lq_pad: int,
                     gpu_path: bool, n_ctas: int = 0):
    """dk, dv of 2 * block_k keys of one KV head, and their dq contributions (FlashAttention-3).

    Consumer warpgroup w owns keys [k0, k0 + block_k) with K, V resident in SMEM; the producer
    streams (Q, dO, [lse; delta]) blocks of the `rep` query heads of the KV head over the CTA's
    visible query blocks. Per step a consumer computes S^T = K Q^T, P^T, dV += P^T dO,
    dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and writes dS^T (bf16) to SMEM; after
    a barrier both halves of dS are there and dq_block += dS K (each warpgroup one half of the
    head dim, K of both warpgroups) goes to HBM by a TMA reduce-add into an f32 accumulator.

    `n_ctas` > 0 (`mgpu_bwd_persistent`, no producer warpgroup): that many persistent CTAs walk
    the (batch, KV head, KV tile) items (`_bwd_items`); the Q/dO ring runs on across items (the
    last steps of an item load the first steps of the next) and the next item's K/V load is
    issued as soon as the TMA store of the last dK/dV has read its SMEM.
    """
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    d = q_ref.shape[-1]
    own = cfg.mgpu_bwd_dq == "own"      # each warpgroup reduces dS_w K_w of its own keys
    rows = cfg.mgpu_bwd_rows            # S, dP, P, dS as [queries, keys] (see _consumer_rows)
    producer = cfg.mgpu_bwd_producer    # else warpgroup 0 issues the ring's loads (255 regs)
    # column halves: 64 columns at D 128; at D 64 32 each (mgpu_bwd_dq_split) or warpgroup 0 only
    dq_wgs = 2 if (d >= 128 or own or cfg.mgpu_bwd_dq_split) else 1
    dh = d if own else d // dq_wgs
    wg = lax.axis_index("wg")
    k_smem, v_smem, q_smem, do_smem, ld_smem, ds_smem, dq_smem, p_smem = smem
    kv_ready, q_ready, do_ready, ld_ready, free, ds_sync, *pp_bars = barriers
    one_bar = cfg.mgpu_bwd_one_bar      # Q, dO, [lse; delta] of a slot on q_ready (3 arrivals)

    def wait_do(slot):
        if not one_bar:                 # else q_ready (always awaited first) covered it
            plgpu.barrier_wait(do_ready.at[slot])

    def wait_ld(slot):
        if not one_bar:
            plgpu.barrier_wait(ld_ready.at[slot])
    n_tiles, hkv, batch = k_ref.shape[1] // (2 * bk), k_ref.shape[2], q_ref.shape[0]

    def item_at(b_, g_, tile_, c0_):
        lo_, _, _, hi_ = _q_block_range(tile_ * (2 * bk), bq, 2 * bk, lq_pad, cfg)
        return _BwdItem(b_, g_, tile_, lo_, hi_, rep * (hi_ - lo_), c0_)

    # The current item's state: b, g, tile, cta_k0, lo, hi, n (query blocks per head), total
    # (steps), c0 (ring steps before it), t_prev (steps of the CTA's previous item, 0 if none)
    # and nxt ((has_next, fn() -> the next item): its first steps are loaded during this
    # item's last ones). The helpers below read these names when called; persistent CTAs
    # rebind them per item (`set_item`, inside the loop over items).
    def prefetch_next(j, cond):
        """Persistent CTAs: step j of the next item (if any) into its ring slot, where `cond`.
        The next item is computed here (only the last `stages` steps get here), so that its
        fields are not live through the item's steps."""
        has_next, next_item = nxt

        @pl.when(cond & has_next & (j >= 0))
        def _():
            it = next_item()
            pl.when(j < it.total)(functools.partial(load_step, j, it))

    def set_item(it: _BwdItem, t_prev_, nxt_):
        nonlocal b, g, tile, cta_k0, lo, hi, n, total, c0, t_prev, nxt
        b, g, tile, lo, hi, total, c0 = it
        cta_k0, n = tile * (2 * bk), hi - lo
        t_prev, nxt = t_prev_, nxt_

    b = g = tile = cta_k0 = lo = hi = n = total = c0 = t_prev = nxt = None
    if not n_ctas:
        set_item(item_at(lax.axis_index("batch"), lax.axis_index("heads"),
                         lax.axis_index("kv_tile"), jnp.int32(0)), jnp.int32(0), None)
    scale = cfg.sm_scale * LOG2E
    # mgpu_bwd_fold_scale: the [lse; delta] input holds lse - log2(sm_scale), so every P of the
    # kernel is sm_scale * P: dS, dK and dq come out scaled (no multiply), dV is divided once
    dq_scale = 1.0 if cfg.mgpu_bwd_fold_scale else cfg.sm_scale

    def scope(name):
        """A named range of Mosaic GPU's on-device profiler (`mgpu_bwd_profile` only)."""
        return jax.named_scope(name) if cfg.mgpu_bwd_profile else contextlib.nullcontext()

    def sync():
        if cfg.mgpu_bwd_named_sync and gpu_path:   # both consumer warpgroups, hardware barrier
            _named_barrier("sync", _BWD_SYNC_BAR, 256)
            return
        plgpu.barrier_arrive(ds_sync)
        plgpu.barrier_wait(ds_sync)

    def load_step(t, it: _BwdItem | None = None):
        """TMA of step t's Q, dO and [lse; delta] blocks (of the current item, or of `it`) into
        ring slot (c0 + t) % stages."""
        if it is None:
            it = _BwdItem(b, g, tile, lo, hi, total, c0)
        n_ = it.hi - it.lo
        slot = lax.rem(it.c0 + t, jnp.int32(stages))
        r = lax.div(t, n_)
        i = it.lo + t - r * n_
        h = it.g * rep + r
        at = (it.b, pl.ds(i * bq, bq), h)
        plgpu.copy_gmem_to_smem(q_ref.at[at], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[at], do_smem.at[slot],
                                (q_ready if one_bar else do_ready).at[slot])
        plgpu.copy_gmem_to_smem(ld_ref.at[it.b, h, :, pl.ds(i * bq, bq)], ld_smem.at[slot],
                                (q_ready if one_bar else ld_ready).at[slot])

    def own_keys(w):
        """Warpgroup w's keys: first key, unmasked query-block range, TMA of K and V into its
        SMEM slots (waited on kv_ready[w] / kv_ready[2 + w])."""
        k0 = cta_k0 + w * bk
        _, w_mid_lo, w_mid_hi, _ = _q_block_range(k0, bq, bk, lq_pad, cfg)
        w_mid_lo = jnp.minimum(jnp.maximum(w_mid_lo, lo), hi)
        w_mid_hi = jnp.minimum(jnp.maximum(w_mid_hi, w_mid_lo), hi)
        kv_at = (b, pl.ds(k0, bk), g)
        plgpu.copy_gmem_to_smem(k_ref.at[kv_at], k_smem.at[w], kv_ready.at[w])
        plgpu.copy_gmem_to_smem(v_ref.at[kv_at], v_smem.at[w], kv_ready.at[2 + w])
        return k0, w_mid_lo, w_mid_hi, kv_at

    def send_dq(w: int, dq, i, h, cols):
        """dq [bq, cols] of query block i, head h: to SMEM (once the last reduce-add has read
        it), then a TMA reduce-add into the f32 accumulator."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        dq_smem.at[w][...] = dq
        plgpu.commit_smem()
        q_at = (b, pl.ds(i * bq, bq), h, cols)
        if gpu_path:
            plgpu.copy_smem_to_gmem(dq_smem.at[w], dq_ref.at[q_at], reduction_op="add")
        else:           # interpret mode has no TMA reduction: a slot per (tile, wg), summed
            plgpu.copy_smem_to_gmem(dq_smem.at[w], dq_ref.at[(tile, w, *q_at)])

    def begin_consumer():
        """The default and rows consumers' start: registers up, own K/V in SMEM; returns
        (k0, w_mid_lo, w_mid_hi, kv_at, zero dK/dV accumulator)."""
        with scope("bwd_pro"):
            return _begin_consumer()

    def _begin_consumer():
        if producer:
            plgpu.set_max_registers(cfg.mgpu_bwd_regs[0], action="increase")
        else:           # warpgroup 0 fills the ring (no producer warpgroup) where the previous
            for t0 in range(stages):        # item's last steps did not (t0 >= stages - t_prev)
                pl.when((wg == 0) & (t0 < total) & (t0 + t_prev < stages))(
                    functools.partial(load_step, jnp.int32(t0)))
        k0, w_mid_lo, w_mid_hi, kv_at = own_keys(wg)
        plgpu.barrier_wait(kv_ready.at[wg])
        plgpu.barrier_wait(kv_ready.at[2 + wg])
        zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
        return k0, w_mid_lo, w_mid_hi, kv_at, zeros

    def step_slots(i, r):
        """Ring slot, dS buffer and query head of query block i of the r-th head of the group."""
        t = r * n + (i - lo)
        buf = 0 if own else lax.rem(t, jnp.int32(2))     # static 0: a constant index of a
        #                                                   transposed SMEM view fails to lower
        return lax.rem(c0 + t, jnp.int32(stages)), buf, g * rep + r

    def all_steps(step, w_mid_lo, w_mid_hi, carry):
        """`step(i, carry, r, masked)` over the rep query heads and the CTA's query blocks:
        masked edges and the unmasked middle in separate loops."""
        def scoped(i, carry, r, masked):
            with scope("bwd_step_m" if masked else "bwd_step"):
                return step(i, carry, r=r, masked=masked)

        if cfg.mgpu_bwd_one_loop and (cfg.causal or cfg.window is not None
                                      or cfg.lk % (2 * bk)):
            # one loop, one copy of the step body (the masked / unmasked copies of a causal
            # kernel are 3x the step's code, and the two warpgroups run different copies)
            def one(i, carry, r):
                with scope("bwd_step"):
                    return step(i, carry, r=r, masked=(i < w_mid_lo) | (i >= w_mid_hi))
            return lax.fori_loop(
                0, rep, lambda r, c: lax.fori_loop(lo, hi, functools.partial(one, r=r), c),
                carry)

        def head(r, carry):
            carry = lax.fori_loop(lo, w_mid_lo, functools.partial(scoped, r=r, masked=True),
                                  carry)
            carry = lax.fori_loop(w_mid_lo, w_mid_hi,
                                  functools.partial(scoped, r=r, masked=False), carry)
            return lax.fori_loop(w_mid_hi, hi, functools.partial(scoped, r=r, masked=True), carry)
        return lax.fori_loop(0, rep, head, carry)

    def write_dkdv(w, dk, dv, kv_at):
        with scope("bwd_epi"):
            _write_dkdv(w, dk, dv, kv_at)

    def _write_dkdv(w, dk, dv, kv_at):
        sync()                                   # the other warpgroup is done reading K and dS
        if cfg.mgpu_bwd_fold_scale:
            k_smem.at[w][...] = dk.astype(k_smem.dtype)
            v_smem.at[w][...] = (dv * (1.0 / cfg.sm_scale)).astype(v_smem.dtype)
        else:
            k_smem.at[w][...] = (dk * cfg.sm_scale).astype(k_smem.dtype)
            v_smem.at[w][...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem.at[w], dk_ref.at[kv_at])
        plgpu.copy_smem_to_gmem(v_smem.at[w], dv_ref.at[kv_at])
        # persistent: the next item's K/V may overwrite the SMEM once the stores have read it;
        # mgpu_bwd_early_exit: the CTA exits once its bulk stores (and dq reduce-adds) have read
        # their SMEM (CUTLASS's tma_store_wait), not when the writes completed
        plgpu.wait_smem_to_gmem(0, wait_read_only=bool(n_ctas) or cfg.mgpu_bwd_early_exit)

    def dv_ds_dk(pt, dpt, delta, slot, buf, w, dk, dv, tail=None):
        """The FA3-order end of a step (overlap and deferred-dq consumers): dV += P^T dO with
        P^T from registers, dS^T = P^T (dP^T - delta) computed while dV runs and written to
        SMEM (buffer `buf`, warpgroup `w`), dK += dS^T Q. Returns (dk, dv)."""
        pt_lo = pt.astype(q_smem.dtype)
        delta_b = lax.broadcast_in_dim(delta, pt.shape, [1])
        if gpu_path:
            def dv_dk(refs):
                dv_ref, dk_ref = refs
                plgpu.wgmma(dv_ref, pt_lo, do_smem.at[slot])
                ds_lo = (pt * (dpt - delta_b)).astype(q_smem.dtype)
                ds_smem.at[buf, w][...] = ds_lo
                plgpu.commit_smem()
                plgpu.wgmma(dk_ref, ds_lo, q_smem.at[slot])
                if tail is not None:        # mgpu_bwd_dq_fused: barrier + dq while dK runs
                    tail()
            dv, dk = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            return dk, dv
        # interpret mode: wgmma operands from SMEM, no run_state
        p_smem.at[w][...] = pt_lo
        ds_smem.at[buf, w][...] = (pt * (dpt - delta_b)).astype(q_smem.dtype)
        plgpu.commit_smem()

        def dv_dk_interpret(dv_ref, dk_ref):
            plgpu.wgmma(dv_ref, p_smem.at[w], do_smem.at[slot])
            plgpu.wgmma(dk_ref, ds_smem.at[buf, w], q_smem.at[slot])
            return dv_ref[...], dk_ref[...]
        dv_inc, dk_inc = pl.run_scoped(dv_dk_interpret, plgpu.ACC((bk, d), jnp.float32),
                                       plgpu.ACC((bk, d), jnp.float32))
        if tail is not None:
            tail()
        return dk + dk_inc, dv + dv_inc

    def rows_issue_s_dp(s_ref, dp_ref, slot, w):
        """Rows layout: S = Q K_w^T and dP = dO V_w^T ([bq, bk]) issued back to back."""
        plgpu.wgmma(s_ref, q_smem.at[slot], k_smem.at[w].transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_smem.at[slot], v_smem.at[w].transpose((1, 0)))

    def rows_p(s_ref, slot, i, k0, masked, w, wait_n=1):
        """Rows layout: P = exp2(S * scale - lse) once S is done (`wait_n` wgmma groups may
        still run: dP), stored to warpgroup w's P tile in SMEM (bf16); returns P in f32."""
        s_ = plgpu.wgmma_accumulator_load(s_ref, wait_n=wait_n)
        s_ = _mask_bwd_scores_if(masked, s_, i, k0, bq, bk, cfg, rows=True)
        lse = plgpu.load(ld_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(1))
        p = jnp.exp2(s_ * scale - lax.broadcast_in_dim(lse, s_.shape, [0]))
        p_smem.at[w][...] = p.astype(q_smem.dtype)
        return p

    def rows_tail(p, dp, slot, buf, w, dk, dv):
        """Rows layout, the end of a step: dV += P^T dO (P^T: the transposed SMEM view),
        dS = P (dP - delta) to SMEM while dV runs, dK += dS^T Q. Returns (dk, dv)."""
        plgpu.commit_smem()                                # P visible to the tensor cores
        delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(1))

        def ds_to_smem():
            ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
            ds_smem.at[buf, w][...] = ds.astype(q_smem.dtype)
            plgpu.commit_smem()

        def mms(dv_ref, dk_ref):
            plgpu.wgmma(dv_ref, p_smem.at[w].transpose((1, 0)), do_smem.at[slot])
            if gpu_path:
                ds_to_smem()                               # while dV is on the tensor cores
            plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)), q_smem.at[slot])
        if not gpu_path:
            ds_to_smem()                                   # interpret mode: no run_state
        return dv_dk_accumulate(mms, dk, dv)

    def dv_dk_accumulate(mms, dk, dv):
        """dV and dK accumulated by `mms(dv_ref, dk_ref)` (wgmma): in place through run_state
        on the GPU; in interpret mode into scoped accumulators, added after. Returns (dk, dv)."""
        if gpu_path:
            dv, dk = pl.run_state(lambda refs: mms(*refs))(
                (plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            return dk, dv

        def mms_interpret(dv_ref, dk_ref):
            mms(dv_ref, dk_ref)
            return dv_ref[...], dk_ref[...]
        dv_inc, dk_inc = pl.run_scoped(mms_interpret, plgpu.ACC((bk, d), jnp.float32),
                                       plgpu.ACC((bk, d), jnp.float32))
        return dk + dk_inc, dv + dv_inc

    def rows_dv_dk(slot, buf, w, dk, dv):
        """Rows layout with the early dS (`mgpu_bwd_ds_early`): dV += P^T dO and dK += dS^T Q
        with both A operands from SMEM (P and dS already there). Returns (dk, dv)."""
        def mms(dv_ref, dk_ref):
            plgpu.wgmma(dv_ref, p_smem.at[w].transpose((1, 0)), do_smem.at[slot])
            plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)), q_smem.at[slot])
        return dv_dk_accumulate(mms, dk, dv)

    def _consumer_defer(w: int):
        """The consumer with dq deferred by one step (`mgpu_bwd_defer_dq`, dq "halves"; `w` is
        the static warpgroup index). Step t issues dq_{t-1} (both dS^T halves of step t-1 are
        in SMEM), S^T_t and dP^T_t back to back; dq_{t-1} goes to HBM while S^T and dP^T run,
        P^T is computed while dP^T runs and dS^T while dV runs. The dS barrier is split: a
        warpgroup arrives after writing dS^T_t and waits only at the start of step t+1, so the
        two warpgroups are not in lock-step. "Step -1" has a zero dS^T (its dq adds zeros).
        Without a producer (session 6) warpgroup 0 refills the slot of step t-1 right after
        the dS barrier of step t: both warpgroups have then finished step t-1 (its dK/dV
        waited), so its Q, dO, lse and delta are no longer read."""
        if producer:
            plgpu.set_max_registers(cfg.mgpu_bwd_regs[0], action="increase")
        elif w == 0:        # the slots the previous item's last steps did not fill
            for t0 in range(stages):
                pl.when((t0 < total) & (t0 + t_prev < stages))(
                    functools.partial(load_step, jnp.int32(t0)))
        k0, w_mid_lo, w_mid_hi, kv_at = own_keys(w)
        k_own, v_own = k_smem.at[w], v_smem.at[w]
        zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
        ds_smem.at[1, w][...] = plgpu.layout_cast(jnp.zeros(ds_smem.shape[2:], q_smem.dtype),
                                                  plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_sync)                      # dS^T of step -1 (zeros)
        plgpu.barrier_wait(kv_ready.at[w])
        plgpu.barrier_wait(kv_ready.at[2 + w])
        does_dq = w < dq_wgs
        if does_dq and cfg.mgpu_bwd_wait_other_k:
            # dq_mm reads both warpgroups' K, from step 0 on (dq of "step -1"); the other
            # warpgroup arrived on ds_sync above before waiting for its own K, so the dS barrier
            # does not cover that load: without this wait the step -1 dq could read unloaded
            # SMEM (0 * NaN garbage = NaN dq; session 7's NaN of rows_defer_1b)
            plgpu.barrier_wait(kv_ready.at[1 - w])
        cols = pl.ds(w * dh, dh)

        def refill(t):
            """Without a producer, at the dS barrier of step t (t = total: the one after the
            loop): the slot of step t-1 gets step t-1+stages, of this item or (persistent) of
            the next one."""
            t_fill = t - 1 + stages
            pl.when((t >= 1) & (t_fill < total))(functools.partial(load_step, t_fill))
            if nxt is not None:
                prefetch_next(t_fill - total, t >= 1)

        dk_late = cfg.mgpu_bwd_dk_late
        acc_refs = []                                      # dk_late: (dk_ref, dv_ref)

        def release_prev(t):
            """dk_late: this warpgroup is done with the slot of step t-1 (its dV / dK waited)."""
            pl.when(t >= 1)(lambda: plgpu.barrier_arrive(free.at[lax.rem(
                c0 + t + stages - 1, jnp.int32(stages))]))

        def refill_prev(t):
            """dk_late, warpgroup 0: once both warpgroups released the slot of step t-1, load
            step t-1+stages into it."""
            if w != 0:
                return

            @pl.when(t >= 1)
            def _():
                plgpu.barrier_wait(free.at[lax.rem(c0 + t + stages - 1, jnp.int32(stages))])
                t_fill = t - 1 + stages
                pl.when(t_fill < total)(functools.partial(load_step, t_fill))

        def rows_tail_refs(p, dp, slot, buf, w, dk_ref, dv_ref):
            """rows_tail into the accumulators `dk_ref`, `dv_ref` (dk_late), not awaited."""
            plgpu.commit_smem()                            # P visible to the tensor cores
            delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(1))
            plgpu.wgmma(dv_ref, p_smem.at[w].transpose((1, 0)), do_smem.at[slot])
            ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
            ds_smem.at[buf, w][...] = ds.astype(q_smem.dtype)     # while dV runs
            plgpu.commit_smem()
            plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)), q_smem.at[slot])

        def dq_mm(dq_ref, buf):
            for u in range(2):
                ds_u = ds_smem.at[buf, u]
                plgpu.wgmma(dq_ref, ds_u if rows else ds_u.transpose((1, 0)),
                            k_smem.at[u, :, cols])

        def emit_dq(dq, i_prev, h_prev):
            send_dq(w, dq * dq_scale if dq_scale != 1.0 else dq, i_prev, h_prev, cols)

        def step(i, carry, r, masked):
            dk, dv, i_prev, h_prev = carry
            t = r * n + (i - lo)
            slot = lax.rem(c0 + t, jnp.int32(stages))
            buf, prev = lax.rem(t, jnp.int32(2)), lax.rem(t + 1, jnp.int32(2))
            h = g * rep + r
            plgpu.barrier_wait(q_ready.at[slot])
            wait_ld(slot)
            if not rows:
                lse = plgpu.load(ld_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(0))
                delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
            wait_do(slot)
            plgpu.barrier_wait(ds_sync)                    # both dS^T of step t-1 in SMEM
            if not producer and w == 0 and not dk_late:    # step t-1 is done: refill its slot
                refill(t)
            do_t = do_smem.at[slot].transpose((1, 0))

            def issue_s_dp(s_ref, dp_ref):
                if rows:
                    rows_issue_s_dp(s_ref, dp_ref, slot, w)
                else:
                    plgpu.wgmma(s_ref, k_own, q_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_own, do_t)

            def probs(s_ref):                              # P (rows) or P^T, S waited for
                if rows:
                    return rows_p(s_ref, slot, i, k0, masked, w)
                st = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
                st = _mask_bwd_scores_if(masked, st, i, k0, bq, bk, cfg)
                return jnp.exp2(st * scale - lax.broadcast_in_dim(lse, st.shape, [1]))

            def scores(s_ref, dp_ref):
                issue_s_dp(s_ref, dp_ref)
                return probs(s_ref), dp_ref[...]

            acc_s = plgpu.ACC(ds_smem.shape[2:], jnp.float32)
            if cfg.mgpu_bwd_dv_early:
                # dV issued as soon as P is in SMEM (queued right behind dP), dP awaited with
                # dV in flight, dS computed while dV runs, then dK. With dk_late nothing is
                # awaited to zero; without, the step ends on the run_state's wait (the ring
                # slot refilled at the dS barrier as in the default)
                def whole_step(dk_ref, dv_ref, s_ref, dp_ref, dq_ref=None, dk_issue=True):
                    if dq_ref is not None and w in cfg.mgpu_bwd_s_first:
                        return whole_step_s_first(dk_ref, dv_ref, s_ref, dp_ref, dq_ref)
                    if dq_ref is not None:
                        dq_mm(dq_ref, prev)
                    issue_s_dp(s_ref, dp_ref)
                    if dq_ref is not None:
                        dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=2)
                    else:
                        plgpu.wgmma_wait(2)
                    if dk_late:
                        release_prev(t)    # dV / dK of step t-1 are done (in-order retire)
                    if dq_ref is not None:
                        emit_dq(dq, i_prev, h_prev)
                    if dk_late:
                        refill_prev(t)
                    p = rows_p(s_ref, slot, i, k0, masked, w)           # S waited for
                    plgpu.commit_smem()                                 # P to the tensor cores
                    plgpu.wgmma(dv_ref, p_smem.at[w].transpose((1, 0)), do_smem.at[slot])
                    dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # dV may run on
                    delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(1))
                    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
                    ds_smem.at[buf, w][...] = ds.astype(q_smem.dtype)
                    plgpu.commit_smem()
                    if dk_issue:
                        plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)),
                                    q_smem.at[slot])

                def whole_step_s_first(dk_ref, dv_ref, s_ref, dp_ref, dq_ref):
                    """`mgpu_bwd_s_first` (session 9): S_t, dP_t, then dq_{t-1} issued; P is
                    computed once S is done (dP, dq still on the tensor cores), dV issued,
                    then dq (and with it dP: groups retire in order) awaited with dV in
                    flight and sent, dS computed, dK issued."""
                    issue_s_dp(s_ref, dp_ref)
                    dq_mm(dq_ref, prev)
                    p = rows_p(s_ref, slot, i, k0, masked, w, wait_n=2)   # S waited for
                    plgpu.commit_smem()                                 # P to the tensor cores
                    plgpu.wgmma(dv_ref, p_smem.at[w].transpose((1, 0)), do_smem.at[slot])
                    dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=1)  # dV may run on
                    emit_dq(dq, i_prev, h_prev)
                    dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # retired before dq
                    delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(1))
                    ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
                    ds_smem.at[buf, w][...] = ds.astype(q_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)), q_smem.at[slot])

                def whole_step_dq_mid(dk_ref, dv_ref, s_ref, dp_ref):
                    """`mgpu_bwd_dq_mid` (session 12): S_t, dP_t issued, P once S is done,
                    dV issued, dP awaited with dV in flight, dS_t to SMEM; then dq_{t-1} (both
                    dS halves of step t-1 are in SMEM since this step's dS barrier) issued
                    before dK_t, awaited with dK_t in flight and sent while it runs. The dq
                    accumulator is live only with dK, dV (and no S, dP, P): 192 f32
                    accumulator registers per thread at the peak instead of 224."""
                    whole_step(dk_ref, dv_ref, s_ref, dp_ref, dk_issue=False)

                    def dq_dk(dq_ref):
                        dq_mm(dq_ref, prev)
                        plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)),
                                    q_smem.at[slot])
                        return plgpu.wgmma_accumulator_load(dq_ref, wait_n=1)  # dK runs on
                    emit_dq(pl.run_scoped(dq_dk, plgpu.ACC((bq, dh), jnp.float32)), i_prev,
                            h_prev)

                def mms(dv_ref, dk_ref):
                    if does_dq and cfg.mgpu_bwd_dq_mid:
                        pl.run_scoped(functools.partial(whole_step_dq_mid, dk_ref, dv_ref),
                                      acc_s, acc_s)
                    elif does_dq:
                        pl.run_scoped(lambda dq_ref, s_ref, dp_ref: whole_step(
                            dk_ref, dv_ref, s_ref, dp_ref, dq_ref),
                            plgpu.ACC((bq, dh), jnp.float32), acc_s, acc_s)
                    else:
                        pl.run_scoped(functools.partial(whole_step, dk_ref, dv_ref), acc_s,
                                      acc_s)
                if dk_late:
                    mms(acc_refs[1], acc_refs[0])
                else:
                    dk, dv = dv_dk_accumulate(mms, dk, dv)
                plgpu.barrier_arrive(ds_sync)                # my dS^T of step t is in SMEM
                return dk, dv, i, h
            if does_dq:
                def dq_s_dp(dq_ref, s_ref, dp_ref):
                    dq_mm(dq_ref, prev)
                    # dq_{t-1} first (two groups), then S^T, dP^T: wait until those two are left
                    issue_s_dp(s_ref, dp_ref)
                    dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=2)
                    if dk_late:     # dV / dK of step t-1 are done too (groups retire in order)
                        release_prev(t)
                    emit_dq(dq, i_prev, h_prev)
                    if dk_late:
                        refill_prev(t)
                    return probs(s_ref), dp_ref[...]
                pt, dpt = pl.run_scoped(dq_s_dp, plgpu.ACC((bq, dh), jnp.float32), acc_s, acc_s)
            elif dk_late:
                def s_dp_late(s_ref, dp_ref):
                    issue_s_dp(s_ref, dp_ref)
                    plgpu.wgmma_wait(2)                    # dV / dK of step t-1 done
                    release_prev(t)
                    refill_prev(t)
                    return probs(s_ref), dp_ref[...]
                pt, dpt = pl.run_scoped(s_dp_late, acc_s, acc_s)
            else:
                pt, dpt = pl.run_scoped(scores, acc_s, acc_s)
            if dk_late:     # dV, dK issued into the CTA-long accumulators, not awaited here
                rows_tail_refs(pt, dpt, slot, buf, w, *acc_refs)
            elif rows:
                dk, dv = rows_tail(pt, dpt, slot, buf, w, dk, dv)
            else:
                dk, dv = dv_ds_dk(pt, dpt, delta, slot, buf, w, dk, dv)
            if producer:
                plgpu.barrier_arrive(free.at[slot])          # Q, dO, lse, delta of the slot
            plgpu.barrier_arrive(ds_sync)                    # my dS^T of step t is in SMEM
            return dk, dv, i, h

        i0 = jnp.minimum(lo, jnp.int32(lq_pad // bq - 1))  # any valid block: step -1 adds 0

        def steps_and_last_dq(carry):
            dk, dv, i_prev, h_prev = all_steps(step, w_mid_lo, w_mid_hi, carry)
            plgpu.barrier_wait(ds_sync)                    # the last step's dS^T
            if not producer and w == 0 and nxt is not None:
                refill(total)
            if does_dq:
                last = lax.rem(total + 1, jnp.int32(2))    # buffer of step total-1 (-1: zeros)

                def dq_last(dq_ref):
                    dq_mm(dq_ref, last)
                    return dq_ref[...]
                emit_dq(pl.run_scoped(dq_last, plgpu.ACC((bq, dh), jnp.float32)), i_prev,
                        h_prev)
            return dk, dv

        if dk_late:
            # mgpu_bwd_dk_late: dK / dV accumulate into CTA-long wgmma accumulators; a step
            # does not wait for its own dV / dK (they run on while the next step's dq, S, dP
            # are issued; the dq wait of step t+1 covers them). The ring slot of step t-1 is
            # released there: both warpgroups arrive on its "free" barrier, warpgroup 0 waits
            # and refills it with step t+1 (not at the dS barrier: dK_{t-1} may still read Q).
            def with_accs(dk_ref, dv_ref):
                acc_refs[:] = [dk_ref, dv_ref]
                steps_and_last_dq((None, None, i0, g * rep))
                return dk_ref[...], dv_ref[...]
            dk, dv = pl.run_scoped(with_accs, plgpu.ACC((bk, d), jnp.float32),
                                   plgpu.ACC((bk, d), jnp.float32))
        else:
            dk, dv = steps_and_last_dq((zeros, zeros, i0, g * rep))
        write_dkdv(w, dk, dv, kv_at)

    def _consumer_pingpong(w: int):
        """`mgpu_bwd_pingpong` (session 9b; rows + deferred dq without producer, D 128): the
        two warpgroups half a step apart instead of in lock step. The per-step dS barrier
        becomes one-way mbarriers per (warpgroup, dS buffer): `ds_full` (the warpgroup's dS
        half of a step is in SMEM, waited by the other before its dq reads it) and `ds_free`
        (the warpgroup's dq has read a buffer, waited by the other before it overwrites its
        half). Warpgroup 1 starts once warpgroup 0 has computed P of step 0 (`mid`) and issues
        dq_{t-1} at step t; warpgroup 0 issues dq_{t-2} (the lagging half of dS_{t-1} is
        written while warpgroup 0 is half-way through step t). Virtual steps -2 (buffer 0) and
        -1 (buffer 1) have zero dS (their dq is computed, not sent); warpgroup 1 never reads
        step -2, so warpgroup 0 does not announce its step -2 and does not wait before its
        first write of buffer 0. The ring slot of step t is refilled by warpgroup 1 (the later
        one) once both warpgroups have arrived on its `free` barrier. Every phase of every
        barrier is waited by its waiter (the interpreter checks it at deallocation)."""
        ds_full, ds_free, mid = pp_bars
        lag = 2 if w == 0 else 1                           # dq of step t - lag at step t
        if w == 0:
            for t0 in range(stages):
                pl.when(t0 < total)(functools.partial(load_step, jnp.int32(t0)))
        k0, w_mid_lo, w_mid_hi, kv_at = own_keys(w)
        zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
        for u in range(2):                                 # dS of steps -2, -1: zeros
            ds_smem.at[u, w][...] = plgpu.layout_cast(jnp.zeros(ds_smem.shape[2:], q_smem.dtype),
                                                      plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        if w == 1:
            plgpu.barrier_arrive(ds_full.at[2])            # step -2 (only warpgroup 0 reads it)
        plgpu.barrier_arrive(ds_full.at[2 * w + 1])        # step -1
        plgpu.barrier_wait(kv_ready.at[w])
        plgpu.barrier_wait(kv_ready.at[2 + w])
        plgpu.barrier_wait(kv_ready.at[1 - w])             # dq reads the other warpgroup's K
        cols = pl.ds(w * dh, dh)
        if w == 1:                                         # start half a step behind
            pl.when(total > 0)(lambda: plgpu.barrier_wait(mid.at[0]))

        def dq_mm(dq_ref, rbuf):
            for u in range(2):
                plgpu.wgmma(dq_ref, ds_smem.at[rbuf, u], k_smem.at[u, :, cols])

        def emit_dq(dq, i_, h_):
            send_dq(w, dq * dq_scale if dq_scale != 1.0 else dq, i_, h_, cols)

        def step(i, carry, r, masked):
            dk, dv, hist = carry                           # hist: (i, h) of steps t-1, t-2
            t = r * n + (i - lo)
            slot = lax.rem(c0 + t, jnp.int32(stages))
            buf = lax.rem(t, jnp.int32(2))
            rbuf = lax.rem(t - lag + 2, jnp.int32(2))      # buffer of step t - lag
            h = g * rep + r
            plgpu.barrier_wait(q_ready.at[slot])
            wait_ld(slot)
            wait_do(slot)
            plgpu.barrier_wait(ds_full.at[2 * (1 - w) + rbuf])   # other half of dS_{t-lag}

            def dq_s_dp(dq_ref, s_ref, dp_ref):
                dq_mm(dq_ref, rbuf)
                rows_issue_s_dp(s_ref, dp_ref, slot, w)
                dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=2)
                plgpu.barrier_arrive(ds_free.at[2 * w + rbuf])   # dS_{t-lag} read
                # steps < 0 add zeros: not sent (in interpret mode the TMA is a copy into a
                # block that a real step also writes, unordered: the race detector's race)
                pl.when(t >= lag)(lambda: emit_dq(dq, *hist[lag - 1]))
                p = rows_p(s_ref, slot, i, k0, masked, w)
                if w == 0:
                    pl.when(t == 0)(lambda: plgpu.barrier_arrive(mid.at[0]))
                return p, dp_ref[...]
            acc_s = plgpu.ACC(ds_smem.shape[2:], jnp.float32)
            p, dp = pl.run_scoped(dq_s_dp, plgpu.ACC((bq, dh), jnp.float32), acc_s, acc_s)
            # buffer `buf` holds dS_{t-2}: the other warpgroup's dq has read it (warpgroup 1
            # never reads step -2: no wait before warpgroup 0's step 0)
            if w == 0:
                pl.when(t >= 1)(lambda: plgpu.barrier_wait(ds_free.at[2 + buf]))
            else:
                plgpu.barrier_wait(ds_free.at[buf])
            dk, dv = rows_tail(p, dp, slot, buf, w, dk, dv)
            plgpu.barrier_arrive(ds_full.at[2 * w + buf])  # my dS_t is in SMEM
            plgpu.barrier_arrive(free.at[slot])            # done with the slot (dV, dK waited)
            if w == 1:                                     # both done: refill it
                plgpu.barrier_wait(free.at[slot])
                pl.when(t + stages < total)(functools.partial(load_step, t + stages))
            return dk, dv, ((i, h), hist[0])

        i0 = jnp.minimum(lo, jnp.int32(lq_pad // bq - 1))  # any valid block: steps < 0 add 0
        h0 = g * rep
        dk, dv, hist = all_steps(step, w_mid_lo, w_mid_hi, (zeros, zeros, ((i0, h0), (i0, h0))))
        for back in range(lag, 0, -1):                     # dq of steps total - lag .. total - 1
            rbuf = lax.rem(total - back + 2, jnp.int32(2))
            plgpu.barrier_wait(ds_full.at[2 * (1 - w) + rbuf])

            def dq_last(dq_ref, rbuf=rbuf):
                dq_mm(dq_ref, rbuf)
                return dq_ref[...]
            dq = pl.run_scoped(dq_last, plgpu.ACC((bq, dh), jnp.float32))
            pl.when(total >= back)(functools.partial(emit_dq, dq, *hist[back - 1]))
            plgpu.barrier_arrive(ds_free.at[2 * w + rbuf])
        for s_ in (total - 2, total - 1):                  # the other's last two dq reads
            # (observed, so that no phase of ds_free is left unwaited; warpgroup 1 never
            # announces step -2)
            pl.when(s_ >= (-1 if w == 0 else -2))(functools.partial(
                plgpu.barrier_wait, ds_free.at[2 * (1 - w) + lax.rem(s_ + 2, jnp.int32(2))]))
        write_dkdv(w, dk, dv, kv_at)

    def _consumer():
        # SMEM is indexed by warpgroup on untiled leading axes only (no dynamic slices of a
        # tiled axis): K/V [2, bk, D], dS^T [buffer, 2, bk, bq].
        k0, w_mid_lo, w_mid_hi, kv_at, zeros = begin_consumer()
        k_own, v_own = k_smem.at[wg], v_smem.at[wg]

        def mask_scores(st, i, masked):
            return _mask_bwd_scores_if(masked, st, i, k0, bq, bk, cfg)

        def step(i, carry, r, masked):
            dk, dv = carry
            slot, buf, h = step_slots(i, r)
            plgpu.barrier_wait(q_ready.at[slot])
            do_t = do_smem.at[slot].transpose((1, 0))
            if cfg.mgpu_bwd_overlap:
                # FA3 order: S^T and dP^T are issued back to back; P^T is computed while dP^T
                # is still on the tensor cores (wait until one wgmma group is left), and dS^T
                # while dV runs.
                wait_ld(slot)
                lse = plgpu.load(ld_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(0))
                delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
                wait_do(slot)

                def s_dp(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, k_own, q_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_own, do_t)
                    st = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
                    st = mask_scores(st, i, masked)
                    # the scale folded into exp2's argument: one FFMA per score
                    pt = jnp.exp2(st * scale - lax.broadcast_in_dim(lse, st.shape, [1]))
                    return pt, dp_ref[...]
                pt, dpt = pl.run_scoped(s_dp, plgpu.ACC((bk, bq), jnp.float32),
                                        plgpu.ACC((bk, bq), jnp.float32))
                if cfg.mgpu_bwd_dq_fused:
                    def tail():
                        fused_dq_tail(i, slot, buf, h, r)
                    return dv_ds_dk(pt, dpt, delta, slot, buf, wg, dk, dv, tail)
                dk, dv = dv_ds_dk(pt, dpt, delta, slot, buf, wg, dk, dv)
                return dq_step(i, slot, buf, h, dk, dv, r)

            def qk(s_ref):
                plgpu.wgmma(s_ref, k_own, q_smem.at[slot].transpose((1, 0)))
                return s_ref[...]
            lean = cfg.mgpu_bwd_p_lo
            st = pl.run_scoped(qk, plgpu.ACC((bk, bq), jnp.float32))
            if not lean:
                st = st * scale
            st = mask_scores(st, i, masked)
            wait_ld(slot)
            lse = plgpu.load(ld_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(0))
            lse_b = lax.broadcast_in_dim(lse, st.shape, [1])
            if lean:        # scale folded into exp2's argument; delta loaded after dP^T
                pt = jnp.exp2(st * scale - lse_b)
            else:
                delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
                pt = jnp.exp2(st - lse_b)
            pt_lo = pt.astype(q_smem.dtype)
            wait_do(slot)
            if gpu_path:
                def dv_dp(refs):
                    dv_ref, dp_ref = refs
                    plgpu.wgmma(dv_ref, pt_lo, do_smem.at[slot])
                    plgpu.wgmma(dp_ref, v_own, do_t)
                dv, dpt = pl.run_state(dv_dp)(
                    (plgpu.ACC.init(dv), plgpu.ACC.init(
                        plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32),
                                          plgpu.Layout.WGMMA))))
            else:                   # interpret mode: wgmma operands from SMEM, no run_state
                p_smem.at[wg][...] = pt_lo
                plgpu.commit_smem()

                def dv_dp(dv_ref, dp_ref):
                    plgpu.wgmma(dv_ref, p_smem.at[wg], do_smem.at[slot])
                    plgpu.wgmma(dp_ref, v_own, do_t)
                    return dv_ref[...], dp_ref[...]
                dv_inc, dpt = pl.run_scoped(dv_dp, plgpu.ACC((bk, d), jnp.float32),
                                            plgpu.ACC((bk, bq), jnp.float32))
                dv = dv + dv_inc
            if lean:        # dS from the bf16 P^T: the f32 P^T dies at the cast
                pt = pt_lo.astype(jnp.float32)
                delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
            ds_lo = dst.astype(q_smem.dtype)
            ds_smem.at[buf, wg][...] = ds_lo
            plgpu.commit_smem()
            if gpu_path:
                def dk_mm(dk_ref):
                    plgpu.wgmma(dk_ref, ds_lo, q_smem.at[slot])
                dk = pl.run_state(dk_mm)(plgpu.ACC.init(dk))
            else:
                def dk_mm(acc_ref):
                    plgpu.wgmma(acc_ref, ds_smem.at[buf, wg], q_smem.at[slot])
                    return acc_ref[...]
                dk = dk + pl.run_scoped(dk_mm, plgpu.ACC((bk, d), jnp.float32))
            return dq_step(i, slot, buf, h, dk, dv, r)

        dk, dv = all_steps(step, w_mid_lo, w_mid_hi, (zeros, zeros))
        write_dkdv(wg, dk, dv, kv_at)

    def dq_step(i, slot, buf, h, dk, dv, r=None):
        """Releases the slot, then dq of query block i (head h) from the dS tiles of both
        warpgroups in SMEM (dS^T [keys, queries], or dS [queries, keys] with `rows`): a TMA
        reduce-add into the f32 accumulator. Returns (dk, dv) unchanged."""
        refill = release_and_sync(i, slot, r)
        dq_send(i, buf, h, refill)
        return dk, dv

    def release_and_sync(i, slot, r):
        """Step end: the ring slot is released (or refilled by warpgroup 0 without a producer)
        and, for dq "halves", both warpgroups meet (both dS tiles are in SMEM)."""
        if producer:
            plgpu.barrier_arrive(free.at[slot])          # Q, dO, lse, delta of the slot
        if not own:
            sync()                                       # both halves of dS^T are in SMEM
        if not producer and not own:    # both warpgroups are past their reads of the slot
            t_next = r * n + (i - lo) + stages

            def refill():
                pl.when((wg == 0) & (t_next < total))(functools.partial(load_step, t_next))
                if nxt is not None:     # persistent: the next item's first steps
                    prefetch_next(t_next - total, wg == 0)
            if cfg.mgpu_bwd_late_refill and dq_wgs == 2:
                return refill           # issued by warpgroup 0 once its dq wgmma is issued
            refill()
        elif not producer:                               # dq "own": no barrier to lean on
            release_to_wg0(i, slot, r)
        return None

    def release_to_wg0(i, slot, r):
        """Without a producer: both warpgroups arrive on the slot's "free" barrier once done
        with it; warpgroup 0 waits for both (every phase, refill or not) and refills it."""
        plgpu.barrier_arrive(free.at[slot])
        t_next = r * n + (i - lo) + stages

        @pl.when(wg == 0)
        def _refill():
            plgpu.barrier_wait(free.at[slot])
            pl.when(t_next < total)(functools.partial(load_step, t_next))

    def fused_dq_tail(i, slot, buf, h, r):
        """`mgpu_bwd_dq_fused`, called right after this warpgroup's dK issue: the dS barrier,
        dq (its wait also covers dK), then the slot release. dK reads Q of the slot, so the
        release waits for both warpgroups' dK: an arrival on the slot's "free" barrier, which
        the producer (or, without one, warpgroup 0 before it refills the slot) waits on."""
        if not own:
            sync()                                       # both dS tiles are in SMEM
        dq_send(i, buf, h)
        plgpu.wgmma_wait(0)                              # dK done (a no-op after dq's wait)
        if producer:
            plgpu.barrier_arrive(free.at[slot])
        else:
            release_to_wg0(i, slot, r)

    def dq_first_tail(i, slot, buf, h, dk_ref):
        """`mgpu_bwd_dq_first` (rows, dV early; FA3's order): once both dS tiles are in SMEM,
        dq (this warpgroup's column half) is issued, then dK += dS^T Q, and dq is awaited with
        dK still in flight, so the dq store and its TMA reduce-add overlap dK."""
        sync()                                           # both dS tiles are in SMEM

        def branch(w: int):
            cols = pl.ds(w * dh, dh)

            def dq_mm(acc_ref):
                for u in range(2):
                    plgpu.wgmma(acc_ref, ds_smem.at[buf, u], k_smem.at[u, :, cols])
                plgpu.wgmma(dk_ref, ds_smem.at[buf, w].transpose((1, 0)), q_smem.at[slot])
                return plgpu.wgmma_accumulator_load(acc_ref, wait_n=1)   # dK may run on
            dq = pl.run_scoped(dq_mm, plgpu.ACC((bq, dh), jnp.float32))
            send_dq(w, dq * dq_scale if dq_scale != 1.0 else dq, i, h, cols)

        for w in range(2):
            pl.when(wg == w)(functools.partial(branch, w))

    def dq_send(i, buf, h, refill=None):
        """dq of query block i (head h) from the dS tile(s) in SMEM, TMA reduce-added.
        `refill` (mgpu_bwd_late_refill): warpgroup 0's ring refill, issued while its dq runs."""
        def dq_block(w: int):                            # static warpgroup index
            if own:         # dq += dS_w K_w over the full head dim
                terms = [(ds_smem.at[buf, w], k_smem.at[w])]
                cols = pl.ds(0, d)
            else:           # columns [w * dh, (w + 1) * dh) over both warpgroups' keys
                cols = pl.ds(w * dh, dh)
                terms = [(ds_smem.at[buf, u], k_smem.at[u, :, cols]) for u in range(2)]

            def dq_mm(acc_ref):
                for ds_ref, k_ref_ in terms:
                    plgpu.wgmma(acc_ref, ds_ref if rows else ds_ref.transpose((1, 0)), k_ref_)
                if refill is not None and w == 0:
                    refill()
                return acc_ref[...]
            dq = pl.run_scoped(dq_mm, plgpu.ACC((bq, dh), jnp.float32))
            if dq_scale != 1.0:
                dq = dq * dq_scale
            send_dq(w, dq, i, h, cols)

        for w in range(dq_wgs):
            pl.when(wg == w)(functools.partial(dq_block, w))

    def _consumer_rows():
        """The consumer with query rows (`mgpu_bwd_rows`, FlashAttention-3's D=128 layout):
        S = Q K_w^T and dP = dO V_w^T are [block_q, block_k] tiles whose rows are queries, so
        lse and delta are row vectors (2 registers per thread instead of 16 for the column
        vectors of S^T), and P, dS go to SMEM as [queries, keys]; dV += P^T dO and
        dK += dS^T Q take the transposed SMEM views as A operands, dq = dS K takes dS as is.
        S and dP are issued back to back, P is computed and stored while dP runs, dS while dV
        runs. Live registers at the peak: dK, dV (2 * block_k * D / 128) + P and dP (f32)."""
        k0, w_mid_lo, w_mid_hi, kv_at, zeros = begin_consumer()

        def step(i, carry, r, masked):
            dk, dv = carry
            slot, buf, h = step_slots(i, r)
            plgpu.barrier_wait(q_ready.at[slot])
            wait_do(slot)
            wait_ld(slot)

            if cfg.mgpu_bwd_dv_early:
                def step_mms(dv_ref, dk_ref):
                    def s_dp(s_ref, dp_ref):
                        rows_issue_s_dp(s_ref, dp_ref, slot, wg)
                        p = rows_p(s_ref, slot, i, k0, masked, wg)      # S waited for
                        plgpu.commit_smem()
                        plgpu.wgmma(dv_ref, p_smem.at[wg].transpose((1, 0)), do_smem.at[slot])
                        dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # dV may run
                        delta = plgpu.load(ld_smem.at[slot, 1],
                                           layout=plgpu.Layout.WGMMA.reduce(1))
                        ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
                        ds_smem.at[buf, wg][...] = ds.astype(q_smem.dtype)
                        plgpu.commit_smem()
                        if not cfg.mgpu_bwd_dq_first:
                            plgpu.wgmma(dk_ref, ds_smem.at[buf, wg].transpose((1, 0)),
                                        q_smem.at[slot])
                    pl.run_scoped(s_dp, plgpu.ACC((bq, bk), jnp.float32),
                                  plgpu.ACC((bq, bk), jnp.float32))
                    if cfg.mgpu_bwd_dq_first:   # FA3's order: dq, then dK (runs during the
                        dq_first_tail(i, slot, buf, h, dk_ref)   # dq store)
                    elif cfg.mgpu_bwd_dq_fused:   # dq issued while dK still runs
                        fused_dq_tail(i, slot, buf, h, r)
                if gpu_path:
                    dv, dk = pl.run_state(lambda refs: step_mms(*refs))(
                        (plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                else:       # interpret mode: no run_state; increments from zero, then added
                    def step_interpret(dv_ref, dk_ref):
                        step_mms(dv_ref, dk_ref)
                        return dv_ref[...], dk_ref[...]
                    dv_inc, dk_inc = pl.run_scoped(step_interpret,
                                                   plgpu.ACC((bk, d), jnp.float32),
                                                   plgpu.ACC((bk, d), jnp.float32))
                    dv, dk = dv + dv_inc, dk + dk_inc
                if cfg.mgpu_bwd_dq_first:   # dK of both warpgroups read the slot's Q
                    release_to_wg0(i, slot, r)
                    return dk, dv
                if cfg.mgpu_bwd_dq_fused:
                    return dk, dv
                return dq_step(i, slot, buf, h, dk, dv, r)

            if cfg.mgpu_bwd_ds_early:
                def s_dp_ds(s_ref, dp_ref):
                    rows_issue_s_dp(s_ref, dp_ref, slot, wg)
                    p = rows_p(s_ref, slot, i, k0, masked, wg)
                    delta = plgpu.load(ld_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(1))
                    ds = p * (dp_ref[...] - lax.broadcast_in_dim(delta, p.shape, [0]))
                    ds_smem.at[buf, wg][...] = ds.astype(q_smem.dtype)
                pl.run_scoped(s_dp_ds, plgpu.ACC((bq, bk), jnp.float32),
                              plgpu.ACC((bq, bk), jnp.float32))
                plgpu.commit_smem()                        # P and dS visible to the tensor cores
                dk, dv = rows_dv_dk(slot, buf, wg, dk, dv)
                return dq_step(i, slot, buf, h, dk, dv, r)

            def s_dp(s_ref, dp_ref):
                rows_issue_s_dp(s_ref, dp_ref, slot, wg)
                return rows_p(s_ref, slot, i, k0, masked, wg), dp_ref[...]
            p, dp = pl.run_scoped(s_dp, plgpu.ACC((bq, bk), jnp.float32),
                                  plgpu.ACC((bq, bk), jnp.float32))
            dk, dv = rows_tail(p, dp, slot, buf, wg, dk, dv)
            return dq_step(i, slot, buf, h, dk, dv, r)

        dk, dv = all_steps(step, w_mid_lo, w_mid_hi, (zeros, zeros))
        write_dkdv(wg, dk, dv, kv_at)

    if n_ctas:          # persistent: no producer, dq "halves" (check_backward_options)
        def consumer():
            if cfg.mgpu_bwd_defer_dq:
                for w in range(2):
                    pl.when(wg == w)(functools.partial(_consumer_defer, w))
            else:
                (_consumer_rows if rows else _consumer)()
        cta = lax.axis_index("cta")
        n_items = batch * hkv * n_tiles
        full_rounds, rem = divmod(n_items, n_ctas)
        last_slot = (n_ctas - 1 - cta) if full_rounds % 2 else cta
        n_local = full_rounds + (last_slot < rem).astype(jnp.int32)

        def item(r, c0_):
            """The r-th item of this CTA: items are handed out in rounds of n_ctas, the CTA
            order reversed every other round (heavy and light causal tiles pair up)."""
            k = r * n_ctas + jnp.where(lax.rem(r, 2) == 0, cta, n_ctas - 1 - cta)
            if cfg.causal:      # KV tiles slowest: all heavy (low) tiles before lighter ones
                tile_, rest = lax.div(k, hkv * batch), lax.rem(k, hkv * batch)
                b_, g_ = lax.div(rest, hkv), lax.rem(rest, hkv)
            else:               # the one-CTA-per-tile grid's order (heads, tiles, batch)
                g_, rest = lax.rem(k, hkv), lax.div(k, hkv)
                tile_, b_ = lax.rem(rest, n_tiles), lax.div(rest, n_tiles)
            return item_at(b_, g_, tile_, c0_)

        def body(r, carry):
            c0_, t_prev_ = carry
            it = item(r, c0_)
            set_item(it, t_prev_, (r + 1 < n_local, lambda: item(r + 1, c0_ + it.total)))
            consumer()
            return c0_ + it.total, it.total
        lax.fori_loop(0, n_local, body, (jnp.int32(0), jnp.int32(0)))
        plgpu.wait_smem_to_gmem(0)                       # the last dK/dV stores completed
        return
    if cfg.mgpu_bwd_pingpong:
        for w in range(2):
            pl.when(wg == w)(functools.partial(_consumer_pingpong, w))
    elif cfg.mgpu_bwd_defer_dq:
        for w in range(2):
            pl.when(wg == w)(functools.partial(_consumer_defer, w))
    elif rows:
        pl.when(wg < 2)(_consumer_rows)
    else:
        pl.when(wg < 2)(_consumer)

    if not producer:
        return

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(cfg.mgpu_bwd_regs[1], action="decrease")
        load = load_step

        for i in range(stages):
            pl.when(i < total)(functools.partial(load, jnp.int32(i)))

        @pl.loop(jnp.int32(stages), jnp.maximum(total, stages))
        def _refill(t):
            plgpu.barrier_wait(free.at[lax.rem(t, jnp.int32(stages))])
            load(t)

        for i in range(stages):
            pl.when(i < total)(lambda i=i: plgpu.barrier_wait(free.at[i]))


def _check_inputs(q, what: str):
    d = q.shape[-1]
    if d % 64 or d > 128:
        raise ValueError(f"the Mosaic GPU {what} needs head_dim 64 or 128, got {d}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU {what} needs bf16 or f16 inputs, got {q.dtype}")


def _grid(cfg: FlashConfig, heads, tiles, batch: int, fastest: bool = False) -> dict:
    """grid / grid_names: heads fastest (the default) or tiles fastest (`mgpu_tiles_fastest`
    or `fastest`: the CTAs in flight then share one head's K/V (forward) or Q/dO (backward) in
    L2)."""
    first, second = (tiles, heads) if cfg.mgpu_tiles_fastest or fastest else (heads, tiles)
    return dict(grid=(first[1], second[1], batch), grid_names=(first[0], second[0], "batch"))


def _warp_specialized(body, smem, barriers, *, out_type, grid, grid_names, kernel_name,
                      interpret, consumers: int = 2, compiler_params=None):
    """plgpu.kernel with `consumers` consumer warpgroups and one producer ("wg" 0 ..
    consumers - 1 | consumers): `body(*refs, smem, barriers)` gets the kernel's refs and the
    scoped SMEM / barrier trees. `compiler_params`: default `CompilerParams(approx_math=True)`."""
    def entry(*refs):
        pl.run_scoped(lambda smem_, barriers_: body(*refs, smem_, barriers_), smem, barriers,
                      collective_axes="wg")

    return plgpu.kernel(
        entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=consumers + 1,
        thread_name="wg", kernel_name=kernel_name,
        compiler_params=compiler_params or plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None)


def check_backward_options(cfg: FlashConfig):
    """ValueError for combinations of the Mosaic backward's `mgpu_bwd_*` options that have no
    kernel."""
    if cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_dq != "halves":
        raise ValueError("mgpu_bwd_defer_dq needs mgpu_bwd_dq='halves'")
    if cfg.mgpu_bwd_rows and (cfg.mgpu_bwd_overlap or cfg.mgpu_bwd_p_lo):
        raise ValueError("mgpu_bwd_rows has its own step order: it excludes mgpu_bwd_overlap "
                         "and mgpu_bwd_p_lo")
    if cfg.mgpu_bwd_ds_early and not (cfg.mgpu_bwd_rows and not cfg.mgpu_bwd_defer_dq):
        raise ValueError("mgpu_bwd_ds_early needs mgpu_bwd_rows without mgpu_bwd_defer_dq")
    if cfg.mgpu_bwd_dv_early and not (cfg.mgpu_bwd_ds_early or (
            cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_rows and not cfg.mgpu_bwd_producer)):
        raise ValueError("mgpu_bwd_dv_early needs mgpu_bwd_ds_early, or mgpu_bwd_defer_dq with "
                         "mgpu_bwd_rows and no producer")
    if cfg.mgpu_bwd_dq_fused and not (cfg.mgpu_bwd_dv_early or cfg.mgpu_bwd_overlap):
        raise ValueError("mgpu_bwd_dq_fused needs mgpu_bwd_dv_early or mgpu_bwd_overlap")
    if cfg.mgpu_bwd_dq_first and not (cfg.mgpu_bwd_dv_early and cfg.mgpu_bwd_dq == "halves"
                                      and not cfg.mgpu_bwd_producer
                                      and not cfg.mgpu_bwd_persistent
                                      and not cfg.mgpu_bwd_dq_fused):
        raise ValueError("mgpu_bwd_dq_first needs mgpu_bwd_dv_early, dq 'halves', no producer, "
                         "no persistent CTAs and no mgpu_bwd_dq_fused")
    if cfg.mgpu_bwd_dk_late and not (cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_rows
                                     and not cfg.mgpu_bwd_producer
                                     and not cfg.mgpu_bwd_persistent):
        raise ValueError("mgpu_bwd_dk_late needs mgpu_bwd_defer_dq and mgpu_bwd_rows without "
                         "producer and without persistent CTAs")
    if cfg.mgpu_bwd_s_first and not (cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_rows
                                     and cfg.mgpu_bwd_dv_early and not cfg.mgpu_bwd_producer
                                     and not cfg.mgpu_bwd_dk_late
                                     and set(cfg.mgpu_bwd_s_first) <= {0, 1}):
        raise ValueError("mgpu_bwd_s_first needs mgpu_bwd_defer_dq, mgpu_bwd_rows and "
                         "mgpu_bwd_dv_early without producer and without mgpu_bwd_dk_late, "
                         "and warpgroup indices 0 / 1")
    if cfg.mgpu_bwd_dq_mid and not (cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_rows
                                    and cfg.mgpu_bwd_dv_early and not cfg.mgpu_bwd_producer
                                    and not cfg.mgpu_bwd_dk_late and not cfg.mgpu_bwd_s_first
                                    and not cfg.mgpu_bwd_pingpong):
        raise ValueError("mgpu_bwd_dq_mid needs mgpu_bwd_defer_dq, mgpu_bwd_rows and "
                         "mgpu_bwd_dv_early without producer, and none of mgpu_bwd_dk_late, "
                         "mgpu_bwd_s_first, mgpu_bwd_pingpong")
    if cfg.mgpu_bwd_pingpong and not (cfg.mgpu_bwd_defer_dq and cfg.mgpu_bwd_rows
                                      and cfg.mgpu_bwd_dq == "halves"
                                      and not cfg.mgpu_bwd_producer
                                      and not cfg.mgpu_bwd_persistent
                                      and not cfg.mgpu_bwd_dv_early
                                      and not cfg.mgpu_bwd_dk_late
                                      and not cfg.mgpu_bwd_dq_split):
        raise ValueError("mgpu_bwd_pingpong needs mgpu_bwd_defer_dq, mgpu_bwd_rows, dq 'halves', "
                         "no producer, no persistent CTAs and none of mgpu_bwd_dv_early, "
                         "mgpu_bwd_dk_late, mgpu_bwd_dq_split")
    if cfg.mgpu_bwd_persistent and (cfg.mgpu_bwd_producer or cfg.mgpu_bwd_dq != "halves"
                                    or cfg.mgpu_bwd_dq_fused):
        raise ValueError("mgpu_bwd_persistent needs mgpu_bwd_producer=False, dq 'halves' and "
                         "no mgpu_bwd_dq_fused")


def mosaic_backward(q, k, v, o, lse, do, cfg: FlashConfig, *, stages: int = 2,
                    interpret: bool = False):
    """dq, dk, dv from the saved base-2 lse (the contract of `_flash_backward`, no segments).

    Needs bf16/f16 inputs and head_dim 64 or 128; lengths are padded here.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    _check_inputs(q, "backward")
    check_backward_options(cfg)
    delta = _attn.backward_delta(o, do, cfg.bwd_delta)
    qp, dop = _common.pad_axis(q, 1, bq), _common.pad_axis(do, 1, bq)
    kp, vp = _common.pad_axis(k, 1, 2 * bk), _common.pad_axis(v, 1, 2 * bk)
    lq_pad, lk_pad = qp.shape[1], kp.shape[1]
    if cfg.mgpu_bwd_fold_scale:     # P = exp2(S * c - lse) then carries the factor sm_scale
        lse = lse - math.log2(cfg.sm_scale)
    ld = jnp.stack([_common.pad_axis(lse[:, :, :lq], 2, bq),
                    _common.pad_axis(delta, 2, bq)], axis=2)          # [B, Hq, 2, Lq_pad]
    n_tiles = lk_pad // (2 * bk)
    n_ctas = cfg.mgpu_bwd_persistent
    if n_ctas < 0:                                         # one persistent CTA per SM
        n_ctas = 3 if interpret else getattr(jax.devices()[0], "core_count", 132)
    n_ctas = min(n_ctas, b * hkv * n_tiles)                # no idle persistent CTAs
    dq_shape = (b, lq_pad, hq, d) if not interpret else (n_tiles, 2, b, lq_pad, hq, d)
    dq_acc = jax.new_ref(jnp.zeros(dq_shape, jnp.float32))
    own = cfg.mgpu_bwd_dq == "own"
    dq_wgs = 2 if (d >= 128 or own or cfg.mgpu_bwd_dq_split) else 1
    dq_cols = d if own else d // dq_wgs
    rows = cfg.mgpu_bwd_rows
    ds_tile = (bq, bk) if rows else (bk, bq)
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    if dq_cols == 32:   # mgpu_bwd_dq_split at D 64: K's 32-column halves are whole tiles of a
        #                 64-byte swizzle (wgmma needs the same swizzle on both operands: all)
        tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))
    params = {}
    if cfg.mgpu_bwd_profile:    # ranges per warpgroup: prologue, every step, epilogue (+ slack)
        space = rep * (lq_pad // bq) + 2   # per item; persistent: all items, at most 256
        if n_ctas:              # ranges (4 KB of SMEM per warpgroup; the rest is dropped)
            space = min(space * -(-(b * hkv * n_tiles) // n_ctas), 256)
        params.update(profile_dir=cfg.mgpu_bwd_profile, profile_space=space + 6,
                      profile_bounds_check=True)
    if cfg.mgpu_bwd_nab and not interpret:
        # mgpu_bwd_nab: no warpgroup barrier before and after every SMEM store and TMA issue.
        # Each SMEM tile the kernel writes is read by wgmma or TMA only after commit_smem (fence
        # + warpgroup barrier) and, across warpgroups, the dS / dK-dV barrier; a tile is
        # rewritten only after its last wgmma read was awaited (P, dS: the step's final wgmma
        # wait; dq: wait_smem_to_gmem, which ends on a warpgroup barrier; K/V: the dK/dV
        # barrier) and the lse/delta values are consumed in registers before the refill.
        params.update(unsafe_no_auto_barriers=True)
    params = plgpu.CompilerParams(approx_math=True, **params) if params else None

    smem = (plgpu.SMEM((2, bk, d), q.dtype, transforms=tiles),
            plgpu.SMEM((2, bk, d), q.dtype, transforms=tiles),
            plgpu.SMEM((stages, bq, d), q.dtype, transforms=tiles),
            plgpu.SMEM((stages, bq, d), q.dtype, transforms=tiles),
            plgpu.SMEM((stages, 2, bq), jnp.float32),
            plgpu.SMEM((1 if own else 2, 2, *ds_tile), q.dtype, transforms=tiles),
            plgpu.SMEM((dq_wgs, bq, dq_cols), jnp.float32,
                       transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
                       if cfg.mgpu_bwd_dq_swizzle else ()),
            # P (rows) or P^T staging: the rows variant always, else interpret mode only (the
            # GPU path keeps P^T in registers).
            None if not (interpret or rows) else plgpu.SMEM((2, *ds_tile), q.dtype,
                                                            transforms=tiles))
    barriers = (plgpu.Barrier(num_barriers=4),
                plgpu.Barrier(num_arrivals=3 if cfg.mgpu_bwd_one_bar else 1,
                              num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2))
    if cfg.mgpu_bwd_pingpong:   # ds_full, ds_free [warpgroup * 2 + dS buffer], mid
        if dq_wgs != 2:
            raise ValueError("mgpu_bwd_pingpong needs head_dim 128 (dq halves over 2 "
                             "warpgroups)")
        barriers += (plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=4),
                     plgpu.Barrier(num_barriers=1))
    dk, dv = _warp_specialized(
        functools.partial(_backward_kernel, cfg=cfg, rep=rep, stages=stages, lq_pad=lq_pad,
                          gpu_path=not interpret, n_ctas=n_ctas),
        smem, barriers,
        out_type=(jax.ShapeDtypeStruct(kp.shape, k.dtype),
                  jax.ShapeDtypeStruct(vp.shape, v.dtype)),
        # CUDA launches the first grid axis fastest: KV tiles first keeps the CTAs in flight on
        # one head (its Q/dO stream shared in L2), heads first spreads them over all heads.
        **(dict(grid=(n_ctas,), grid_names=("cta",)) if n_ctas else
           _grid(cfg, ("heads", hkv), ("kv_tile", n_tiles), b)),
        consumers=2 if cfg.mgpu_bwd_producer else 1,   # num_threads = consumers + 1
        compiler_params=params,
        kernel_name=(f"flash_bwd_d{d}_{'causal' if cfg.causal else 'full'}_{cfg.mgpu_bwd_dq}"
                     f"{'_overlap' if cfg.mgpu_bwd_overlap else ''}"
                     f"{'_defer' if cfg.mgpu_bwd_defer_dq else ''}"
                     f"{'_plo' if cfg.mgpu_bwd_p_lo else ''}"
                     f"{'_rows' if cfg.mgpu_bwd_rows else ''}"
                     f"{'_early' if cfg.mgpu_bwd_ds_early else ''}"
                     f"{'_dv' if cfg.mgpu_bwd_dv_early else ''}"
                     f"{'_dqf' if cfg.mgpu_bwd_dq_fused else ''}"
                     f"{'' if cfg.mgpu_bwd_producer else '_noprod'}"
                     f"{f'_p{n_ctas}' if n_ctas else ''}"
                     f"_r{cfg.mgpu_bwd_regs[0]}_{cfg.mgpu_bwd_regs[1]}"
                     f"{'_tf' if cfg.mgpu_tiles_fastest else ''}"
                     f"{'_nab' if cfg.mgpu_bwd_nab else ''}"
                     f"{'_ns' if cfg.mgpu_bwd_named_sync else ''}"
                     f"{'_dqs' if cfg.mgpu_bwd_dq_swizzle else ''}"
                     f"{'_lr' if cfg.mgpu_bwd_late_refill else ''}"
                     f"{'_fs' if cfg.mgpu_bwd_fold_scale else ''}"
                     f"{'_ee' if cfg.mgpu_bwd_early_exit else ''}"
                     f"{'_ol' if cfg.mgpu_bwd_one_loop else ''}"
                     f"{'_1b' if cfg.mgpu_bwd_one_bar else ''}"
                     f"{'_dqf1' if cfg.mgpu_bwd_dq_first else ''}"
                     f"{'' if cfg.mgpu_bwd_wait_other_k else '_race'}"
                     f"{'_dkl' if cfg.mgpu_bwd_dk_late else ''}"
                     f"{''.join(f'_sf{w}' for w in cfg.mgpu_bwd_s_first)}"
                     f"{'_dqmid' if cfg.mgpu_bwd_dq_mid else ''}"
                     f"{'_dqs32' if dq_cols == 32 else ''}"
                     f"{'_pp' if cfg.mgpu_bwd_pingpong else ''}"),
        interpret=interpret,
    )(qp, kp, vp, dop, ld, dq_acc)
    dq = dq_acc[...]
    if interpret:
        dq = dq.sum(axis=(0, 1))
    return dq[:, :lq].astype(q.dtype), dk[:, :lk], dv[:, :lk]


def mosaic_forward(q, k, v, cfg: FlashConfig, *, stages: int = 2, ping_pong: bool = True,
                   interpret: bool = False):
    """o [B, Lq, Hq, D] and lse [B, Hq, Lq_pad] (base 2), the contract of `_flash_forward`."""
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nc = cfg.mgpu_fwd_wgs
    _check_inputs(q, "forward")
    if cfg.mgpu_fwd_overlap and nc != 2:
        raise ValueError("mgpu_fwd_overlap needs mgpu_fwd_wgs=2")
    n_ctas = cfg.mgpu_fwd_persistent
    if n_ctas < 0:                                         # one persistent CTA per SM
        n_ctas = 3 if interpret else getattr(jax.devices()[0], "core_count", 132)
    if cfg.mgpu_fwd_overlap and n_ctas:
        raise ValueError("mgpu_fwd_overlap and mgpu_fwd_persistent exclude each other")
    if cfg.mgpu_fwd_fa3_sched and (nc != 2 or cfg.mgpu_fwd_overlap):
        raise ValueError("mgpu_fwd_fa3_sched needs mgpu_fwd_wgs=2 without mgpu_fwd_overlap")
    if cfg.mgpu_fwd_q2 and not n_ctas:
        raise ValueError("mgpu_fwd_q2 needs mgpu_fwd_persistent")
    if cfg.mgpu_fwd_named_free and (cfg.mgpu_fwd_overlap or stages > 3):
        raise ValueError("mgpu_fwd_named_free needs mgpu_stages <= 3 without mgpu_fwd_overlap")
    if nc not in (2, 3) or nc * cfg.mgpu_fwd_regs[0] + cfg.mgpu_fwd_regs[1] > 512:
        raise ValueError(f"mgpu_fwd_wgs must be 2 or 3 with consumers * mgpu_fwd_regs[0] + "
                         f"mgpu_fwd_regs[1] <= 512, got {nc} and {cfg.mgpu_fwd_regs}")
    qp = _common.pad_axis(q, 1, nc * bq)
    kp, vp = _common.pad_axis(k, 1, bk), _common.pad_axis(v, 1, bk)
    lq_pad = qp.shape[1]
    n_ctas = min(n_ctas, b * hq * (lq_pad // (nc * bq)))  # no idle persistent CTAs
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    q2 = cfg.mgpu_fwd_q2
    smem = (plgpu.SMEM((2 * nc if q2 else nc, bq, d), q.dtype, transforms=tiles),
            plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiles),
            plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiles),
            plgpu.SMEM((nc, bq), jnp.float32),
            # P staging for interpret mode only (the GPU path keeps P in registers).
            None if not interpret else plgpu.SMEM((nc, bq, bk), q.dtype, transforms=tiles),
            # persistent CTAs: an O buffer, so that the next tile's Q loads during the epilogue
            None if not n_ctas or q2 else plgpu.SMEM((nc, bq, d), q.dtype,
                                                                 transforms=tiles))
    barriers = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2 * nc if q2 else nc),
                plgpu.Barrier(num_arrivals=nc, num_barriers=stages),
                plgpu.Barrier(num_arrivals=nc, num_barriers=stages),
                # ping-pong: a rendezvous of the consumers, (overlap) one token each, or
                # (fa3_sched, interpret mode) one 2-arrival barrier per consumer
                plgpu.Barrier(num_barriers=2) if cfg.mgpu_fwd_overlap
                else plgpu.Barrier(num_arrivals=2, num_barriers=2) if cfg.mgpu_fwd_fa3_sched
                else plgpu.Barrier(num_arrivals=nc))
    o, lse = _warp_specialized(
        functools.partial(_forward_kernel, cfg=cfg, rep=rep, stages=stages,
                          ping_pong=ping_pong, gpu_path=not interpret, n_ctas=n_ctas),
        smem, barriers,
        out_type=(jax.ShapeDtypeStruct(qp.shape, q.dtype),
                  jax.ShapeDtypeStruct((b, hq, lq_pad), jnp.float32)),
        **(dict(grid=(n_ctas,), grid_names=("sm",)) if n_ctas else
           _grid(cfg, ("heads", hq), ("q_tile", lq_pad // (nc * bq)), b,
                 cfg.mgpu_fwd_tiles_fastest)),
        kernel_name=(f"flash_fwd_d{d}_{'causal' if cfg.causal else 'full'}_bq{bq}_bk{bk}"
                     f"_s{stages}{'_fold' if cfg.mgpu_fold_scale else ''}"
                     f"_r{cfg.mgpu_fwd_regs[0]}_wg{nc}{'_ob' if cfg.mgpu_fwd_opt_barrier else ''}"
                     f"{'_ov' if cfg.mgpu_fwd_overlap else ''}"
                     f"{'_tf' if cfg.mgpu_tiles_fastest else ''}"
                     f"{'_nab' if cfg.mgpu_fwd_nab else ''}"
                     f"{'_rev' if cfg.mgpu_fwd_reverse else ''}"
                     f"{f'_p{n_ctas}' if n_ctas else ''}"
                     f"{'_fa3' if cfg.mgpu_fwd_fa3_sched else ''}"
                     f"{'_sp' if cfg.mgpu_fwd_skip_pad else ''}"
                     f"{'_kw' if cfg.mgpu_fwd_early_kwait else ''}"
                     f"{'_nf' if cfg.mgpu_fwd_named_free else ''}"
                     f"{'_sn' if cfg.mgpu_fwd_snake else ''}"
                     f"{'_q2' if cfg.mgpu_fwd_q2 else ''}"
                     f"{'_wp' if cfg.mgpu_fwd_warp_producer else ''}"
                     f"{'_obs' if cfg.mgpu_fwd_ob_split else ''}"
                     f"{'_le' if cfg.mgpu_fwd_lean_end else ''}"
                     f"{'_rw' if cfg.mgpu_fwd_read_wait else ''}"
                     f"{'_ql2' if cfg.mgpu_fwd_q_l2 else ''}"
                     f"{'_ftf' if cfg.mgpu_fwd_tiles_fastest else ''}"),
        interpret=interpret, consumers=nc,
        # mgpu_fwd_nab: no automatic barriers around SMEM accesses (no region is read and
        # written by one thread: Q/O and lse are written by registers only after the last
        # wgmma read of Q was awaited) and no cross-warp reduction scratch (the row max/sum of
        # the WGMMA layout reduce within a warp), 2 KB of SMEM freed.
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                             reduction_scratch_bytes=0)
        if cfg.mgpu_fwd_nab and not interpret else None,
    )(qp, kp, vp)
    return o[:, :lq], lse

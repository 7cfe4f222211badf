"""Flash attention forward as a Mosaic GPU kernel for Hopper (wgmma, TMA, warp specialisation).

EXPERIMENTAL: verified only in Mosaic GPU interpret mode (`plgpu.InterpretGPUParams`) on CPU; it
has never been compiled for or timed on a GPU. It is not a default path: select it with
`flash_attention_kernel(..., fwd_impl="mosaic")` (the backward stays the Triton-lowered kernels;
both share the saved base-2 log-sum-exp). See docs/kernels/flash_attention.md.

One CTA per (query head, 2 * block_q query rows, batch) runs three warpgroups: two consumers own
block_q rows each and a producer streams K/V blocks by TMA into a `stages`-deep shared-memory
ring (one mbarrier per slot for "loaded", one with two arrivals for "consumed"). A consumer
computes S = Q K^T by wgmma, the base-2 online softmax in registers, and O += P V by wgmma with P
from registers; a shared "schedule" barrier alternates the two consumers (FA3 ping-pong) so one's
softmax overlaps the other's matmuls. Both consumers step through the CTA's whole KV block range
in lock-step (the ring is shared): steps outside a consumer's own visible range only wait and
release the slot; steps inside are masked at the edges (causal diagonal, window, key padding)
and unmasked in the middle. Inputs bf16 or f16, head_dim 64 or 128; lengths padded outside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels.attention import LOG2E, MASK_VALUE, FlashConfig, _kv_block_range


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, barriers, *, cfg: FlashConfig,
                    rep: int, stages: int, ping_pong: bool, gpu_path: bool):
    bq, bk = cfg.block_q, cfg.block_k
    b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tile")
    wg = lax.axis_index("wg")
    qo_smem, k_smem, v_smem, lse_smem, p_smem = smem
    k_ready, v_ready, q_ready, k_free, v_free, schedule = barriers
    cta_q0 = tile * (2 * bq)
    lo, _, _, hi = _kv_block_range(cta_q0, 2 * bq, bk, cfg)   # blocks any row of the CTA sees

    def step_slot(j):
        return lax.rem(j - lo, jnp.int32(stages))

    def sync_schedule():
        if ping_pong:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q0 = cta_q0 + wg * bq
        w_lo, w_mid_lo, w_mid_hi, w_hi = _kv_block_range(q0, bq, bk, cfg)
        w_lo, w_hi = jnp.maximum(w_lo, lo), jnp.minimum(w_hi, hi)
        w_mid_lo = jnp.minimum(jnp.maximum(w_mid_lo, w_lo), w_hi)
        w_mid_hi = jnp.minimum(jnp.maximum(w_mid_hi, w_mid_lo), w_hi)
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m = plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
                                plgpu.Layout.WGMMA)
        if ping_pong:
            pl.when(wg == 1)(sync_schedule)

        def skip(j, carry):
            slot = step_slot(j)
            plgpu.barrier_wait(k_ready.at[slot])
            sync_schedule()
            plgpu.barrier_arrive(k_free.at[slot])
            if ping_pong:
                plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            if ping_pong:
                plgpu.barrier_wait(schedule)
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

        def visit(j, carry, masked):
            acc, m, l = carry
            slot = step_slot(j)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                sync_schedule()
                return s_ref[...]
            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * (cfg.sm_scale * LOG2E)
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
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p_lo = p.astype(v_smem.dtype)
            if ping_pong:
                plgpu.barrier_arrive(schedule)             # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            if ping_pong:
                plgpu.barrier_wait(schedule)               # the tensor cores are ours again

            if gpu_path:                                   # P from registers, O in place
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:
                # GPU interpret mode has no run_state and reads wgmma operands from SMEM only.
                p_smem.at[wg][...] = p_lo
                plgpu.commit_smem()

                def pv(pv_ref):
                    plgpu.wgmma(pv_ref, p_smem.at[wg], v_smem.at[slot])
                    return pv_ref[...]
                acc = acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(lo, w_lo, skip, carry)
        carry = lax.fori_loop(w_lo, w_mid_lo, functools.partial(visit, masked=True), carry)
        carry = lax.fori_loop(w_mid_lo, w_mid_hi, functools.partial(visit, masked=False), carry)
        carry = lax.fori_loop(w_mid_hi, w_hi, functools.partial(visit, masked=True), carry)
        acc, m, l = lax.fori_loop(w_hi, hi, skip, carry)
        if ping_pong:
            pl.when(wg == 0)(sync_schedule)

        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(q_smem.dtype)
        lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe) * LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        g = lax.div(h, jnp.int32(rep))

        def load(j):
            slot = step_slot(j)
            at = (b, pl.ds(j * bk, bk), g)
            plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_ready.at[slot])

        for i in range(stages):                            # fill the ring
            pl.when(lo + i < hi)(functools.partial(load, lo + i))

        @pl.loop(lo + stages, jnp.maximum(hi, lo + stages))
        def _refill(j):
            slot = step_slot(j)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            load(j)

        for i in range(stages):                            # drain: observe each slot's last use
            @pl.when(lo + i < hi)
            def _drain(i=i):
                plgpu.barrier_wait(k_free.at[i])
                plgpu.barrier_wait(v_free.at[i])


def mosaic_forward(q, k, v, cfg: FlashConfig, *, stages: int = 2, ping_pong: bool = True,
                   interpret: bool = False):
    """o [B, Lq, Hq, D] and lse [B, Hq, Lq_pad] (base 2), the contract of `_flash_forward`."""
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    if d % 64 or d > 128:
        raise ValueError(f"the Mosaic GPU forward needs head_dim 64 or 128, got {d}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU forward needs bf16 or f16 inputs, got {q.dtype}")
    qp = _common.pad_axis(q, 1, 2 * bq)
    kp, vp = _common.pad_axis(k, 1, bk), _common.pad_axis(v, 1, bk)
    lq_pad = qp.shape[1]
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        smem = (plgpu.SMEM((2, bq, d), q.dtype, transforms=tiles),
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiles),
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiles),
                plgpu.SMEM((2, bq), jnp.float32),
                # P staging for interpret mode only (the GPU path keeps P in registers).
                None if not interpret else plgpu.SMEM((2, bq, bk), q.dtype, transforms=tiles))
        barriers = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                    plgpu.Barrier(num_barriers=2),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2))
        pl.run_scoped(
            lambda smem, barriers: _forward_kernel(
                q_ref, k_ref, v_ref, o_ref, lse_ref, smem, barriers, cfg=cfg, rep=rep,
                stages=stages, ping_pong=ping_pong, gpu_path=not interpret),
            smem, barriers, collective_axes="wg")

    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(qp.shape, q.dtype),
                  jax.ShapeDtypeStruct((b, hq, lq_pad), jnp.float32)),
        grid=(hq, lq_pad // (2 * bq), b),
        grid_names=("heads", "q_tile", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(qp, kp, vp)
    return o[:, :lq], lse

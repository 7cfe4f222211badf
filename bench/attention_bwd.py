"""Backward variants of the flash attention kernels on one GPU (issue 4, sessions 5-6).

    PYTHONUNBUFFERED=1 python3 bench/attention_bwd.py --out $RES/bwd.json --budget 300 \
        --parts check:0.3,tput:1.0 --variants default,split,rows_early --cells 128f,128c

Real-lowering checks of the named Mosaic backward variants against the f32 reference, then
forward+backward TFLOP/s (forward counts 4*B*H*N^2*D, halved when causal; fwd+bwd 3.5x that;
H=16, batch x length = 16k tokens, bf16) of the variants next to jax.nn cuDNN in the same
process, and (part `ktimes`) the device time of each GPU kernel of one fwd+bwd call from a
profiler trace (the backward kernel alone, ours against cuDNN's). Part `compile` only compiles
the variants at a small shape (for MOSAIC_GPU_DUMP_TO / _PTXAS dumps set by the caller).
Part `profile` (session 6) runs one fwd+bwd call of each variant with Mosaic GPU's on-device
profiler in the backward kernel (`mgpu_bwd_profile`: %clock stamps of the prologue, of every
step and of the epilogue per CTA) and summarises the per-CTA timelines (cycles per step, masked
and unmasked, prologue, epilogue, and the gaps between consecutive CTAs of one SM).
The main table and the forward live in bench/attention.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import attention as battn  # noqa: E402
from bench._common import kernel_times  # noqa: E402
from pallas_kernels import attention as attn  # noqa: E402


def _spin_waits():
    """Session 11 experiment (`ATTN_SPIN_WAIT=1` in the environment, the whole process): every
    Mosaic GPU mbarrier wait becomes a busy loop of `mbarrier.test_wait.parity` instead of
    `mbarrier.try_wait.parity` with Mosaic's 10 ms suspend hint (a retry path with a
    NANOSLEEP.SYNCS in the SASS read in session 9). Same semantics; the forward kernels spin
    too. For an A/B against a process without it (ratios to cuDNN, which has no Mosaic
    waits)."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, nvvm, scf

    def wait_parity(self, parity, orders_tensor_core=False):
        i1, i32 = ir.IntegerType.get_signless(1), ir.IntegerType.get_signless(32)
        parity = arith.extui(i32, parity)
        loop = scf.WhileOp([], [])
        with ir.InsertionPoint.at_block_begin(loop.before.blocks.append()):
            done = nvvm.mbarrier_test_wait(self.get_ptr(), parity)
            scf.condition(arith.xori(done, arith.constant(i1, 1)), [])
        with ir.InsertionPoint.at_block_begin(loop.after.blocks.append()):
            scf.yield_([])
        assert not orders_tensor_core      # a Blackwell (tcgen05) fence: not on Hopper
    mgpu_utils.BarrierRef.wait_parity = wait_parity
    print("ATTN_SPIN_WAIT: Mosaic mbarrier waits spin on test_wait", flush=True)


if os.environ.get("ATTN_SPIN_WAIT") == "1":
    _spin_waits()

MOSAIC = dict(bwd_impl="mosaic")
ROWS = dict(MOSAIC, mgpu_bwd_rows=True)
ROWS_DEFER = dict(ROWS, mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False)  # D 128 full default
VARIANTS = {
    "default": {},                                         # choose_bwd_impl's pick
    "split": dict(bwd_impl="split"),                       # Triton dq + dk/dv kernels
    "mosaic": MOSAIC,                                      # Mosaic, S^T layout, no lean step
    "plo": dict(MOSAIC, mgpu_bwd_p_lo=True),               # the D 128 full default
    "rows": ROWS,
    "rows_early": dict(ROWS, mgpu_bwd_ds_early=True),
    "rows_early_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dq="own"),
    # no producer warpgroup: 2 x 128 threads with 255 registers each (not 240)
    "plo_np": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_producer=False),
    "mosaic_np": dict(MOSAIC, mgpu_bwd_producer=False),
    "rows_early_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_producer=False),
    "overlap_np": dict(MOSAIC, mgpu_bwd_overlap=True, mgpu_bwd_producer=False),   # FA3 order, S^T
    "overlap_dqf_np": dict(MOSAIC, mgpu_bwd_overlap=True, mgpu_bwd_dq_fused=True,
                           mgpu_bwd_producer=False),
    # and dV issued before the dP wait (dS computed while dV runs)
    "rows_dv": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True),
    "rows_dv_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                       mgpu_bwd_producer=False),
    "rows_p": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                   mgpu_bwd_producer=False, mgpu_bwd_persistent=-1),     # session 6
    "plo_np_p": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_producer=False,
                     mgpu_bwd_persistent=-1),
    # session 6: the deferred dq (dq_{t-1} issued with S_t / dP_t, split dS barrier) without a
    # producer (warpgroup 0 refills the slot of step t-1 after the dS barrier of step t)
    "rows_defer_np": ROWS_DEFER,
    "defer_np": dict(MOSAIC, mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False),
    "rows_defer_np_p": dict(ROWS_DEFER, mgpu_bwd_persistent=-1),
    "defer_np_p": dict(MOSAIC, mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                       mgpu_bwd_persistent=-1),
    "rows_dqf_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                        mgpu_bwd_dq_fused=True, mgpu_bwd_producer=False),
    "rows_dqf_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                         mgpu_bwd_dq_fused=True, mgpu_bwd_dq="own"),
    # dq "own": each warpgroup reduces dS_w K_w over the full head dim (no per-step barrier)
    "rows_dv_own": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                        mgpu_bwd_dq="own"),
    "plo_own": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_dq="own"),
    # dq "own" without the producer: each warpgroup arrives on the slot's free barrier,
    # warpgroup 0 waits for both and refills (no per-step dS barrier)
    "plo_own_np": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_dq="own", mgpu_bwd_producer=False),
    "mosaic_own_np": dict(MOSAIC, mgpu_bwd_dq="own", mgpu_bwd_producer=False),
    "rows_dv_own_np": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                           mgpu_bwd_dq="own", mgpu_bwd_producer=False),
}
VARIANTS.update({
    # the dispatch's Mosaic options of the cell, forced at any length (MOSAIC_BWD_MIN_LK off)
    "mosaic_opts": lambda d, c: dict(bwd_impl="mosaic", **attn.MOSAIC_BWD_OPTS.get((d, c), {})),
    # session 6: the cell's Mosaic options with one persistent CTA per SM
    "pers": lambda d, c: dict(bwd_impl="mosaic", **{**attn.MOSAIC_BWD_OPTS.get((d, c), {}),
                                                   "mgpu_bwd_producer": False},
                              mgpu_bwd_persistent=-1),
    "default_einsum": dict(bwd_delta="einsum"),            # sessions 1-4's delta fusion
    # session 7, on top of the cell's Mosaic options: no automatic barriers, the named dS
    # barrier, the swizzled dq staging tile, and all three
    "opts_nab": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True),
    "opts_ns": lambda d, c: dict(_opts(d, c), mgpu_bwd_named_sync=True),
    "opts_dqs": lambda d, c: dict(_opts(d, c), mgpu_bwd_dq_swizzle=True),
    "opts_s7": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                                 mgpu_bwd_dq_swizzle=True),
    "opts_s7lr": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                                   mgpu_bwd_dq_swizzle=True, mgpu_bwd_late_refill=True),
    "opts_lr": lambda d, c: dict(_opts(d, c), mgpu_bwd_late_refill=True),
    "opts_s7fs": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                                   mgpu_bwd_dq_swizzle=True, mgpu_bwd_late_refill=True,
                                   mgpu_bwd_fold_scale=True),
    "opts_ol": lambda d, c: dict(_opts(d, c), mgpu_bwd_one_loop=True),
    "opts_1b": lambda d, c: dict(_opts(d, c), mgpu_bwd_one_bar=True),
    "opts_ol1b": lambda d, c: dict(_opts(d, c), mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True),
    "rows_ol": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                    mgpu_bwd_producer=False, mgpu_bwd_one_loop=True),
    "rows_ol1b": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                      mgpu_bwd_producer=False, mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True),
    # FA3's order (dq before dK, dq stored while dK runs) in the rows layout
    "rows_dqf1": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                      mgpu_bwd_producer=False, mgpu_bwd_dq_first=True),
    "rows_dqf1_1b": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                         mgpu_bwd_producer=False, mgpu_bwd_dq_first=True, mgpu_bwd_one_bar=True),
    "rows_dqf1_ol1b": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                           mgpu_bwd_producer=False, mgpu_bwd_dq_first=True,
                           mgpu_bwd_one_bar=True, mgpu_bwd_one_loop=True),
    # the deferred dq without producer (the 1k causal default) + one mbarrier (+ one loop)
    # (rows_defer_1b: NaN dq in the GPU check at b2 n2048 hq4 hkv4, session 7 call 5: a race)
    "rows_defer_1b": dict(ROWS_DEFER, mgpu_bwd_one_bar=True),
    "rows_defer_ol1b": dict(ROWS_DEFER, mgpu_bwd_one_bar=True, mgpu_bwd_one_loop=True),
    "opts_s7ol": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                                   mgpu_bwd_dq_swizzle=True, mgpu_bwd_late_refill=True,
                                   mgpu_bwd_fold_scale=True, mgpu_bwd_early_exit=True,
                                   mgpu_bwd_one_loop=True),
    # causal: the rows layout (the full default's options) with all session-7 flags
    "rows_s7ol": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                      mgpu_bwd_producer=False, mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                      mgpu_bwd_dq_swizzle=True, mgpu_bwd_late_refill=True,
                      mgpu_bwd_fold_scale=True, mgpu_bwd_early_exit=True,
                      mgpu_bwd_one_loop=True),
    "opts_s7ee": lambda d, c: dict(_opts(d, c), mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                                   mgpu_bwd_dq_swizzle=True, mgpu_bwd_late_refill=True,
                                   mgpu_bwd_fold_scale=True, mgpu_bwd_early_exit=True),
    # the lean step (S^T layout, the causal default) at full attention with the session-7 flags
    "plo_np_s7": dict(MOSAIC, mgpu_bwd_p_lo=True, mgpu_bwd_producer=False, mgpu_bwd_nab=True,
                      mgpu_bwd_named_sync=True, mgpu_bwd_dq_swizzle=True),
    # FA3's order in the S^T layout (dV, dK with A from registers) with the session-7 flags
    "overlap_np_s7": dict(MOSAIC, mgpu_bwd_overlap=True, mgpu_bwd_producer=False,
                          mgpu_bwd_nab=True, mgpu_bwd_named_sync=True, mgpu_bwd_dq_swizzle=True,
                          mgpu_bwd_late_refill=True),
    # causal with the full cell's rows options (the profile's causal rows vs lean comparison)
    "rows_dv_np_s7": dict(ROWS, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                          mgpu_bwd_producer=False, mgpu_bwd_nab=True, mgpu_bwd_named_sync=True,
                          mgpu_bwd_dq_swizzle=True),
    "default_barrier": dict(bwd_delta="rowsum_barrier"),
    # session 8: the deferred-dq race restored (mgpu_bwd_wait_other_k=False), to reproduce it
    "default_race": dict(mgpu_bwd_wait_other_k=False),
    "rows_defer_1b_race": dict(ROWS_DEFER, mgpu_bwd_one_bar=True, mgpu_bwd_wait_other_k=False),
    "mosaic_opts_race": lambda d, c: dict(_opts(d, c), mgpu_bwd_wait_other_k=False),
    # session 8: rows + deferred dq without producer (the D 128 full default) with dK / dV not
    # awaited per step (mgpu_bwd_dk_late), with one step loop (causal), the swizzled dq tile
    "rows_defer_dkl": dict(ROWS_DEFER, mgpu_bwd_dk_late=True),
    "rows_defer_ol": dict(ROWS_DEFER, mgpu_bwd_one_loop=True),
    "rows_defer_ol_dkl": dict(ROWS_DEFER, mgpu_bwd_one_loop=True, mgpu_bwd_dk_late=True),
    "rows_defer_dkl_dve": dict(ROWS_DEFER, mgpu_bwd_dk_late=True, mgpu_bwd_dv_early=True),
    "rows_defer_ol_dkl_dve": dict(ROWS_DEFER, mgpu_bwd_one_loop=True, mgpu_bwd_dk_late=True,
                                  mgpu_bwd_dv_early=True),
    "rows_defer_dkl_dve_dqs": dict(ROWS_DEFER, mgpu_bwd_dk_late=True, mgpu_bwd_dv_early=True,
                                   mgpu_bwd_dq_swizzle=True),
    "rows_defer_dve": dict(ROWS_DEFER, mgpu_bwd_dv_early=True),
    "rows_defer_dqs": dict(ROWS_DEFER, mgpu_bwd_dq_swizzle=True),
    "rows_defer_dkl_dqs": dict(ROWS_DEFER, mgpu_bwd_dk_late=True, mgpu_bwd_dq_swizzle=True),
    # session 9, on top of the cell's Mosaic options (D 64: S^T layout, deferred dq, producer):
    # both warpgroups compute dq (32 columns each, 64-byte swizzled tiles), + one ring
    # mbarrier; the 3-deep Q / dO ring
    "opts_dqs32": lambda d, c: dict(_opts(d, c), mgpu_bwd_dq_split=True),
    "opts_dqs32_1b": lambda d, c: dict(_opts(d, c), mgpu_bwd_dq_split=True,
                                       mgpu_bwd_one_bar=True),
    "opts_s3": lambda d, c: dict(_opts(d, c), mgpu_stages_bwd=3),
    "opts_1b_s3": lambda d, c: dict(_opts(d, c), mgpu_bwd_one_bar=True, mgpu_stages_bwd=3),
    "opts_dqs32_s3": lambda d, c: dict(_opts(d, c), mgpu_bwd_dq_split=True, mgpu_stages_bwd=3),
    # the cell's options with the CTA's last wait for reads only (its dK / dV stores and dq
    # reduce-adds have read SMEM; session 7's mgpu_bwd_early_exit, never timed alone)
    # rows + deferred dq + dV early (rows_defer_dve) with S_t, dP_t issued before dq_{t-1} by
    # both warpgroups / by warpgroup 1 only (the two then compute P at different times)
    "rows_defer_dve_sf": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(0, 1)),
    "rows_defer_dve_sf1": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,)),
    # session 10: the two small D 128 full winners of session 9 together (+1-2 % each at 4k)
    "rows_defer_dve_sf1_1b": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                                  mgpu_bwd_one_bar=True),
    # session 10 (that set is the D 128 full default above 2k keys): one more flag on top
    "n10_ee": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                   mgpu_bwd_one_bar=True, mgpu_bwd_early_exit=True),
    "n10_dqs": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                    mgpu_bwd_one_bar=True, mgpu_bwd_dq_swizzle=True),
    "n10_ol": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                   mgpu_bwd_one_bar=True, mgpu_bwd_one_loop=True),
    "n10_sf01": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(0, 1),
                     mgpu_bwd_one_bar=True),
    # session 11: the D 128 full default above 2k keys on one persistent CTA per SM (the Q/dO
    # ring runs on across KV tiles, the next tile's K/V load during the dK/dV store; session 6
    # measured persistent CTAs -1 % on that session's default)
    "n11_pers": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                     mgpu_bwd_one_bar=True, mgpu_bwd_persistent=-1),
    "n11_pers_ee": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,),
                        mgpu_bwd_one_bar=True, mgpu_bwd_persistent=-1, mgpu_bwd_early_exit=True),
    # session 12: the D 128 full default above 2k keys with dq_{t-1} issued after dS_t, before
    # dK_t (mgpu_bwd_dq_mid: no dq accumulator live with S, dP, P; both warpgroups in that
    # order, so no s_first), and the same with the folded softmax scale (no dq multiply)
    "n12_dqmid": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_one_bar=True,
                      mgpu_bwd_dq_mid=True),
    "n12_dqmid_fs": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_one_bar=True,
                         mgpu_bwd_dq_mid=True, mgpu_bwd_fold_scale=True),
    # session 12 call 2: the same at causal (one step loop; the causal default is rows without
    # the deferred dq, which lost 9 % at causal in session 8 with 468 B of spills); call 3:
    # +8-9 % at causal 4k / 16k, the D 128 causal default above 2k keys (MOSAIC_BWD_LONG)
    "n12_dqmid_ol": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_one_bar=True,
                         mgpu_bwd_dq_mid=True, mgpu_bwd_one_loop=True),
    # the D 128 full default with the producer warpgroup back (240 / 24 registers) and one
    # ring mbarrier: the D 64 default's structure, which gained 3-7 % from one mbarrier
    "rows_defer_p1b": dict(ROWS, mgpu_bwd_defer_dq=True, mgpu_bwd_one_bar=True),
    "opts_ee": lambda d, c: dict(_opts(d, c), mgpu_bwd_early_exit=True),
    "rows_defer_dve_ee": dict(ROWS_DEFER, mgpu_bwd_dv_early=True, mgpu_bwd_early_exit=True),
    # session 9b: the D 128 full default with the two warpgroups half a step apart (one-way dS
    # mbarriers instead of the per-step dS barrier; warpgroup 0's dq two steps late, warpgroup
    # 1 refills the ring), and with one ring mbarrier; stress first: STRESS_CASES 0, 6, 9, 12
    "rows_defer_pp": dict(ROWS_DEFER, mgpu_bwd_pingpong=True),
    "rows_defer_pp_1b": dict(ROWS_DEFER, mgpu_bwd_pingpong=True, mgpu_bwd_one_bar=True),
})


def _opts(d, causal):
    return dict(bwd_impl="mosaic", **attn.MOSAIC_BWD_OPTS.get((d, causal), {}))


def _cfg(name, d, causal):
    cfg = VARIANTS[name]
    return cfg(d, causal) if callable(cfg) else cfg


def _attn_fn(name, d, causal, **extra):
    """fn(q, k, v) of jax.nn cuDNN ("cudnn"), tokamax ("tokamax": None if it does not import)
    or of our kernel with the named variant."""
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    if name == "tokamax":
        return battn._tokamax_fn(causal)
    cfg = {**_cfg(name, d, causal), **extra}
    return lambda q, k, v: attn.flash_attention_kernel(q, k, v, causal=causal, **cfg)


_SAVE = [lambda: None]     # main() puts the results writer here (results survive a timeout)
CELLS = {"128f": (128, False), "128c": (128, True), "64f": (64, False), "64c": (64, True)}


def checks(results, deadline, names, order=None, plan=None):
    """Each variant on two cases (D 128 causal GQA ragged, D 128 full GQA; the first variant also
    D 64 and D 128 causal window MQA, D 128 full at 2048, and cases with more KV tiles than
    SMs) against the f32 reference."""
    rows = results.setdefault("correctness", [])
    cases = [(2, 1000, 8, 2, 128, True, None), (1, 777, 4, 2, 128, False, None),
             (1, 2048, 8, 1, 64, True, 300), (1, 2048, 8, 1, 128, True, 300),
             (2, 2048, 4, 4, 128, False, None), (1, 4096, 8, 1, 128, True, 300),
             # session 6: more KV tiles than SMs (persistent CTAs walk 2-3 tiles each)
             (2, 4096, 16, 4, 128, True, None), (2, 3000, 8, 8, 128, False, None),
             # D 128 causal at 1k keys: the dispatch's rows + deferred dq (MOSAIC_BWD_SHORT)
             (2, 1024, 8, 2, 128, True, None)]
    order = order or list(range(len(cases)))
    plan = plan or [(name, order if j == 0 else [i for i in order if i < 2])
                    for j, name in enumerate(names)]
    for j, (name, idx) in enumerate(plan):
        for i in idx:
            b, n, hq, hkv, d, causal, window = cases[i]
            if time.time() > deadline:
                continue
            q, k, v, do = battn._inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16,
                                        seed=500 + 10 * j + i)
            kw = dict(causal=causal, window=window)
            row = dict(case=f"{name} b{b} n{n} hq{hq} hkv{hkv} d{d} causal={causal} "
                            f"window={window}", variant=name)
            battn._check_against_reference(rows, row, attn.flash_attention_kernel,
                                           (q, k, v, do), kw, _cfg(name, d, causal),
                                           err_chars=600)
            _SAVE[0]()


# session 8: cases of part `stress` (b, n, hq, hkv, d, causal, window, segment ids)
STRESS_CASES = [(2, 2048, 4, 4, 128, False, None, False),     # 0: session 7's NaN (rows_defer_1b)
                (2, 2048, 4, 4, 128, True, None, False),      # 1
                (2, 4096, 4, 4, 128, True, None, False),      # 2
                (1, 4097, 8, 1, 128, True, None, False),      # 3: MQA 8:1, ragged
                (1, 4096, 8, 1, 128, True, 300, False),       # 4: window
                (2, 2048, 8, 1, 128, True, None, True),       # 5: segment ids (Triton bwd)
                (2, 4096, 4, 4, 128, False, None, False),     # 6
                (2, 1024, 8, 2, 128, True, None, False),      # 7: the 1k causal path (deferred)
                (2, 2048, 4, 4, 64, False, None, False),      # 8: D 64 (deferred, producer)
                (2, 2048, 16, 2, 128, False, None, False),    # 9: GQA 8:1 full
                # session 9: D 64 causal (the deferred dq with a producer)
                (1, 4097, 8, 1, 64, True, None, False),       # 10: MQA 8:1, ragged
                (1, 4096, 8, 1, 64, True, 300, False),        # 11: window
                # session 9b: D 128 full, GQA 4:1, ragged (mgpu_bwd_pingpong's short tiles)
                (1, 1000, 8, 2, 128, False, None, False)]     # 12


def _poison_smem(n_ctas=264, rows=432):
    """A Mosaic GPU kernel that fills 216 KB of SMEM on every SM with 0xFF bytes (bf16 NaN):
    a kernel that reads SMEM it has not loaded yet then sees NaN (a race made visible)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(o_ref):
        def scoped(smem):
            for r in range(0, rows, 8):
                smem[pl.ds(r, 8), :] = jnp.full((8, 128), -1, jnp.int32)
            plgpu.commit_smem()

            @pl.when(jax.lax.axis_index("x") == 0)
            def _():
                plgpu.copy_smem_to_gmem(smem.at[pl.ds(0, 8)], o_ref)
                plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(scoped, plgpu.SMEM((rows, 128), jnp.int32))
    return jax.jit(plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((8, 128), jnp.int32),
                                grid=(n_ctas,), grid_names=("x",)))


def _nonfinite(x):
    return int(jnp.sum(~jnp.isfinite(x.astype(jnp.float32))))


def stress(results, deadline, plan, seeds=4):
    """Session 8: each (variant, case) of `plan` compiled once and run on `seeds` random inputs
    (seed 0 as is, the others with `_poison_smem` run between the forward and the backward call),
    against the f32 reference: rel. L2
    errors, non-finite counts of o / dq / dk / dv, and where dq is non-finite (batch, 64-row
    query block, head, 64-column half)."""
    rows = results.setdefault("stress", [])
    poison, refs = None, {}
    for name, idx in plan:
        for i in idx:
            if time.time() > deadline:
                return
            b, n, hq, hkv, d, causal, window, segs = STRESS_CASES[i]
            case = (f"{name} b{b} n{n} hq{hq} hkv{hkv} d{d} causal={causal} window={window} "
                    f"seg={segs}")
            row = dict(case=case, variant=name, runs=[])
            try:
                t = time.time()
                seg = (jnp.sort(jax.random.randint(jax.random.key(99), (b, n), 0, 3), axis=1)
                       if segs else None)
                kw = dict(causal=causal, window=window, segment_ids=seg)
                cfg = _cfg(name, d, causal)
                # forward and backward as two calls: the poison kernel runs between them, so
                # that only the backward's small XLA prologue (delta) runs on poisoned SMEM
                fwd = jax.jit(lambda q, k, v, kw=kw, cfg=cfg: jax.vjp(
                    lambda a, b_, c: attn.flash_attention_kernel(a, b_, c, **kw, **cfg),
                    q, k, v))
                bwd = jax.jit(lambda vjp_fn, do: vjp_fn(do))
                key = STRESS_CASES[i]
                if key not in refs:
                    refs[key] = battn._fwd_bwd(lambda q, k, v, kw=kw: attn.attention_reference(
                        q, k, v, **kw))
                ref = refs[key]
                for s_ in range(seeds):
                    if time.time() > deadline:
                        break
                    q, k, v, do = battn._inputs((b, n, hq, d), (b, n, hkv, d), jnp.bfloat16,
                                                seed=800 + 7 * i + s_)
                    o, vjp_fn = jax.block_until_ready(fwd(q, k, v))
                    if s_ > 0:
                        if poison is None:
                            poison = _poison_smem()
                        jax.block_until_ready(poison())
                    g = jax.block_until_ready(bwd(vjp_fn, do))
                    o_r, g_r = ref(*[x.astype(jnp.float32) for x in (q, k, v, do)])
                    one = dict(seed=800 + 7 * i + s_, poisoned=s_ > 0)
                    for nm, x, xr in zip(("o", "dq", "dk", "dv"), (o, *g), (o_r, *g_r),
                                         strict=True):
                        one[nm] = float(battn._rel(x, xr))
                        one[f"{nm}_nonfinite"] = _nonfinite(x)
                    if one["dq_nonfinite"]:
                        bad = np.argwhere(~np.isfinite(np.asarray(g[0], np.float32)))
                        blocks = sorted({(int(x[0]), int(x[1]) // 64, int(x[2]), int(x[3]) // 64)
                                         for x in bad})          # + the 64-column half of D
                        one["dq_bad_blocks"] = blocks[:12]
                        one["dq_bad_block_count"] = len(blocks)
                    row["runs"].append(one)
                    print("stress", case, json.dumps(one), flush=True)
                row["s"] = round(time.time() - t, 2)
                row["pass"] = all(r_["dq_nonfinite"] + r_["dk_nonfinite"] + r_["dv_nonfinite"]
                                  + r_["o_nonfinite"] == 0
                                  and max(r_["o"], r_["dq"], r_["dk"], r_["dv"]) < 1e-2
                                  for r_ in row["runs"])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print("stress_row", json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "runs"}),
                  flush=True)
            rows.append(row)
            _SAVE[0]()


def throughput(results, deadline, names, cells, lengths, anchors=("cudnn",), per_cell=None):
    out = results.setdefault("bwd_tput", [])
    for n, cell in [(n, c) for n in lengths for c in cells]:
        names_c = (per_cell or {}).get(cell, names)
        b = battn.TOKENS // n
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
        flops = 4 * b * battn.H * n * n * d / (2 if causal else 1) * 3.5
        seen = {}
        for name in list(anchors) + names_c:
            row = dict(d=d, causal=causal, n=n, mode="fwd+bwd", impl=name)
            if name in VARIANTS:                       # the same options as an earlier variant
                key = json.dumps(_cfg(name, d, causal), sort_keys=True)
                if key in seen:
                    row["same_as"] = seen[key]
                    out.append(row)
                    continue
                seen[key] = name
            fn = _attn_fn(name, d, causal)
            if fn is None:
                row["error"] = "does not import"
                out.append(row)
                continue
            battn._timed(row, deadline, flops, "bwd", out, battn._fwd_bwd(fn), q, k, v, do)
            _SAVE[0]()


COMPILE_S = 5.0     # part ab: seconds set aside per function of a later cell (compile, warm-up)


def interleaved(results, deadline, names, cells, lengths, anchors=("cudnn",), per_cell=None,
                rep_ms=25.0):
    """A B A B timing (session 7): per cell, every anchor and variant is compiled and warmed
    first (all of them, unless the part's deadline comes; session 9b), then timed in rounds
    (one ~25 ms repetition of each per round, in the same order) for an equal share of the time
    left after COMPILE_S per function of the later cells, at least 3 and at most 20 rounds;
    the medians over the rounds are the results."""
    out = results.setdefault("interleaved", [])
    per_cell = per_cell or {}

    def cell_names(cell, n):          # "cell@n" keys first ("-": skip the cell at that n)
        got = per_cell.get(f"{cell}@{n}", per_cell.get(cell, names))
        return [] if got == ["-"] else got
    todo = [(n, c) for n in lengths for c in cells if cell_names(c, n)]
    # session 9b: a cell compiles all its functions first (session 9's time shares dropped a
    # cell's third or fourth function in 7 cells); its rounds then get an equal share of the
    # time left once the later cells' compiles (COMPILE_S each) are set aside
    n_fns = [len(anchors) + len(cell_names(c, n)) for n, c in todo]
    for j, (n, cell) in enumerate(todo):
        if time.time() > deadline:
            break
        b = battn.TOKENS // n
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
        flops = 4 * b * battn.H * n * n * d / (2 if causal else 1) * 3.5
        fns, iters, seen = {}, {}, {}
        for name in list(anchors) + cell_names(cell, n):
            if time.time() > deadline - 2:
                break
            if name in VARIANTS:
                key = json.dumps(_cfg(name, d, causal), sort_keys=True)
                if key in seen:
                    continue
                seen[key] = name
            fn = _attn_fn(name, d, causal)
            if fn is None:
                continue
            try:
                fn = battn._fwd_bwd(fn)
                jax.block_until_ready(fn(q, k, v, do))
                t0 = time.perf_counter()
                while (time.perf_counter() - t0) * 1e3 < 100:
                    jax.block_until_ready(fn(q, k, v, do))
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, do))
                one = (time.perf_counter() - t0) * 1e3
                fns[name], iters[name] = fn, int(max(1, min(100, rep_ms / max(one, 1e-3))))
                print("ab compiled", cell, n, name, round(one, 3), "ms", flush=True)
            except Exception as e:  # noqa: BLE001
                out.append(dict(d=d, causal=causal, n=n, impl=name,
                                error=f"{type(e).__name__}: {str(e)[:300]}"))
        later = COMPILE_S * sum(n_fns[j + 1:])
        cell_deadline = time.time() + max(0.0, deadline - time.time() - later) / (len(todo) - j)
        samples = {name: [] for name in fns}
        for k_round in range(20):
            if k_round >= 3 and time.time() > cell_deadline:
                break
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters[name]):
                    o = fn(q, k, v, do)
                jax.block_until_ready(o)
                samples[name].append((time.perf_counter() - t0) / iters[name] * 1e3)
        best = {}
        for name, ms in samples.items():
            if not ms:
                continue
            med = float(np.median(ms))
            row = dict(d=d, causal=causal, n=n, mode="fwd+bwd", impl=name, ms=med,
                       tflops=flops / med / 1e9, rounds=len(ms),
                       ms_all=[round(x, 4) for x in ms])
            best[name] = row["tflops"]
            out.append(row)
        top = max((best[a] for a in anchors if a in best), default=None)
        for row in out[-len(best):] if best else []:
            if top:
                row["ratio_best_anchor"] = round(row["tflops"] / top, 4)
            print("ab", json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "ms_all"}),
                  flush=True)
        _SAVE[0]()


def ktimes(results, deadline, names, cells, n):
    """Device time (us per call) of each GPU kernel of one fwd+bwd call."""
    out = results.setdefault("kernel_times", [])
    b = battn.TOKENS // n
    for cell in cells:
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
        for name in ["cudnn"] + names:
            if time.time() > deadline:
                return
            fn = _attn_fn(name, d, causal)
            row = dict(d=d, causal=causal, n=n, impl=name)
            try:
                kt = kernel_times(battn._fwd_bwd(fn), (q, k, v, do), runs=5, top=8)
                row["kernels"] = {line: ev for line, ev in kt.items() if "XLA" not in line}
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("ktimes", json.dumps(row), flush=True)
            out.append(row)
            _SAVE[0]()


def _ranges(tags, clocks, names):
    """(name, begin, end) of the top-level ranges of one warpgroup's profiler events (clocks
    relative to the first event, uint32 wrap-around handled)."""
    from jax.experimental.mosaic.gpu import profiler as mprof
    rel = (clocks - clocks[0]).astype(np.uint32).astype(np.int64)
    out, stack = [], []
    for tag, t in zip(tags, rel, strict=True):
        if tag & mprof.ProfilerSpec.EXIT:
            if stack:
                name, t0 = stack.pop()
                if not stack:
                    out.append((name, int(t0), int(t)))
        else:
            stack.append((names[int(tag)], t))
    return out


def _profile_summary(buf, grid, block, interned):
    """Per-CTA statistics of the backward kernel's profiler buffer (warpgroup 0's ranges:
    bwd_pro, bwd_step / bwd_step_m, bwd_epi), in SM cycles, and the gaps between consecutive
    CTAs of one SM (ns; the clock rate estimated from the tightest CTA-to-CTA spacing)."""
    names = {v: k for k, v in interned.items()}
    nb, tpb = math.prod(grid), math.prod(block) // 128
    e = np.asarray(buf).reshape(nb, tpb, -1)
    start = e[:, 0, 0].astype(np.int64)
    sm = e[:, 0, 1].astype(np.int64)
    used = e[:, 0, 2].astype(np.int64)
    pro, epi, span, steps, msteps, first, nsteps = [], [], [], [], [], [], []
    for c in range(nb):
        ev = e[c, 0, 3:3 + used[c]]
        if ev.size < 2:
            span.append(0)
            continue
        rs = _ranges(ev[0::2], ev[1::2], names)
        span.append(rs[-1][2] if rs else 0)
        st = [(n, b_, e_) for n, b_, e_ in rs if n.startswith("bwd_step")]
        nsteps.append(len(st))
        for n, b_, e_ in rs:
            if n == "bwd_pro":
                pro.append(e_ - b_)
            elif n == "bwd_epi":
                epi.append(e_ - b_)
        un = [e_ - b_ for n, b_, e_ in st if n == "bwd_step"]
        steps += un[1:]
        first += un[:1]
        msteps += [e_ - b_ for n, b_, e_ in st if n == "bwd_step_m"]
    span = np.asarray(span, np.int64)

    def stat(x):
        x = np.asarray(x, np.float64)
        return (dict(n=int(x.size), mean=round(float(x.mean()), 1),
                     p10=round(float(np.percentile(x, 10)), 1),
                     p50=round(float(np.median(x)), 1), p90=round(float(np.percentile(x, 90)), 1))
                if x.size else None)
    gaps, ratios = [], []
    for s_ in np.unique(sm):
        idx = np.where(sm == s_)[0]
        idx = idx[np.argsort(start[idx])]
        dt = np.diff(start[idx]).astype(np.int64) % (1 << 32)
        ratios += list(span[idx[:-1]] / np.maximum(dt, 1))
        gaps.append((idx, dt))
    ghz = float(np.percentile(ratios, 99)) if ratios else float("nan")   # cycles per ns
    gap_ns = np.concatenate([dt - span[idx[:-1]] / ghz for idx, dt in gaps]) if gaps else []
    gap_198 = np.concatenate([dt - span[idx[:-1]] / 1.98 for idx, dt in gaps]) if gaps else []
    t_end = (start - start.min()) % (1 << 32) + span / ghz
    busy = span.sum() / ghz / (len(np.unique(sm)) * t_end.max())
    return dict(ctas=nb, sms=int(len(np.unique(sm))), ghz_est=round(ghz, 3),
                kernel_us=round(float(t_end.max()) / 1e3, 1), sm_busy=round(float(busy), 4),
                pro=stat(pro), step=stat(steps), step_first=stat(first), step_masked=stat(msteps),
                epi=stat(epi), span=stat(span), steps_per_cta=stat(nsteps), gap_ns=stat(gap_ns),
                gap_ns_at_1_98ghz=stat(gap_198))


def profile(results, deadline, names, cells, n, raw_dir=None):
    """One fwd+bwd call per (cell, variant) with the backward kernel's on-device profiler; the
    per-CTA timelines are summarised (`_profile_summary`)."""
    from jax.experimental.mosaic.gpu import profiler as mprof
    out = results.setdefault("profile", [])
    captured = []

    def dump(self, buffer, f, grid, block):                # replaces the JSON trace writer
        captured.append((np.asarray(buffer), grid, block, dict(self.interned_names)))
        f.write("{}")
    mprof.ProfilerSpec.dump = dump
    b = battn.TOKENS // n
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            d, causal = CELLS[cell]
            q, k, v, do = battn._inputs((b, n, battn.H, d), (b, n, battn.H, d), jnp.bfloat16)
            seen = set()
            for name in names:
                key = json.dumps(_cfg(name, d, causal), sort_keys=True)
                if time.time() > deadline or key in seen:
                    continue
                seen.add(key)
                row = dict(d=d, causal=causal, n=n, impl=name)
                try:
                    fn = battn._fwd_bwd(_attn_fn(name, d, causal, mgpu_bwd_profile=tmp))
                    for _ in range(3):                     # the last of 3 calls (clocks up)
                        jax.block_until_ready(fn(q, k, v, do))
                    jax.effects_barrier()
                    buf, grid, block, interned = captured[-1]
                    row.update(grid=list(grid), block=list(block),
                               **_profile_summary(buf, grid, block, interned))
                    if raw_dir:
                        e = buf.reshape(math.prod(grid), math.prod(block) // 128, -1)[:, 0]
                        np.savez_compressed(os.path.join(raw_dir, f"prof_{cell}_{n}_{name}.npz"),
                                            wg0=e, names=json.dumps(interned))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                captured.clear()
                print("profile", json.dumps(row), flush=True)
                out.append(row)
                _SAVE[0]()


def _call_each(rows, tag, deadline, cells, names, shape, calls, key, extra=None, **fn_kw):
    """`calls` jitted fwd+bwd calls of each of `names` per cell on bf16 inputs of `shape(d)`
    (q and k/v shapes): one row per call set with the seconds (compile included) or the error."""
    for cell in cells:
        d, causal = CELLS[cell]
        q, k, v, do = battn._inputs(*shape(d), jnp.bfloat16)
        for name in names:
            if time.time() > deadline:
                return
            row = {key: name, "d": d, "causal": causal, **(extra or {})}
            t = time.time()
            try:
                fn = battn._fwd_bwd(_attn_fn(name, d, causal, **fn_kw))
                for _ in range(calls):
                    jax.block_until_ready(fn(q, k, v, do))
                row["s"] = round(time.time() - t, 2)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(tag, row, flush=True)
            rows.append(row)
            _SAVE[0]()


def run_once(results, deadline, names, cells, n, anchors=()):
    """Two fwd+bwd calls of each anchor and variant at length n (for ncu: `-c` picks the first
    launches of the kernels it matches)."""
    b = battn.TOKENS // n
    _call_each(results.setdefault("once", []), "once", deadline, cells, list(anchors) + names,
               lambda d: ((b, n, battn.H, d), (b, n, battn.H, d)), 2, "impl", dict(n=n))


def compile_only(results, deadline, names, cells):
    """One small fwd+bwd call of each variant (with the Triton forward): compile checks."""
    _call_each(results.setdefault("compiled", []), "compiled", deadline, cells, names,
               lambda d: ((1, 512, 4, d), (1, 512, 4, d)), 1, "variant", fwd_impl="triton")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_bwd.json")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--parts", default="check:0.3,tput:1.0")
    ap.add_argument("--variants", default="default,split,rows_early")
    ap.add_argument("--check-variants", default="")
    ap.add_argument("--kvariants", default="", help="variants of part ktimes (default: the "
                    "first three of --variants)")
    ap.add_argument("--check-cases", default="", help="indices into checks()'s cases, in order")
    ap.add_argument("--check-plan", default="", help="variant=i,j;variant=k,...: the cases of "
                    "each variant (overrides --check-variants / --check-cases)")
    ap.add_argument("--seeds", type=int, default=4, help="part stress: inputs per case (all "
                    "but the first after the SMEM poison kernel); --check-plan indexes "
                    "STRESS_CASES there")
    ap.add_argument("--cells", default="128f,128c")
    ap.add_argument("--n", default="4096", help="comma-separated lengths (tput); ktimes: first")
    ap.add_argument("--anchors", default="cudnn", help="anchors timed before the variants (tput)")
    ap.add_argument("--cell-variants", default="", help="cell=v1,v2;cell=...: the variants of "
                    "those cells in parts tput / ab (others: --variants); part ab also takes "
                    "cell@n=... keys, and cell@n=- skips the cell at that length")
    ap.add_argument("--pvariants", default="", help="variants of part profile (default: the "
                    "first of --variants)")
    ap.add_argument("--pn", type=int, default=4096, help="length of part profile")
    ap.add_argument("--pcells", default="", help="cells of part profile (default: --cells)")
    ap.add_argument("--raw", default="", help="folder for the raw profiler buffers (npz)")
    args = ap.parse_args()
    t0 = time.time()
    results = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__,
                   device=str(jax.devices()[0].device_kind), argv=sys.argv[1:])
    names = [s for s in args.variants.split(",") if s]
    check_names = [s for s in args.check_variants.split(",") if s] or names
    cells = [s for s in args.cells.split(",") if s]
    lengths = [int(x) for x in args.n.split(",")]
    order = [int(x) for x in args.check_cases.split(",") if x]
    per_cell = {c: v.split(",") for c, v in
                (item.split("=") for item in args.cell_variants.split(";") if item)}
    plan = [(v, [int(x) for x in c.split(",")]) for v, c in
            (item.split("=") for item in args.check_plan.split(";") if item)]
    steps = {"check": lambda dl: checks(results, dl, check_names, order, plan),
             "stress": lambda dl: stress(results, dl, plan, args.seeds),
             "tput": lambda dl: throughput(results, dl, names, cells, lengths,
                                           [s for s in args.anchors.split(",") if s],
                                           per_cell),
             "profile": lambda dl: profile(results, dl, [s for s in args.pvariants.split(",")
                                                          if s] or names[:1],
                                           [s for s in args.pcells.split(",") if s] or cells,
                                           args.pn,
                                           args.raw or None),
             "ab": lambda dl: interleaved(results, dl, names, cells, lengths,
                                          [s for s in args.anchors.split(",") if s], per_cell),
             "ktimes": lambda dl: ktimes(results, dl, [s for s in args.kvariants.split(",") if s]
                                         or names[:3], cells, lengths[0]),
             "compile": lambda dl: compile_only(results, dl, names, cells),
             "once": lambda dl: run_once(results, dl, names, cells, lengths[0],
                                         [s for s in args.anchors.split(",") if s])}
    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    _SAVE[0] = save
    for part in args.parts.split(","):
        p, frac = part.split(":")
        steps[p](t0 + args.budget * float(frac))
        results.setdefault("elapsed", {})[p] = round(time.time() - t0, 1)
        save()


if __name__ == "__main__":
    main()

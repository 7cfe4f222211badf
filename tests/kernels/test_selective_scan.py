"""Selective scan kernels (interpret mode, CPU) against the step-by-step lax.scan recurrence."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selective_scan, selective_state_update

ss = importlib.import_module("pallas_kernels.selective_scan")
OPTIONAL = ("D", "z", "delta_bias", "initial_state")
# v8's training path: the session-9 defaults (v9: the pair backward and ck2 checkpoints) off
V8_TRAINING = dict(mgpu_bwd_pair=False, mgpu_ck_pair=False, mgpu_ck_late=False,
                   mgpu_bwd_keep_b=False, mgpu_bwd_pad_rows=False, mgpu_bwd_pair_ahead=False,
                   mgpu_bwd_direct_out=False)


def make_inputs(seed, *, b=2, length=13, dn=64, n=5, groups=None, dtype=jnp.float32,
                dt_scale=0.5, a_scale=0.5):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    bc_shape = (b, length, n) if groups is None else (b, length, groups, n)
    normal = lambda k, shape, s=1.0: (jax.random.normal(k, shape) * s)
    return dict(
        u=normal(ks[0], (b, length, dn)).astype(dtype),
        delta=normal(ks[1], (b, length, dn), dt_scale).astype(dtype),
        A=-jnp.exp(normal(ks[2], (dn, n), a_scale)),
        B=normal(ks[3], bc_shape).astype(dtype),
        C=normal(ks[4], bc_shape).astype(dtype),
        D=normal(ks[5], (dn,)),
        z=normal(ks[6], (b, length, dn)).astype(dtype),
        delta_bias=normal(ks[7], (dn,), 0.5),
        initial_state=normal(ks[8], (b, dn, n)),
    )


def split(inputs, use):
    args = tuple(inputs[k] for k in ("u", "delta", "A", "B", "C"))
    kwargs = {k: (inputs[k] if k in use else None) for k in OPTIONAL}
    return args, kwargs


def kernel(*args, chunk=2, fwd_chunk=None, **kwargs):
    # Small chunks keep the unrolled kernel bodies, and so the CPU compile times, small.
    return ss.selective_scan_pallas(*args, **kwargs, chunk=chunk, fwd_chunk=fwd_chunk or chunk,
                                    interpret=True)


def reference(*args, **kwargs):
    f32 = [a.astype(jnp.float32) for a in args]
    kw = {k: (v.astype(jnp.float32) if hasattr(v, "astype") else v) for k, v in kwargs.items()}
    return ss.selective_scan_reference(*f32, **kw, method="scan")


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


CASES = [  # (name, dtype, n, groups, length, optional inputs, softplus)
    ("all_options_groups_ragged", jnp.float32, 5, 2, 13, OPTIONAL, True),
    ("plain_bf16_n16", jnp.bfloat16, 16, None, 10, (), False),
    pytest.param("bias_no_softplus_init", jnp.float32, 16, 4, 9, ("delta_bias", "initial_state"),
                 False, marks=pytest.mark.slow),
    pytest.param("z_only_bf16", jnp.bfloat16, 8, None, 11, ("z",), True, marks=pytest.mark.slow),
]
IDS = ["all_options_groups_ragged", "plain_bf16_n16", "bias_no_softplus_init", "z_only_bf16"]


@pytest.mark.parametrize("name,dtype,n,groups,length,use,softplus", CASES, ids=IDS)
def test_selective_scan_outputs_and_gradients_match_recurrence(name, dtype, n, groups, length, use,
                                                   softplus):
    check_against_recurrence(dtype, n, groups, length, use, softplus)


@pytest.mark.parametrize("tiling,n", [
    pytest.param(dict(split=1, ahead=0, bwd_ahead=0, lane_reduce=False, fast_exp=False,
                      bc_rows=False, bwd_split=1), 6, marks=pytest.mark.slow),
    pytest.param(dict(split=2, ahead=3, bwd_ahead=3, lane_reduce=True, fast_exp=True,
                      bc_rows=False), 6, marks=pytest.mark.slow),
    pytest.param(dict(split=4, ahead=1, bwd_ahead=1, lane_reduce=True, bc_rows=False,
                      bwd_split=1), 16, marks=pytest.mark.slow),
    pytest.param(dict(split=0, share_dt=True, xor_reduce=True, keep_decay=True, chunk=4), 16,
                 marks=pytest.mark.slow),
    pytest.param(dict(bc_rows=True, bwd_split=2, keep_decay=True), 16, marks=pytest.mark.slow),
    pytest.param(dict(xor_reduce=True), 16, marks=pytest.mark.slow),
    pytest.param(dict(bwd_split=2, keep_decay=True, ahead=1, bwd_ahead=1), 16,
                 marks=pytest.mark.slow),
    pytest.param(dict(bwd_split=2, keep_decay=False, ahead=3, bwd_ahead=3), 6,
                 marks=pytest.mark.slow),
    pytest.param(dict(split=4, bwd_split=4, keep_decay=True, bc_rows=True), 8,
                 marks=pytest.mark.slow),
    pytest.param(dict(split=4, bwd_split=4, bc_rows=True, xor_reduce=True), 16,
                 marks=pytest.mark.slow),
    pytest.param(dict(split=1, bc_rows=True), 6, marks=pytest.mark.slow),
    pytest.param(dict(bc_rows=True, poly_exp=3), 16, marks=pytest.mark.slow),
    pytest.param(dict(split=4, share_dt=True, chunk=4), 8, marks=pytest.mark.slow),
], ids=["plain", "split2_ahead3_lanes_fast", "split4_ahead1_lanes",
        "auto_split4_share_dt_xor", "bc_rows_bwd_split2_kept", "xor_split1",
        "bwd_split2_keep_decay", "bwd_split2_ahead3", "split4_bwd_split4_bc_rows",
        "split4_bwd_split4_bc_rows_xor", "bc_rows_split1_n6", "poly_exp3", "split4_share_dt"])
def test_kernel_schedules_match_recurrence(tiling, n):
    # Ragged (11 steps, chunk 2), grouped (two groups of 32 channels): the v2.1 schedule (the
    # default is now v4: both kernels split over two lanes per channel, B/C as lane rows, the
    # lane butterfly, which every other test runs), the B/C prefetch window of v3 (with a
    # window longer than the chunk), the
    # backward split over lanes (dB/dC columns per lane part), with and without the kept decays,
    # B/C as one lane row per step, shuffled out per state (bc_rows, forward and backward), and
    # the select-free dB/dC butterfly over per-lane permuted states (xor_reduce, N = 16 only;
    # other N fall back to the butterfly with selects), delta shared across the lane parts.
    check_against_recurrence(jnp.float32, n, 2, 11, OPTIONAL, True, **tiling)


@pytest.mark.parametrize("tiling,n", [
    pytest.param(dict(bwd_split=4, bwd_share=True, chunk=4), 16, marks=pytest.mark.slow),
    pytest.param(dict(bwd_split=2, bwd_share=True, xor_reduce=True), 16, marks=pytest.mark.slow),
    pytest.param(dict(bwd_split=4, bwd_share=True, chunk=8, keep_decay=True), 8,
                 marks=pytest.mark.slow),
    (dict(ck_unroll=True, fwd_chunk=8, share_dt=True, chunk=4), 16),
    pytest.param(dict(ck_unroll="auto", fwd_chunk=8, share_dt="auto", chunk=4), 16,
                 marks=pytest.mark.slow),
    pytest.param(dict(ck_unroll=4, share_dt="auto", chunk=2), 16, marks=pytest.mark.slow),
], ids=["bwd_split4_share", "bwd_split2_share_xor", "bwd_split4_share_c8_n8",
        "ck_unroll_share_dt", "auto_ck_unroll_share_dt", "ck_unroll_4_steps"])
def test_backward_shared_channel_work_matches_recurrence(tiling, n):
    # bwd_share: delta computed by one lane part per step and shuffled, the end of each step
    # (du, ddelta, dz, D and bias sums) by one part after a reduce-scatter over the parts;
    # ragged (11 steps: the padded steps' ddelta is masked per part), grouped, every option.
    # ck_unroll: the training forward unrolled over 8 steps (L padded to 16, so its
    # checkpoints run past the backward's 12 padded steps), checkpoints every 4, delta shared
    # across the forward's two lane parts.
    check_against_recurrence(jnp.float32, n, 2, 11, OPTIONAL, True, **tiling)


@pytest.mark.parametrize("tiling,n,groups", [
    pytest.param(dict(state_tile=True, ahead=3, chunk=4), 16, 2, marks=pytest.mark.slow),
    pytest.param(dict(state_tile=True, ahead=0), 8, None, marks=pytest.mark.slow),
    pytest.param(dict(state_tile=True, ahead=2, ck_unroll=True, chunk=2, fwd_chunk=4), 16, 2,
                 marks=pytest.mark.slow),
    pytest.param(dict(state_tile=True, ahead=1, ck_copy=True), 16, None,
                 marks=pytest.mark.slow),
    pytest.param(dict(state_tile=True, bwd_tile=True, ahead=2, chunk=4), 16, 2,
                 marks=pytest.mark.slow),
    pytest.param(dict(state_tile=True, bwd_tile=True, keep_decay=True, chunk=2), 16, None,
                 marks=pytest.mark.slow),
], ids=["ahead3_n16_groups", "ahead0_n8", "ck_unroll", "ck_rows", "bwd_tile",
        "bwd_tile_kept_chunk2"])
def test_state_tile_forward_matches_recurrence(tiling, n, groups):
    # state_tile: the forward (inference and training) with one lane per channel holding all
    # N states as an [N, bd] tile and B/C rows broadcast; its checkpoints feed the v4 backward
    # or (bwd_tile) the backward in the same layout, whose dB/dC butterfly runs over tiles.
    # Ragged (11 steps), every option; the B/C window (ahead 2, 3) crosses the chunks.
    check_against_recurrence(jnp.float32, n, groups, 11, OPTIONAL, True, **tiling)
    args, kwargs = split(make_inputs(4, n=n, groups=groups, length=11), OPTIONAL)
    y, h = kernel(*args, **kwargs, delta_softplus=True, **tiling)    # the inference forward
    y_ref, h_ref = reference(*args, **kwargs, delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


def test_mosaic_gpu_auto_is_off_in_interpret_mode_and_on_cpu():
    # mgpu="auto" (the default) takes the Mosaic GPU kernels only on a Hopper GPU.
    for interpret in (True, False):
        cfg = ss._Config(softplus=True, mgpu="auto", interpret=interpret)
        assert ss._mgpu_mode(cfg) is False
    assert ss._mgpu_mode(ss._Config(softplus=True, mgpu=True, interpret=True)) is True


@pytest.mark.parametrize("tiling,n,groups,dn", [
    pytest.param(dict(mgpu=True, mgpu_chunk=4, mgpu_stages=2, chunk=2), 16, 2, 256,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_chunk=8, mgpu_stages=2, chunk=4), 16, 2,
                 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=1, mgpu_chunk=4, mgpu_stages=3,
                      chunk=4, mgpu_keep=False), 5, None, 192, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_chunk=4, mgpu_stages=3, chunk=2), 5, None, 192,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_split=2, mgpu_chunk=4, chunk=4), 16, 2,
                 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_split=2, mgpu_bwd_split=2, mgpu_chunk=8,
                      chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_split=2, mgpu_bwd_split=2, mgpu_chunk=4,
                      chunk=4, mgpu_keep=False), 6, None, 128, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_split=2, mgpu_chunk=8, chunk=2), 6, None, 192,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_ck_unsplit=False, mgpu_chunk=8, chunk=4), 16, 2, 256,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_chunk=8, mgpu_unroll=4, mgpu_yacc=4,
                      mgpu_skew=True, mgpu_bwd_loop=True, mgpu_bwd_ahead=True, chunk=4), 16, 2,
                 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=1, mgpu_chunk=8, chunk=4,
                      mgpu_bwd_loop=True, mgpu_keep=False), 5, None, 192,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=1, mgpu_chunk=16, chunk=4,
                      mgpu_bwd_loop=True, mgpu_bwd_ahead=True), 16, None, 128,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=1, mgpu_chunk=16, chunk=4,
                      mgpu_bwd_loop=2), 16, None, 128, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair=True, mgpu_chunk=4, chunk=4), 16, 2,
                 128, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_pair=True, mgpu_chunk=6, chunk=2, mgpu_yacc=2), 6, None,
                 192, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair="train", mgpu_bwd_split=1,
                      mgpu_bwd_loop=True, mgpu_chunk=8, chunk=4), 16, 2, 128,
                 marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair="train", mgpu_chunk=8, chunk=4), 6,
                 None, 192, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_chunk=8, mgpu_unroll=2, mgpu_yacc=3, mgpu_poly=3,
                      chunk=2), 5, None, 192, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair="train", mgpu_bwd_split=1,
                      mgpu_bwd_loop=True, mgpu_bwd_pair=True, mgpu_bwd_rowsum=True,
                      mgpu_chunk=8, chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair=False, mgpu_bwd_split=1,
                      mgpu_bwd_loop=False, mgpu_bwd_pair=True, mgpu_chunk=4, chunk=4), 6,
                 None, 100, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_pair=True, mgpu_pair_parts=4, mgpu_chunk=4, chunk=2),
                 16, 2, 128, marks=pytest.mark.slow),
    pytest.param(dict(mgpu="fwd", mgpu_pair=True, mgpu_pair_parts=4, mgpu_chunk=8, chunk=2),
                 8, None, 72, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair="train", mgpu_pair_train_parts=4,
                      mgpu_bwd_split=1, mgpu_bwd_loop=True, mgpu_bwd_pair=4, mgpu_chunk=8,
                      chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_pair=False, mgpu_bwd_split=1,
                      mgpu_bwd_loop=False, mgpu_bwd_pair=4, mgpu_bwd_rowsum=True, mgpu_chunk=4,
                      chunk=4), 8, None, 100, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=1, mgpu_chunk=8, chunk=4,
                      mgpu_bwd_loop=True, mgpu_bwd_rowsum=True, mgpu_pair="train",
                      mgpu_pair_train_chunk=16), 16, None, 128, marks=pytest.mark.slow),
    pytest.param(dict(mgpu=True, mgpu_bwd=True, mgpu_bwd_split=2, mgpu_chunk=8, chunk=4,
                      mgpu_bwd_rowsum=True, mgpu_bwd_ahead=True), 6, 2, 256,
                 marks=pytest.mark.slow),
], ids=["train_n16_groups", "backward_n16_groups", "backward_n5_padded_channels",
        "inference_only_n5_padded_channels", "split2_train_bwd_n16_groups",
        "split2_bwd_split2_n16_groups", "split2_bwd_split2_n6_decays_again",
        "split2_inference_only_n6", "split_checkpoints_split2_backward",
        "step_loop_train_n16_groups", "step_loop_inference_n5",
        "sub_chunk_loop_backward_n5", "recompute_ahead_loop_backward_n16",
        "two_sub_chunks_per_loop_backward_n16", "pair_inference_n16_groups",
        "pair_inference_n6", "pair_train_one_thread_backward_n16_groups",
        "pair_train_two_thread_backward_n6_padded", "pair_backward_n16_groups_loop",
        "pair_backward_of_one_thread_forward_n6_padded", "quad_inference_n16_groups",
        "quad_inference_n8_padded", "quad_train_quad_backward_n16_groups_loop",
        "quad_backward_of_one_thread_forward_n8_padded",
        "row_sums_one_thread_loop_pair_train_c16_n16", "row_sums_two_thread_ahead_n6_groups"])
def test_mosaic_gpu_forward_matches_recurrence(tiling, n, groups, dn):
    tiling = {**V8_TRAINING, **tiling}   # these cases test the v8 paths (v9: the block below)
    # The Mosaic GPU forward (selective_scan_mgpu, GPU interpret mode): one channel per thread
    # of a 128-thread warpgroup, B/C chunks by TMA into shared memory, a hand-written pipeline
    # of `mgpu_stages` slots. Ragged (11 steps in chunks of 4: the last chunk's padded steps
    # get delta 0), every option; mgpu=True: its checkpoints (every `chunk` = 2 steps, Dn
    # padded to 128) feed the Triton backward; "fwd": the training forward stays Triton's. N
    # = 5 with Dn = 192: a B/C row of 10 floats padded to 12, channels padded to 256.
    check_against_recurrence(jnp.float32, n, groups, 11, OPTIONAL, True, dn=dn, **tiling)
    args, kwargs = split(make_inputs(4, n=n, groups=groups, length=11, dn=dn), OPTIONAL)
    y, h = kernel(*args, **kwargs, delta_softplus=True, **tiling)    # the inference forward
    y_ref, h_ref = reference(*args, **kwargs, delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tiling", [dict(dbc_bf16=True), dict(bwd_split=4, dbc_bf16=True,
                                                               xor_reduce=True)],
                         ids=["bwd_split2", "bwd_split4_xor"])
def test_bf16_dbc_partials_match_recurrence(tiling):
    # dbc_bf16: the per-block dB/dC partials rounded to bf16 (B, C bf16), summed in f32.
    check_against_recurrence(jnp.bfloat16, 16, None, 10, ("D", "delta_bias"), True, **tiling)


def test_polynomial_exp2_matches_exp2():
    # The FMA-pipe exp2 of the forward (poly_exp) over the decays' whole range: x <= 0.
    x = jnp.concatenate([jnp.linspace(-125.0, 0.0, 100001), -jnp.abs(
        jax.random.normal(jax.random.PRNGKey(30), (10000,))) * 30.0])
    got = np.asarray(jax.jit(ss._exp2_poly, static_argnums=1)(x, False), np.float64)
    want = np.exp2(np.asarray(x, np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    assert float(ss._exp2_poly(jnp.zeros(()), False)) == 1.0
    assert 0.0 < float(ss._exp2_poly(jnp.float32(-400.0), False)) < 1e-37


@pytest.mark.slow
def test_split_forward_checkpoints_feed_unsplit_backward_at_odd_width():
    # Dn = 48: the split forward's 16-channel blocks give checkpoints 48 wide, the one-lane
    # backward's 32-channel blocks need 64 (re-padded in _backward).
    check_against_recurrence(jnp.float32, 4, None, 7, OPTIONAL, True, dn=48, split=2,
                             bwd_split=1)


# Session 9 (mamba_bwd): the pair backward's shared-memory layouts.
PAIR_TRAIN = dict(mgpu=True, mgpu_bwd=True, mgpu_pair="train", mgpu_bwd_split=1,
                  mgpu_bwd_loop=True, mgpu_bwd_pair=True, mgpu_bwd_rowsum=True,
                  mgpu_ck_pair=False, mgpu_ck_late=False, mgpu_bwd_keep_b=False,
                  mgpu_bwd_pad_rows=False, mgpu_bwd_pair_ahead=False)


@pytest.mark.parametrize("tiling,n,groups,dn", [
    pytest.param(dict(PAIR_TRAIN, mgpu_ck_pair=True, mgpu_bwd_keep_b=True, mgpu_chunk=8,
                      chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_bwd_pair=False, mgpu_ck_pair=True, mgpu_chunk=8,
                      chunk=4), 6, None, 100, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_bwd_pair=False, mgpu_ck_pair="direct", mgpu_ck_late=True,
                      mgpu_chunk=8, chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_bwd_pair=False, mgpu_ck_late=True, mgpu_chunk=8,
                      chunk=4), 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_ck_pair=True, mgpu_bwd_pad_rows=True, mgpu_chunk=8,
                      chunk=4), 6, None, 100, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_ck_pair="direct", mgpu_ck_late=True,
                      mgpu_bwd_keep_b=True, mgpu_bwd_pair_ahead=True, mgpu_chunk=16, chunk=4),
                 16, 2, 256, marks=pytest.mark.slow),
    pytest.param(dict(PAIR_TRAIN, mgpu_ck_pair="direct", mgpu_bwd_direct_out=True,
                      mgpu_bwd_pad_rows=True, mgpu_chunk=8, chunk=4), 6, None, 100,
                 marks=pytest.mark.slow),
], ids=["ck2_pair_backward_keep_b_n16_groups", "ck2_one_thread_backward_n6_padded",
        "ck2_direct_late_one_thread_backward_n16_groups", "ck_late_one_thread_backward_n16_groups",
        "pad_rows_pair_backward_n6_padded", "ahead_pair_backward_direct_late_c16_n16_groups",
        "direct_out_pair_backward_n6_padded"])
def test_pair_backward_layouts_match_recurrence(tiling, n, groups, dn, monkeypatch):
    # The pair training forward's checkpoints in the pair layout (row k = the thread map
    # [4, 2, 16]: state p K + k of channel 16 w + l at thread 32 w + 16 p + l), read by the
    # pair backward: every gradient against the f32 recurrence, ragged (11 steps in chunks of
    # 8), every option. The spies check that both kernels took the layout options.
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []

    def spy(name, fn):
        def wrapped(*a, **k):
            seen.append((name, {o: k.get(o) for o in ("ck_pair", "save_ckpt", "ck2", "ahead")}))
            return fn(*a, **k)
        monkeypatch.setattr(mg, name, wrapped)
    spy("forward_pair", mg.forward_pair)
    spy("backward_pair", mg.backward_pair)
    spy("backward", mg.backward)
    check_against_recurrence(jnp.float32, n, groups, 11, OPTIONAL, True, dn=dn, **tiling)
    ck2 = bool(tiling.get("mgpu_ck_pair"))
    opts = {k: True for k, on in (("ck2", ck2), ("direct", tiling.get("mgpu_ck_pair") == "direct"),
                                  ("late", tiling.get("mgpu_ck_late"))) if on}
    assert ("forward_pair", {"ck_pair": None, "save_ckpt": opts or True, "ck2": None,
                             "ahead": None}) in seen
    if tiling["mgpu_bwd_pair"]:
        assert ("backward_pair", {"ck_pair": ck2, "save_ckpt": None, "ck2": None,
                                  "ahead": tiling.get("mgpu_bwd_pair_ahead", False)}) in seen
    else:
        assert ("backward", {"ck_pair": None, "save_ckpt": None, "ck2": ck2,
                             "ahead": None}) in seen


def test_v10_default_training_path_matches_recurrence(monkeypatch):
    # The v10 defaults with mgpu=True (GPU interpret mode; "auto" takes them on a Hopper GPU):
    # the pair training forward holding y of 8 step pairs in registers and storing ck2
    # checkpoints from registers after the next step group; the pair backward with B kept,
    # 5-tile input rows, the recompute ahead and dB/dC summed by shuffles (warp_red) in 8-step
    # chunks; every option, 2 groups, ragged (11 steps: two chunks of two sub-chunks, so both
    # `red` buffers and the ahead path). Since v12 (session 12) the dB/dC rows go to one
    # accumulator (dbc_add: TMA reduce-add on the GPU; interpret mode, which has no TMA
    # reduction, keeps a slot per program in that ref, summed after the kernel).
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []
    orig_bwd, orig_fwd = mg.backward_pair, mg.forward_pair

    def spy_bwd(*a, **k):
        seen.append({o: k.get(o) for o in ("chunk", "ck_pair", "keep_b", "pad_rows", "ahead",
                                           "warp_red", "dbc_add", "perm")})
        return orig_bwd(*a, **k)

    def spy_fwd(*a, **k):
        seen.append(("fwd", k.get("train_opts")))
        return orig_fwd(*a, **k)
    monkeypatch.setattr(mg, "backward_pair", spy_bwd)
    monkeypatch.setattr(mg, "forward_pair", spy_fwd)
    check_against_recurrence(jnp.float32, 16, 2, 11, OPTIONAL, True, dn=256, mgpu=True, chunk=4)
    assert ("fwd", (("ydefer", 8),)) in seen
    assert dict(chunk=8, ck_pair=True, keep_b=True, pad_rows=True, ahead=True,
                warp_red=True, dbc_add=True, perm=True) in seen


def test_v11_pair_backward_past_one_program_per_sm(monkeypatch):
    # v11: where the one-thread grid does not fit one program per SM (Dn 4096 at B 8 on an
    # H200) the forwards stay one-thread (v6.1) and the backward is the pair one with v10's
    # options, reading the one-thread checkpoints (ck_pair False). The grid test is patched
    # to "does not fit"; every gradient against the f32 recurrence, 2 groups, ragged.
    ss = importlib.import_module("pallas_kernels.selective_scan")
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    monkeypatch.setattr(ss, "_mgpu_one_per_sm", lambda bsz, dn: False)
    seen = []
    orig_bwd, orig_fwd = mg.backward_pair, mg.forward

    def spy_bwd(*a, **k):
        seen.append({o: k.get(o) for o in ("chunk", "ck_pair", "warp_red", "keep_b")})
        return orig_bwd(*a, **k)

    def spy_fwd(*a, **k):
        seen.append(("fwd", bool(k.get("save_ckpt")), k.get("split")))
        return orig_fwd(*a, **k)
    monkeypatch.setattr(mg, "backward_pair", spy_bwd)
    monkeypatch.setattr(mg, "forward", spy_fwd)
    check_against_recurrence(jnp.float32, 16, 2, 11, OPTIONAL, True, dn=256, mgpu=True, chunk=4)
    assert ("fwd", True, 1) in seen
    assert dict(chunk=8, ck_pair=False, warp_red=True, keep_b=True) in seen


def test_mgpu_backward_split_auto_resolution(monkeypatch):
    # mgpu_bwd_split=0: 1 (the pair or the looped one-thread backward) where the grid fits one
    # program per SM or the pair backward takes the shape; 2 (v6.1) only past one program per
    # SM for shapes the pair backward does not take (odd N).
    ss = importlib.import_module("pallas_kernels.selective_scan")
    cfg = ss._Config(softplus=False, mgpu_bwd_split=0, mgpu_bwd_pair=True)
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    u, b = shape(8, 64, 4096), shape(8, 64, 16)
    assert ss._mgpu_bwd_split(cfg, u, shape(4096, 16), b) == 1
    monkeypatch.setattr(ss, "_mgpu_one_per_sm", lambda bsz, dn: False)
    assert ss._mgpu_bwd_split(cfg, u, shape(4096, 16), b) == 1
    assert ss._mgpu_bwd_split(cfg, u, shape(4096, 5), shape(8, 64, 5)) == 2
    assert ss._mgpu_bwd_split(ss._Config(False, mgpu_bwd_split=0, mgpu_bwd_pair=False), u,
                              shape(4096, 16), b) == 2


# Session 9b (mamba_red): dB/dC summed over each half-warp's channels by shuffles (warp_red).
@pytest.mark.slow
@pytest.mark.parametrize("tiling,n,groups,dn,length", [
    pytest.param(dict(mgpu_chunk=16, chunk=4), 16, 2, 256, 37, id="v9_c16_n16_groups"),
    pytest.param(dict(mgpu_chunk=8, chunk=4, mgpu_bwd_pad_rows=False,
                      mgpu_bwd_pair_ahead=False, mgpu_bwd_loop=False), 6, None, 100, 11,
                 id="unrolled_n6_padded"),
])
def test_warp_reduced_dbc_pair_backward_matches_recurrence(tiling, n, groups, dn, length,
                                                           monkeypatch):
    # v9 + mgpu_bwd_warp_red (GPU interpret mode): every gradient against the f32 recurrence,
    # every option, ragged; 16-step chunks (4 sub-chunks: both `red` buffers in turn, the
    # looped and ahead paths) at N 16 with 2 groups, and N 6 (zero-padded values in the
    # butterfly, Dn 100 padded) unrolled. The spy checks that the pair backward took it.
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []
    orig = mg.backward_pair

    def spy(*a, **k):
        seen.append(k.get("warp_red"))
        return orig(*a, **k)
    monkeypatch.setattr(mg, "backward_pair", spy)
    check_against_recurrence(jnp.float32, n, groups, length, OPTIONAL, True, dn=dn, mgpu=True,
                             mgpu_bwd_warp_red=True, **tiling)
    assert seen == [True]


def test_lane_reduce_scatter_sums_each_value_over_the_lanes():
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    vs = [jax.random.normal(jax.random.PRNGKey(e), (4, 2, 16)) for e in range(16)]
    out = mg._lane_reduce_scatter(vs, interpret=True)
    want = jnp.stack(vs, -1).sum(2)       # [4, 2, 16 values]: value e summed over the lanes
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("free,mask", [((8, 4), 12), ((8, 4, 2), 14)])
def test_lane_reduce_scatter_free_levels_take_the_lane_permuted_layout(free, mask):
    # free=(8, 4): lane l's register e holds logical value e ^ (l & 12) (the pair backward's
    # permuted state slots, mgpu_bwd_perm; (8, 4, 2): e ^ (l & 14), perm 3); lane l must
    # still end with logical value l summed over the 16 lanes of its part. Without the
    # permuted layout the result is wrong.
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    logical = jax.random.normal(jax.random.PRNGKey(3), (16, 4, 2, 16))    # [value, w, p, l]
    lane = np.arange(16)
    regs = [logical[e ^ (lane & mask), :, :, lane].transpose(1, 2, 0) for e in range(16)]
    want = logical.sum(3).transpose(1, 2, 0)     # [w, p, value]: value summed over the lanes
    out = mg._lane_reduce_scatter(regs, interpret=True, free=free)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    wrong = mg._lane_reduce_scatter(regs, interpret=True)
    assert not np.allclose(wrong, want, rtol=1e-3, atol=1e-3)


# (The default path, perm on ck2 checkpoints, also runs unmarked in
# test_v10_default_training_path_matches_recurrence.)
@pytest.mark.slow
@pytest.mark.parametrize("ck2,perm", [(True, True), (False, True), (True, False), (True, 3),
                                      (False, 3), (True, "early"), (False, "early")],
                         ids=["ck2", "one_thread_checkpoints", "v12_unpermuted", "perm3_ck2",
                              "perm3_one_thread_checkpoints", "red_early_ck2",
                              "red_early_one_thread_checkpoints"])
def test_v13_permuted_slots_pair_backward_matches_recurrence(ck2, perm, monkeypatch):
    # mgpu_bwd_perm (session 13) on the v12 default path (GPU interpret mode): the pair
    # backward's state slots permuted by lane bits 2-3 (B / C by xor-ed 8-byte columns, the
    # checkpoints from xor-ed rows, A / dh / dA permuted once) so that the dB/dC butterfly's
    # xor-8 and xor-4 levels need no selects; every gradient against the f32 recurrence, 2
    # groups, every input, ragged over two chunks of two sub-chunks. ck2: the pair training
    # forward's checkpoints; else (the grid test patched to "does not fit", as at Dn 4096 on
    # an H200) the one-thread forward's. The spy checks that the kernel body took the
    # permuted path on that checkpoint layout. v12_unpermuted: the opt-out (v12's butterfly);
    # red_early: the butterfly stops after the select-free levels (4 partial sums per lane
    # through `red`).
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    if not ck2:
        ss = importlib.import_module("pallas_kernels.selective_scan")
        monkeypatch.setattr(ss, "_mgpu_one_per_sm", lambda bsz, dn: False)
    seen = []
    orig = mg._bwd_pair_body

    def spy(*a, **k):
        took = {None: False, 2: True}.get(k.get("perm"), k.get("perm"))
        seen.append(("early" if k.get("red_early") else took, k.get("ck_pair")))
        return orig(*a, **k)
    monkeypatch.setattr(mg, "_bwd_pair_body", spy)
    check_against_recurrence(jnp.float32, 16, 2, 11, OPTIONAL, True, dn=256, mgpu=True, chunk=4,
                             mgpu_bwd_perm=True if perm == "early" else perm,
                             mgpu_bwd_red_early=perm == "early")
    assert (perm, ck2) in seen


def check_against_recurrence(dtype, n, groups, length, use, softplus, dn=64, **tiling):
    kernel_fn = functools.partial(kernel, **tiling)
    inputs = make_inputs(2, n=n, groups=groups, length=length, dtype=dtype, dn=dn)
    names = ("u", "delta", "A", "B", "C") + tuple(k for k in OPTIONAL if k in use)

    def loss(fn):
        def f(*xs):
            d = dict(zip(names, xs, strict=True))
            args, kwargs = split(d, use)
            y, h = fn(*args, **kwargs, delta_softplus=softplus)
            return jnp.sum(y.astype(jnp.float32) * w_y) + jnp.sum(h * w_h)
        return f

    w_y = jax.random.normal(jax.random.PRNGKey(20), inputs["u"].shape)   # random cotangents
    w_h = jax.random.normal(jax.random.PRNGKey(21), inputs["initial_state"].shape)
    xs = tuple(inputs[k] for k in names)
    argnums = tuple(range(len(xs)))
    value, grads = jax.jit(jax.value_and_grad(loss(kernel_fn), argnums=argnums))(*xs)
    xs32 = tuple(x.astype(jnp.float32) for x in xs)
    value_ref, grads_ref = jax.value_and_grad(loss(reference), argnums=argnums)(*xs32)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert abs(value - value_ref) < tol * (1 + abs(value_ref))
    for k, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
        assert np.all(np.isfinite(np.asarray(g, np.float32))), k
        assert rel_err(g, g_ref) < tol, (k, rel_err(g, g_ref))


def test_selective_scan_long_sequence_strong_and_weak_decay_has_no_nan():
    inputs = make_inputs(3, b=2, length=1000, dn=32, n=4, a_scale=1.0)
    # Batch row 0: delta ~ 5 (the state forgets within a step, exp(delta * A) underflows);
    # row 1: delta ~ 1e-4 (the state keeps everything for the whole sequence).
    inputs["delta"] = inputs["delta"] + jnp.array([5.0, -9.0])[:, None, None]
    args, kwargs = split(inputs, ("D",))
    fwd = jax.jit(lambda *a: kernel(*a, **kwargs, delta_softplus=True, chunk=4))
    y, final = fwd(*args)
    y_ref, final_ref = reference(*args, **kwargs, delta_softplus=True)
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(final)))
    assert rel_err(y, y_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4

    def loss(fn, u, delta):
        y, h = fn(u, delta, *args[2:])
        return jnp.sum(y * y) + jnp.sum(h)
    grads = jax.jit(jax.grad(lambda *a: loss(fwd, *a), argnums=(0, 1)))(*args[:2])
    ref = lambda *a: reference(*a, **kwargs, delta_softplus=True)
    grads_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1))(*args[:2])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        assert rel_err(g, g_ref) < 1e-4


def test_public_selective_scan_dispatches_to_kernel_and_reference():
    # The inference forward (no checkpoints, default tiling) with every option.
    inputs = make_inputs(4, n=3, length=7, groups=2)
    args, kwargs = split(inputs, OPTIONAL)
    fwd = jax.jit(lambda *a: selective_scan(*a, **kwargs, delta_softplus=True,
                                            backend="interpret", return_state=True))
    y, final = fwd(*args)
    y_ref, final_ref = selective_scan(*args, **kwargs, delta_softplus=True, backend="reference",
                                      return_state=True)
    assert y.shape == y_ref.shape and final.shape == final_ref.shape == (2, 64, 3)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*args, backend="cuda")


@pytest.mark.parametrize("bad", ["delta", "A", "B", "D", "initial_state"])
def test_selective_scan_rejects_bad_shapes(bad):
    inputs = make_inputs(5, n=4, length=6)
    inputs[bad] = inputs[bad][:-1] if bad == "A" else inputs[bad][..., :-1]
    args, kwargs = split(inputs, ("D", "initial_state"))
    with pytest.raises(ValueError, match=bad):
        selective_scan(*args, **kwargs, backend="interpret")


@pytest.mark.parametrize("method", ["associative", "chunked"])
def test_reference_methods_agree_with_scan(method):
    inputs = make_inputs(6, n=4, length=70, groups=2)
    args, kwargs = split(inputs, OPTIONAL)
    y, h = jax.jit(lambda *a: ss.selective_scan_reference(*a, **kwargs, delta_softplus=True,
                                                          method=method))(*args)
    y_ref, h_ref = ss.selective_scan_reference(*args, **kwargs, delta_softplus=True,
                                               method="scan")
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("groups", [2, pytest.param(None, marks=pytest.mark.slow)])
def test_state_update_steps_match_full_forward(groups):
    length = 5
    inputs = make_inputs(7, n=16, length=length, groups=groups)
    args, kwargs = split(inputs, OPTIONAL)
    y_ref, final_ref = reference(*args, **kwargs, delta_softplus=True)
    u, delta, A, B, C = args
    step = jax.jit(lambda state, u, delta, b, c, z: selective_state_update(
        state, u, delta, A, b, c, D=kwargs["D"], z=z, delta_bias=kwargs["delta_bias"],
        delta_softplus=True, backend="interpret"))
    state, ys = kwargs["initial_state"], []
    for t in range(length):
        y_t, state = step(state, u[:, t], delta[:, t], B[:, t], C[:, t], kwargs["z"][:, t])
        ys.append(y_t)
    assert rel_err(jnp.stack(ys, 1), y_ref) < 1e-5
    assert rel_err(state, final_ref) < 1e-5


def test_state_update_odd_state_size_uses_jnp_step():
    inputs = make_inputs(8, n=5, length=1)
    args, kwargs = split(inputs, ("D", "initial_state"))
    u, delta, A, B, C = args
    y, state = selective_state_update(kwargs["initial_state"], u[:, 0], delta[:, 0], A, B[:, 0],
                                      C[:, 0], D=kwargs["D"], backend="interpret")
    y_ref, final_ref = reference(*args, **kwargs)
    assert rel_err(y, y_ref[:, 0]) < 1e-5 and rel_err(state, final_ref) < 1e-5


@pytest.mark.parametrize("use,softplus,groups,n", [
    (OPTIONAL, True, 2, 5),
    pytest.param(("D", "z"), False, None, 16, marks=pytest.mark.slow),
], ids=["all_options_groups", "d_z_n16"])
def test_tpu_kernel_matches_recurrence_in_tpu_interpret_mode(use, softplus, groups, n):
    inputs = make_inputs(9, n=n, groups=groups, length=13, dn=32)
    inputs["delta"] = jax.nn.softplus(inputs["delta"]) if not softplus else inputs["delta"]
    names = ("u", "delta", "A", "B", "C") + tuple(k for k in OPTIONAL if k in use)
    w_y = jax.random.normal(jax.random.PRNGKey(22), inputs["u"].shape)
    w_h = jax.random.normal(jax.random.PRNGKey(23), inputs["initial_state"].shape)

    def loss(fn):
        def f(*xs):
            args, kwargs = split(dict(zip(names, xs, strict=True)), use)
            y, h = fn(*args, **kwargs, delta_softplus=softplus)
            return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)
        return f

    tpu = lambda *a, **k: ss.selective_scan_tpu(*a, **k, chunk=8)
    xs = tuple(inputs[k] for k in names)
    argnums = tuple(range(len(xs)))
    (_, (y, h)), grads = jax.jit(jax.value_and_grad(loss(tpu), argnums, has_aux=True))(*xs)
    (_, (y_ref, h_ref)), grads_ref = jax.value_and_grad(loss(reference), argnums,
                                                        has_aux=True)(*xs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    for k, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-5, k
    y_public = selective_scan(*split(inputs, use)[0], **split(inputs, use)[1],
                              delta_softplus=softplus, backend="tpu_interpret")
    assert rel_err(y_public, y_ref) < 1e-5


# Session 9 (mamba_fwd): the pair inference forward's opt-in schedules (_fwd_pair_inf_body).
def test_softplus_with_one_mufu_op_matches_softplus():
    # _softplus_1mufu (max(x, 0) + log1p(exp(-|x|)), log1p by a degree-7 polynomial)
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    x = jnp.linspace(-30.0, 30.0, 60001, dtype=jnp.float32)
    ref = np.logaddexp(0.0, np.asarray(x, np.float64))
    got = np.asarray(mg._softplus_1mufu(x), np.float64)
    assert np.max(np.abs(got - ref) / ref) < 3e-6


@pytest.mark.parametrize("inf,n,groups,dn,dtype,use,softplus", [
    (dict(ahead=1, poly=3, ybuf=3, cross=True, sp1=True, ydefer=16, rawp=True), 16, 2, 128,
     jnp.float32, OPTIONAL, True),
    pytest.param(dict(idx=True, poly=1, ahead=2, cross=True), 6, None, 100, jnp.bfloat16,
                 ("z", "D"), True, marks=pytest.mark.slow),
    pytest.param(dict(ahead=0, ybuf=4, ydefer=3, rawp=True), 8, 2, 256, jnp.float32,
                 ("delta_bias", "initial_state"), False, marks=pytest.mark.slow),
    pytest.param(dict(rawp=True, sp1=True, ydefer=16), 8, None, 72, jnp.bfloat16,
                 ("z", "D", "delta_bias"), True, marks=pytest.mark.slow),
    # rawp asked for (as the default options do) where N % 4 != 0: the XLA layout of A, D and
    # bias (session 12: the kernel body took rawp anyway and failed at N 6)
    (dict(rawp=True, ybuf=3), 6, None, 64, jnp.float32, ("D", "delta_bias"), True),
], ids=["every_option_n16_groups_all_inputs", "idx_poly1_ahead2_n6_padded_bf16_z",
        "ybuf4_ydefer3_rawp_n8_groups_no_softplus", "v9_rawp_n8_padded_bf16",
        "rawp_asked_at_n6_takes_the_xla_layout"])
def test_pair_inference_schedules_match_recurrence(inf, n, groups, dn, dtype, use, softplus):
    # Ragged (11 steps in chunks of 6 or 4: padded steps get delta 0); the inference forward
    # only (the training forward never takes these options).
    args, kwargs = split(make_inputs(7, n=n, groups=groups, length=11, dn=dn, dtype=dtype), use)
    y, h = kernel(*args, **kwargs, delta_softplus=softplus, mgpu="fwd", mgpu_pair=True,
                  mgpu_pair_chunk=6 if n == 6 else 4, mgpu_pair_inf=inf)
    y_ref, h_ref = reference(*args, **kwargs, delta_softplus=softplus)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert rel_err(y, y_ref) < tol and rel_err(h, h_ref) < tol
    # the default pair body gives the same numbers (a schedule, not a change of the math)
    y0, h0 = kernel(*args, **kwargs, delta_softplus=softplus, mgpu="fwd", mgpu_pair=True,
                    mgpu_pair_chunk=6 if n == 6 else 4)
    assert rel_err(y, y0) < tol and rel_err(h, h0) < tol


# Session 9 (mamba_bcin): the pair inference forward reading B / C by TMA as they are (bcin),
# converted to f32 per chunk inside the kernel; shapes it does not take keep the prepared path.
@pytest.mark.slow
@pytest.mark.parametrize("inf,n,groups,dn,dtype,use,length,chunk,taken", [
    (dict(sp1=True, ydefer=16, bcin=True), 16, None, 128, jnp.bfloat16, ("z", "D", "delta_bias"),
     11, 8, True),
    (dict(sp1=True, ydefer=4, bcin=True, rawp=True, ybuf=3, ahead=1, idx=True), 8, 2, 256,
     jnp.float32, OPTIONAL, 40, 16, True),
    (dict(sp1=True, ydefer=16, bcin=True), 6, None, 100, jnp.bfloat16, ("z", "D"), 11, 6, False),
], ids=["v9_bcin_n16_padded_bf16_z", "bcin_rawp_ybuf3_ahead_n8_groups_f32_all",
        "bcin_n6_keeps_prepared_path"])
def test_pair_inference_bc_in_kernel_matches_recurrence(inf, n, groups, dn, dtype, use, length,
                                                        chunk, taken, monkeypatch):
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    calls = []
    orig = mg._bc_convert
    monkeypatch.setattr(mg, "_bc_convert", lambda *a: (calls.append(a[1:]), orig(*a))[1])
    args, kwargs = split(make_inputs(7, n=n, groups=groups, length=length, dn=dn, dtype=dtype),
                         use)
    run = lambda opts: kernel(*args, **kwargs, delta_softplus=True, mgpu="fwd", mgpu_pair=True,
                              mgpu_pair_chunk=chunk, mgpu_pair_inf=opts)
    y, h = run(inf)
    assert bool(calls) == taken   # the prologue's chunk 0 and each chunk's next one
    y_ref, h_ref = reference(*args, **kwargs, delta_softplus=True)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert rel_err(y, y_ref) < tol and rel_err(h, h_ref) < tol
    # the same numbers as the prepared B / C rows (the same f32 values reach the steps)
    y0, h0 = run({k: v for k, v in inf.items() if k != "bcin"})
    assert rel_err(y, y0) < 1e-6 and rel_err(h, h0) < 1e-6


# Session 9 (mamba_bcin): the pair training forward with y held in registers (ydefer) and the
# one-MUFU softplus (sp1), opt-in through mgpu_pair_train_opts; every gradient through the v9
# pair backward from its checkpoints.
@pytest.mark.slow
@pytest.mark.parametrize("opts,dtype,n,groups,dn,use", [
    (dict(ydefer=3, sp1=True), jnp.float32, 16, 2, 256, OPTIONAL),
    (dict(ydefer=16), jnp.bfloat16, 6, None, 128, ("z", "D", "delta_bias")),
], ids=["ydefer3_sp1_n16_groups_all_inputs", "ydefer16_n6_bf16_z"])
def test_pair_training_forward_held_y_matches_recurrence(opts, dtype, n, groups, dn, use,
                                                         monkeypatch):
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []
    orig = mg._fwd_pair_body

    def spy(*a, **k):
        seen.append((k.get("save_ckpt") is not False, k.get("ydefer"), k.get("sp1")))
        return orig(*a, **k)
    monkeypatch.setattr(mg, "_fwd_pair_body", spy)
    # 11 steps in chunks of 8 (ragged, two chunks: the held rows flushed mid-chunk and at its end)
    check_against_recurrence(dtype, n, groups, 11, use, True, dn=dn, mgpu=True, mgpu_chunk=8,
                             chunk=4 if n % 4 == 0 else 2, mgpu_pair_train_chunk=8,
                             mgpu_pair_train_opts=opts)
    assert (True, opts["ydefer"], opts.get("sp1")) in seen



# Session 12: the dB/dC block rows summed in the pair backward (dbc_add: TMA reduce-add into
# one [B, G, Lp, 32] accumulator on the GPU; interpret mode has no TMA reduction and keeps a
# slot per program in the accumulator ref, summed after the kernel) is the v12 default (see
# test_v10_default_training_path_matches_recurrence); here the opt-out, v11's block rows
# summed by XLA in a fixed order (bitwise reproducible).
@pytest.mark.slow
def test_v12_dbc_add_off_pair_backward_matches_recurrence(monkeypatch):
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []
    orig_bwd = mg.backward_pair

    def spy_bwd(*a, **k):
        seen.append(k.get("dbc_add"))
        return orig_bwd(*a, **k)
    monkeypatch.setattr(mg, "backward_pair", spy_bwd)
    check_against_recurrence(jnp.float32, 16, 2, 11, OPTIONAL, True, dn=256, mgpu=True, chunk=4,
                             mgpu_bwd_dbc_add=False)
    assert seen == [False]


# Session 12: A, D and bias as they are in the pair training forward (mgpu_pair_train_opts
# rawp) and the pair backward (mgpu_bwd_rawp), laid out per thread by the kernels (no XLA
# layout kernels), with dbc_add; every gradient against the f32 recurrence.
@pytest.mark.slow
def test_v12_raw_params_training_path_matches_recurrence(monkeypatch):
    mg = importlib.import_module("pallas_kernels.selective_scan_mgpu")
    seen = []
    orig_bwd, orig_body = mg.backward_pair, mg._fwd_pair_body

    def spy_bwd(*a, **k):
        seen.append(("bwd", k.get("rawp"), k.get("dbc_add")))
        return orig_bwd(*a, **k)

    def spy_body(*a, **k):
        seen.append(("fwd", k.get("rawp"), k.get("ydefer")))
        return orig_body(*a, **k)
    monkeypatch.setattr(mg, "backward_pair", spy_bwd)
    monkeypatch.setattr(mg, "_fwd_pair_body", spy_body)
    check_against_recurrence(jnp.float32, 16, 2, 11, OPTIONAL, True, dn=256, mgpu=True, chunk=4,
                             mgpu_bwd_dbc_add=True, mgpu_bwd_rawp=True,
                             mgpu_pair_train_opts=dict(ydefer=8, rawp=True))
    assert ("bwd", True, True) in seen and ("fwd", True, 8) in seen

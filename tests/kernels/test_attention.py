"""Flash attention and decode kernels against the dense reference (Pallas interpret mode, CPU)."""

import os

# Mosaic GPU interpret mode runs each warpgroup as a thread executing an XLA:CPU program; XLA's
# concurrency-optimised scheduler can park one warpgroup's program behind the others' blocked
# barrier waits on a 2-CPU machine (a hang, seen with the causal GQA backward). The flag only
# changes XLA:CPU scheduling and must be set before the CPU backend starts.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_concurrency_optimized_scheduler=false")
# The warpgroup programs also run their barrier-wait callbacks on XLA:CPU's worker pool, which
# has one thread per core: with 2 cores, two warpgroups blocked in barrier waits can hold both
# threads while the third's program waits for one (a hang seen in session 3 with -k filters).
# PJRT_NPROC sizes that pool (read when the CPU client starts).
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels import attention as attn  # noqa: E402

SMALL_BLOCKS = dict(block_q=16, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                    block_k_dkv=16)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(seed, b, lq, lk, hq, hkv, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, lk, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, lk, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, lq, hq, d), dtype)
    return q, k, v, do


def _segments(seed, b, length, n=3):
    return jnp.sort(jax.random.randint(jax.random.key(seed), (b, length), 0, n), axis=1)


def _fwd_and_grads(fn):
    """One jitted function returning (o, (dq, dk, dv)): compiles once, which is most of the cost."""
    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)
    return jax.jit(run)


def _check_fwd_bwd(fn, q, k, v, do, ref_kwargs, tol):
    o, grads = _fwd_and_grads(fn)(q, k, v, do)
    o_ref, grads_ref = _fwd_and_grads(
        lambda *a: attn.attention_reference(*a, **ref_kwargs))(q, k, v, do)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert _rel_err(o, o_ref) < tol
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        assert _rel_err(g, g_ref) < tol, name


SLOW = pytest.mark.slow
CASES = [  # b, lq, lk, hq, hkv, d, causal, window, segments, dtype
    pytest.param(2, 100, 100, 2, 2, 32, False, None, False, jnp.float32, marks=SLOW),
    (1, 100, 100, 4, 2, 32, True, None, False, jnp.float32),
    (1, 75, 75, 8, 1, 32, True, 20, False, jnp.float32),
    pytest.param(2, 70, 70, 2, 1, 32, True, None, True, jnp.float32, marks=SLOW),
    pytest.param(1, 90, 90, 2, 2, 64, False, None, True, jnp.bfloat16, marks=SLOW),
    (1, 40, 100, 2, 1, 32, True, None, False, jnp.float32),     # queries are the last Lq tokens
    pytest.param(1, 100, 40, 2, 2, 32, True, None, False, jnp.float32, marks=SLOW),
    (1, 97, 97, 4, 1, 64, True, 33, True, jnp.bfloat16),
]


@pytest.mark.parametrize("b,lq,lk,hq,hkv,d,causal,window,segments,dtype", CASES)
def test_flash_kernel_matches_reference_with_small_blocks(b, lq, lk, hq, hkv, d, causal, window,
                                                          segments, dtype):
    """Many blocks per row: exercises block skipping, masked edges and padded tails."""
    q, k, v, do = _inputs(lq + 7 * lk, b, lq, lk, hq, hkv, d, dtype)
    seg = _segments(lq, b, lq) if segments else None
    kw = dict(causal=causal, window=window, segment_ids=seg)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, **kw, **SMALL_BLOCKS)

    _check_fwd_bwd(fn, q, k, v, do, kw, 1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("causal,hkv,dtype", [
    (True, 1, jnp.bfloat16), pytest.param(False, 4, jnp.float32, marks=SLOW)])
def test_public_flash_attention_default_blocks_ragged_length(causal, hkv, dtype):
    q, k, v, do = _inputs(3, 1, 300, 300, 8, hkv, 64, dtype)

    def fn(q, k, v):
        return attn.flash_attention(q, k, v, causal=causal, backend="interpret")

    _check_fwd_bwd(fn, q, k, v, do, dict(causal=causal), 1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.slow
def test_head_dim_not_power_of_two_is_padded():
    q, k, v, do = _inputs(4, 1, 50, 50, 2, 2, 40, jnp.float32)
    fn = lambda q, k, v: attn.flash_attention(q, k, v, causal=True, backend="interpret")  # noqa
    _check_fwd_bwd(fn, q, k, v, do, dict(causal=True), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("length,hkv", [(1000, 2), (2049, 8)])
def test_long_ragged_lengths(length, hkv):
    """4097 (and 1000) also ran with real lowering on the H200: bench/attention.py checks."""
    q, k, v, do = _inputs(5, 1, length, length, 8, hkv, 64, jnp.bfloat16)
    seg = _segments(6, 1, length)
    kw = dict(causal=True, segment_ids=seg, window=300)
    fn = lambda q, k, v: attn.flash_attention(q, k, v, backend="interpret", **kw)  # noqa
    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_segment_block_ranges_skip_other_segments_and_fall_back_when_unsorted():
    seg = jnp.array([[0] * 20 + [1] * 30 + [2] * 14, [3, 1] * 32])   # packed; not sorted
    lo, hi = attn._segment_block_ranges(seg, 16, 4, 16, 4)
    # Row blocks [0,16) [16,32) [32,48) [48,64): segments {0}, {0,1}, {1}, {1,2}.
    np.testing.assert_array_equal(np.asarray(lo[0, :, 0]), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(hi[0, :, 0]), [2, 4, 4, 4])
    np.testing.assert_array_equal(np.asarray(lo[1, :, 0]), [0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(hi[1, :, 0]), [4, 4, 4, 4])


@pytest.mark.parametrize("sort", [pytest.param(True, marks=SLOW), False])
def test_unsorted_and_many_short_segments_match_reference(sort):
    q, k, v, do = _inputs(16, 2, 96, 96, 2, 1, 32, jnp.float32)
    seg = jax.random.randint(jax.random.key(17), (2, 96), 0, 6)
    seg = jnp.sort(seg, axis=1) if sort else seg
    kw = dict(causal=True, segment_ids=seg)
    fn = lambda q, k, v: attn.flash_attention_kernel(q, k, v, interpret=True, **kw,  # noqa
                                                     **SMALL_BLOCKS)
    _check_fwd_bwd(fn, q, k, v, do, kw, 1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v, _ = _inputs(7, 1, 32, 32, 2, 2, 32, jnp.float32)
    seg = jnp.concatenate([jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32)], 1)
    # Queries at positions -16..-1 (Lq > Lk) see no key under the causal mask.
    o = attn.flash_attention_kernel(q, k[:, :16], v[:, :16], causal=True, interpret=True,
                                    **SMALL_BLOCKS)
    assert np.all(np.asarray(o[:, :16]) == 0) and np.any(np.asarray(o[:, 16:]) != 0)
    o = attn.flash_attention_kernel(q, k, v, segment_ids=seg, interpret=True, **SMALL_BLOCKS)
    ref = attn.attention_reference(q, k, v, segment_ids=seg)
    assert _rel_err(o, ref) < 1e-5


def test_causal_output_ignores_future_tokens():
    q, k, v, _ = _inputs(8, 1, 64, 64, 2, 1, 32, jnp.float32)
    fn = lambda q, k, v: attn.flash_attention_kernel(q, k, v, causal=True, interpret=True,  # noqa
                                                     **SMALL_BLOCKS)
    o1 = fn(q, k, v)
    o2 = fn(q.at[:, 40:].add(1.0), k.at[:, 40:].add(1.0), v.at[:, 40:].add(1.0))
    np.testing.assert_array_equal(np.asarray(o1[:, :40]), np.asarray(o2[:, :40]))
    assert not np.allclose(np.asarray(o1[:, 40:]), np.asarray(o2[:, 40:]))


@pytest.mark.parametrize("t,hq,hkv,window,dtype", [
    pytest.param(1, 8, 2, None, jnp.float32, marks=SLOW),
    (3, 4, 4, None, jnp.bfloat16),
    (2, 8, 1, 50, jnp.float32)])
def test_decode_kernel_matches_reference(t, hq, hkv, window, dtype):
    b, s, d = 3, 300, 32
    q, k, v, _ = _inputs(9, b, t, s, hq, hkv, d, dtype)
    lengths = jnp.array([t, 177, 300])
    ref = attn.decode_attention_reference(q, k, v, lengths, window=window)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    o = attn.decode_attention(q, k, v, lengths, window=window, backend="interpret")
    assert o.shape == q.shape and _rel_err(o, ref) < tol
    # Many small splits: the log-sum-exp combine must be exact, empty splits must weigh 0.
    o = attn._decode_forward(q, k, v, lengths, sm_scale=d ** -0.5, window=window,
                             interpret=True, block_k=16, num_splits=7)
    assert _rel_err(o, ref) < tol


def test_decode_equals_flash_attention_on_the_cache_prefix():
    q, k, v, _ = _inputs(10, 1, 200, 200, 4, 2, 32, jnp.float32)
    full = attn.flash_attention(q, k, v, causal=True, backend="interpret")
    lengths = jnp.array([120])
    o = attn.decode_attention(q[:, 117:120], k, v, lengths, backend="interpret")
    assert _rel_err(o, full[:, 117:120]) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=jnp.ones((2, 8, 4))), "q must have shape"),
    (dict(k=jnp.ones((2, 8, 3, 16)), v=jnp.ones((2, 8, 3, 16))), "multiple of k/v heads"),
    (dict(v=jnp.ones((2, 9, 2, 16))), "same shape"),
    (dict(q=jnp.ones((2, 8, 4, 16), jnp.int32)), "q must be float32"),
    (dict(segment_ids=jnp.ones((2, 7), jnp.int32)), "segment_ids must have shape"),
    (dict(window=4), "window"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(q=jnp.ones((2, 8, 4, 16)), k=jnp.ones((2, 8, 2, 16)), v=jnp.ones((2, 8, 2, 16)))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        attn.flash_attention(q, k, v, **args)


def test_decode_bad_lengths_raise_value_error():
    q, k = jnp.ones((2, 1, 4, 16)), jnp.ones((2, 32, 2, 16))
    with pytest.raises(ValueError, match="lengths"):
        attn.decode_attention(q, k, k, jnp.array([3]))


TPU_SMALL = dict(block_q=16, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                 block_k_dkv=16)


@pytest.mark.parametrize("lq,lk,hq,hkv,window,segments", [
    (75, 75, 4, 2, 20, True),
    pytest.param(70, 70, 2, 2, None, True, marks=SLOW),
    pytest.param(40, 100, 2, 1, None, False, marks=SLOW),
])
def test_tpu_kernel_matches_reference_in_tpu_interpret_mode(lq, lk, hq, hkv, window, segments):
    from pallas_kernels import attention_tpu
    q, k, v, do = _inputs(11, 1, lq, lk, hq, hkv, 32, jnp.float32)
    seg = _segments(12, 1, lq) if segments else None
    kw = dict(causal=True, window=window, segment_ids=seg)

    def fn(q, k, v):
        return attention_tpu.flash_attention_tpu(q, k, v, interpret=True, **kw, **TPU_SMALL)

    _check_fwd_bwd(fn, q, k, v, do, kw, 1e-5)


def test_tpu_decode_and_public_dispatch_in_tpu_interpret_mode():
    q, k, v, _ = _inputs(13, 2, 2, 100, 8, 2, 32, jnp.float32)
    lengths = jnp.array([2, 77])
    o = attn.decode_attention(q, k, v, lengths, window=20, backend="tpu_interpret")
    ref = attn.decode_attention_reference(q, k, v, lengths, window=20)
    assert _rel_err(o, ref) < 1e-5
    q, k, v, _ = _inputs(14, 1, 24, 24, 2, 1, 32, jnp.bfloat16)
    o = attn.flash_attention(q, k, v, causal=True, backend="tpu_interpret")
    assert _rel_err(o, attn.attention_reference(q, k, v, causal=True)) < 2e-2


@pytest.mark.parametrize("lq,lk,hq,hkv,d,window", [
    (100, 130, 4, 2, 64, 40),
    pytest.param(260, 200, 2, 1, 128, None, marks=SLOW),
])
def test_mosaic_gpu_forward_in_gpu_interpret_mode(lq, lk, hq, hkv, d, window):
    """The experimental Mosaic GPU forward (backward: the Triton kernels, interpret mode)."""
    q, k, v, do = _inputs(15, 1, lq, lk, hq, hkv, d, jnp.bfloat16)
    kw = dict(causal=True, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           block_k=64, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_forward_dispatch_picks_mosaic_only_on_hopper_for_measured_head_dims():
    hopper, ampere, blackwell = (9, 0), (8, 0), (10, 0)
    assert attn.choose_fwd_impl(128, jnp.bfloat16, False, hopper) == "mosaic"
    assert attn.choose_fwd_impl(128, jnp.float16, False, hopper) == "mosaic"
    assert attn.choose_fwd_impl(128, jnp.float32, False, hopper) == "triton"    # tf32: Triton
    assert attn.choose_fwd_impl(128, jnp.bfloat16, True, hopper) == "triton"    # segment ids
    assert attn.choose_fwd_impl(256, jnp.bfloat16, False, hopper) == "triton"
    for cc in (ampere, blackwell, None):
        assert attn.choose_fwd_impl(128, jnp.bfloat16, False, cc) == "triton"
    for d in (64, 128, 256):
        expect = "mosaic" if d in attn.MOSAIC_FWD_DIMS else "triton"
        assert attn.choose_fwd_impl(d, jnp.bfloat16, False, hopper) == expect
    for d in (64, 128, 256):
        for causal in (False, True):
            expect = "mosaic" if (d, causal) in attn.MOSAIC_BWD_CELLS else "split"
            assert attn.choose_bwd_impl(d, jnp.bfloat16, False, hopper, causal) == expect
            assert attn.choose_bwd_impl(d, jnp.bfloat16, False, ampere, causal) == "split"
            assert attn.choose_bwd_impl(d, jnp.bfloat16, True, hopper, causal) == "split"
            assert attn.choose_bwd_impl(d, jnp.float32, False, hopper, causal) == "split"
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, False) == "mosaic"
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, True) == "mosaic"
    assert attn.choose_bwd_impl(128, jnp.bfloat16, False, hopper, False) == "mosaic"
    assert attn.choose_bwd_impl(128, jnp.bfloat16, False, hopper, True) == "mosaic"  # session 5
    for (d, causal), min_lk in attn.MOSAIC_BWD_MIN_LK.items():    # short keys: Triton
        assert attn.choose_bwd_impl(d, jnp.bfloat16, False, hopper, causal, min_lk - 1) == "split"
        assert attn.choose_bwd_impl(d, jnp.bfloat16, False, hopper, causal, min_lk) == "mosaic"
    assert attn._cuda_capability() is None                  # CPU: interpret / reference paths


def test_backward_delta_modes_agree():
    q, _, _, do = _inputs(3, 2, 50, 50, 4, 4, 64, jnp.bfloat16)
    ref = attn.backward_delta(q, do, "einsum")
    assert ref.shape == (2, 4, 50)
    for mode in ("rowsum", "rowsum_barrier"):
        np.testing.assert_allclose(attn.backward_delta(q, do, mode), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="bwd_delta"):
        attn.backward_delta(q, do, "nope")


def test_mosaic_backward_default_options_are_valid():
    from pallas_kernels import attention_mgpu
    for (d, causal), opts in attn.MOSAIC_BWD_OPTS.items():
        cfg = attn.FlashConfig(causal=causal, window=None, sm_scale=d ** -0.5, lq=256, lk=256,
                               has_segments=False, bwd_impl="mosaic", **opts)
        attention_mgpu.check_backward_options(cfg)
        for lk in (1024, 2048, 4096):                    # with the short / long entries
            attention_mgpu.check_backward_options(attn.FlashConfig(
                causal=causal, window=None, sm_scale=d ** -0.5, lq=lk, lk=lk,
                has_segments=False, bwd_impl="mosaic", **attn.mosaic_bwd_options(d, causal, lk)))
    bad = attn.FlashConfig(causal=False, window=None, sm_scale=1.0, lq=256, lk=256,
                           has_segments=False, mgpu_bwd_persistent=-1)   # needs no producer
    with pytest.raises(ValueError, match="mgpu_bwd_producer"):
        attention_mgpu.check_backward_options(bad)


def test_backward_short_key_options(monkeypatch):
    monkeypatch.setitem(attn.MOSAIC_BWD_SHORT, (128, True),
                        ((1024, dict(mgpu_bwd_defer_dq=True)), (2048, dict(mgpu_bwd_rows=True))))
    base = attn.MOSAIC_BWD_OPTS[128, True]
    assert attn.mosaic_bwd_options(128, True, 4096) == base
    assert attn.mosaic_bwd_options(128, True, 1000) == {**base, "mgpu_bwd_defer_dq": True}
    assert attn.mosaic_bwd_options(128, True, 2048) == {**base, "mgpu_bwd_rows": True}
    assert attn.mosaic_bwd_options(128, False, 1000) == attn.MOSAIC_BWD_OPTS[128, False]


def test_backward_long_key_options():
    """Above 2k keys only (MOSAIC_BWD_LONG): D=64 full (session 9) and causal (session 10) take
    one ring mbarrier; D=128 full and causal keep their options at every length (session 12:
    both cells' dq_mid sets are in MOSAIC_BWD_OPTS)."""
    for causal in (False, True):
        assert attn.mosaic_bwd_options(64, causal, 2048) == attn.MOSAIC_BWD_OPTS[64, causal]
        assert attn.mosaic_bwd_options(64, causal, 2049) == {**attn.MOSAIC_BWD_OPTS[64, causal],
                                                             "mgpu_bwd_one_bar": True}
    for lk in (1024, 2048, 16384):
        assert attn.mosaic_bwd_options(128, False, lk) == attn.MOSAIC_BWD_OPTS[128, False]
    assert attn.MOSAIC_BWD_OPTS[128, False]["mgpu_bwd_dq_mid"]
    for lk in (1024, 2048, 2049, 16384):
        assert attn.mosaic_bwd_options(128, True, lk) == attn.MOSAIC_BWD_OPTS[128, True]
    assert attn.MOSAIC_BWD_OPTS[128, True]["mgpu_bwd_dq_mid"]


def test_backward_dispatch_minimum_key_length(monkeypatch):
    hopper = (9, 0)
    monkeypatch.setitem(attn.MOSAIC_BWD_MIN_LK, (64, False), 2048)
    monkeypatch.delitem(attn.MOSAIC_BWD_MIN_LK, (64, True), raising=False)
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, False, 1024) == "split"
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, False, 2048) == "mosaic"
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, False) == "mosaic"
    assert attn.choose_bwd_impl(64, jnp.bfloat16, False, hopper, True, 1024) == "mosaic"


@pytest.mark.parametrize("causal,hkv,window,segments", [
    (True, 2, None, False), pytest.param(True, 1, 20, True, marks=SLOW)])
def test_backward_with_dq_fused_by_atomic_adds(causal, hkv, window, segments):
    """bwd_impl="atomic": dq accumulated in f32 by the dk/dv kernel (no separate dq kernel)."""
    q, k, v, do = _inputs(16, 1, 90, 90, 4, hkv, 32, jnp.float32)
    seg = _segments(17, 1, 90) if segments else None
    kw = dict(causal=causal, window=window, segment_ids=seg)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, bwd_impl="atomic",
                                           **SMALL_BLOCKS, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 1e-4)


@pytest.mark.parametrize("lq,lk,hq,hkv,d,causal,window", [
    (100, 100, 4, 2, 64, False, None),
    (300, 300, 4, 1, 64, True, None),
    pytest.param(130, 100, 1, 1, 64, True, None, marks=SLOW),
    pytest.param(128, 128, 1, 1, 128, True, 40, marks=SLOW),
])
def test_mosaic_gpu_backward_in_gpu_interpret_mode(lq, lk, hq, hkv, d, causal, window):
    """The Mosaic GPU backward (dk/dv with dq fused; interpret mode stores dq per KV tile and
    sums, the GPU path uses a TMA reduce-add into one f32 accumulator)."""
    q, k, v, do = _inputs(18, 1, lq, lk, hq, hkv, d, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("d,causal,extra", [
    pytest.param(128, True, dict(mgpu_bwd_p_lo=True, mgpu_bwd_regs=(232, 40)), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_rows=True), marks=SLOW),   # opt-in (lost on the H200)
    pytest.param(64, False, dict(mgpu_bwd_rows=True), marks=SLOW),
    pytest.param(64, True, dict(mgpu_bwd_rows=True, mgpu_bwd_dq="own"), marks=SLOW),
    pytest.param(64, True, dict(mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True), marks=SLOW),
    pytest.param(128, False, dict(mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True), marks=SLOW),
    pytest.param(64, True, dict(mgpu_bwd_overlap=True), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_overlap=True), marks=SLOW),
    pytest.param(64, False, dict(mgpu_bwd_overlap=True, mgpu_bwd_dq="own"), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_defer_dq=True), marks=SLOW),
    (64, False, dict(mgpu_bwd_defer_dq=True)),            # the D=64 default since session 4
    # the D=64 full default above 2k keys (session 9: deferred dq + one ring mbarrier), the
    # D=64 causal one (session 10), the D=128 full default (session 12: dq_mid at every length)
    (64, False, attn.mosaic_bwd_options(64, False, 4096)),
    (64, True, attn.mosaic_bwd_options(64, True, 4096)),
    (128, False, attn.mosaic_bwd_options(128, False, 4096)),
    # session 5: rows + early dS / dV, dq fused after dK, no producer warpgroup, dq "own"
    pytest.param(128, True, dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True), marks=SLOW),
    pytest.param(128, False, dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True, mgpu_bwd_dq="own"),
                 marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_p_lo=True, mgpu_bwd_producer=False), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_overlap=True, mgpu_bwd_dq_fused=True,
                                 mgpu_bwd_producer=False), marks=SLOW),
    # the D=128 defaults (full: the entry above since session 12; causal, session 12: the
    # deferred dq issued mid-step, one loop, one mbarrier, at every length)
    (128, True, attn.MOSAIC_BWD_OPTS[128, True]),
    # the session-8 causal default (rows, early dS / dV, one loop, one mbarrier; opt-in since)
    pytest.param(128, True, dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True,
                                 mgpu_bwd_dv_early=True, mgpu_bwd_producer=False,
                                 mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_p_lo=True, mgpu_bwd_producer=False,
                                 mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True),
                 marks=SLOW),                         # the session-7 causal default (lean)
    pytest.param(128, False, dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True,
                                  mgpu_bwd_dv_early=True, mgpu_bwd_dq_fused=True,
                                  mgpu_bwd_producer=False), marks=SLOW),
    pytest.param(64, True, dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True,
                                mgpu_bwd_dv_early=True, mgpu_bwd_dq_fused=True,
                                mgpu_bwd_dq="own"), marks=SLOW),
    # session 6: the deferred dq without a producer (warpgroup 0 refills after the dS barrier)
    pytest.param(128, False, dict(mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True,
                                  mgpu_bwd_producer=False), marks=SLOW),
    pytest.param(128, True, dict(mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False), marks=SLOW),
])
def test_mosaic_gpu_backward_overlap_variant_in_gpu_interpret_mode(d, causal, extra):
    """Opt-in Mosaic backward variants: mgpu_bwd_p_lo (dS^T from the bf16 P^T), mgpu_bwd_rows
    (S, dP with query rows, P and dS through SMEM),
    mgpu_bwd_overlap (S^T and dP^T issued together, dS^T computed while dV runs: the FA3
    order), mgpu_bwd_defer_dq (dq of step t-1 issued with step t, split dS barrier); same
    results as the reference (interpret mode, GQA, ragged length)."""
    q, k, v, do = _inputs(21, 1, 200, 200, 4, 2, d, jnp.bfloat16)
    kw = dict(causal=causal, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


# the D=128 full options of session 5 (rows layout, dS and dV issued early, no producer)
MOSAIC_BWD_ROWS = dict(mgpu_bwd_rows=True, mgpu_bwd_ds_early=True, mgpu_bwd_dv_early=True,
                       mgpu_bwd_producer=False)


# session 7: no automatic barriers, the named dS barrier (both GPU path only) and the swizzled
# dq staging tile (interpret mode too) on top of the D=128 full / causal dispatch options
S7_FLAGS = dict(mgpu_bwd_nab=True, mgpu_bwd_named_sync=True, mgpu_bwd_dq_swizzle=True,
                mgpu_bwd_late_refill=True, mgpu_bwd_fold_scale=True, mgpu_bwd_early_exit=True,
                mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True)


@pytest.mark.parametrize("causal,extra", [
    pytest.param(False, dict(MOSAIC_BWD_ROWS, **S7_FLAGS), marks=SLOW),
    pytest.param(True, dict(mgpu_bwd_p_lo=True, mgpu_bwd_producer=False, **S7_FLAGS),
                 marks=SLOW),
    pytest.param(True, dict(MOSAIC_BWD_ROWS, **S7_FLAGS), marks=SLOW),
    pytest.param(True, dict(mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                            mgpu_bwd_one_loop=True, mgpu_bwd_one_bar=True), marks=SLOW),
    # FA3's order: dq issued before dK, the slot released on its "free" mbarrier
    pytest.param(False, dict(MOSAIC_BWD_ROWS, mgpu_bwd_dq_first=True), marks=SLOW),
    pytest.param(True, dict(MOSAIC_BWD_ROWS, mgpu_bwd_dq_first=True, mgpu_bwd_one_loop=True,
                            mgpu_bwd_one_bar=True), marks=SLOW),
])
def test_mosaic_gpu_backward_session7_flags_in_gpu_interpret_mode(causal, extra):
    """mgpu_bwd_nab / mgpu_bwd_named_sync / mgpu_bwd_dq_swizzle / mgpu_bwd_late_refill /
    mgpu_bwd_fold_scale / mgpu_bwd_early_exit / mgpu_bwd_one_loop keep the results (interpret
    mode: the swizzled dq tile and its reduce path, the refill issued after warpgroup 0's dq
    wgmma, sm_scale folded into lse, one step loop with the mask under lax.cond; GQA, ragged
    length, causal)."""
    q, k, v, do = _inputs(27, 1, 200, 200, 4, 2, 128, jnp.bfloat16)
    kw = dict(causal=causal, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


DEFER_NP = dict(mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False)


@pytest.mark.parametrize("d,causal,window,extra", [
    pytest.param(128, False, None, dict(mgpu_bwd_dk_late=True), marks=SLOW),
    pytest.param(128, True, None, dict(mgpu_bwd_dk_late=True, mgpu_bwd_dv_early=True,
                                       mgpu_bwd_one_loop=True), marks=SLOW),
    pytest.param(64, False, 30, dict(mgpu_bwd_dk_late=True, mgpu_bwd_dv_early=True),
                 marks=SLOW),
    pytest.param(128, False, None, dict(mgpu_bwd_dv_early=True), marks=SLOW),
    pytest.param(128, True, 70, dict(mgpu_bwd_dk_late=True, mgpu_bwd_one_loop=True), marks=SLOW),
    pytest.param(64, True, None, dict(mgpu_bwd_dk_late=True), marks=SLOW),
    pytest.param(128, False, None, dict(mgpu_bwd_wait_other_k=False), marks=SLOW),
])
def test_mosaic_gpu_backward_session8_in_gpu_interpret_mode(d, causal, window, extra):
    """Session 8, rows + the deferred dq without producer: mgpu_bwd_dk_late (dK / dV in
    CTA-long accumulators, not awaited per step; the ring slot refilled on its "free" barrier
    after the next step's dq wait; with mgpu_bwd_dv_early dV is issued before the dP wait),
    and the other warpgroup's K awaited before the first dq (`mgpu_bwd_wait_other_k`, on by
    default; off it still computes the same values in interpret mode, where TMAs complete at
    once); GQA, ragged length, causal / window."""
    q, k, v, do = _inputs(28, 1, 200, 200, 4, 2, d, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", mgpu_bwd_rows=True,
                                           mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                                           **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("causal,window,extra", [
    pytest.param(False, None, dict(mgpu_bwd_defer_dq=True, mgpu_bwd_dq_split=True),
                 marks=SLOW),
    pytest.param(True, 30, dict(mgpu_bwd_defer_dq=True, mgpu_bwd_dq_split=True,
                                mgpu_bwd_one_bar=True), marks=SLOW),
    pytest.param(False, None, dict(mgpu_bwd_defer_dq=True, mgpu_stages_bwd=3), marks=SLOW),
    # one ring mbarrier per slot with the producer warpgroup (Q, dO, [lse; delta]: 3 arrivals)
    pytest.param(True, 30, dict(mgpu_bwd_defer_dq=True, mgpu_bwd_one_bar=True), marks=SLOW),
])
def test_mosaic_gpu_backward_session9_d64_in_gpu_interpret_mode(causal, window, extra):
    """Session 9, head_dim 64: both warpgroups compute dq, 32 columns each, from K tiles with
    a 64-byte swizzle (`mgpu_bwd_dq_split`; the default leaves dq to warpgroup 0), and the
    3-deep Q / dO ring; GQA, ragged length, causal window."""
    q, k, v, do = _inputs(29, 1, 200, 200, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("causal,window,s_first", [
    pytest.param(False, None, (0, 1), marks=SLOW),
    pytest.param(True, 70, (1,), marks=SLOW),
])
def test_mosaic_gpu_backward_session9_s_first_in_gpu_interpret_mode(causal, window, s_first):
    """Session 9, rows + deferred dq + dV early without producer: S_t and dP_t issued before
    dq_{t-1} by the warpgroups in `mgpu_bwd_s_first` (dq sent after P and the dV issue); GQA,
    ragged length, causal window."""
    q, k, v, do = _inputs(30, 1, 200, 200, 4, 2, 128, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", mgpu_bwd_rows=True,
                                           mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                                           mgpu_bwd_dv_early=True, mgpu_bwd_s_first=s_first,
                                           mgpu_bwd_one_loop=causal, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("b,lq,lk,hq,hkv,causal,window,extra", [
    # slow since session 10: the ping-pong backward lost 4-12 % on the H200 (opt-in only)
    pytest.param(1, 200, 200, 4, 2, False, None, {}, marks=SLOW),
    pytest.param(2, 100, 330, 2, 1, True, 40, {}, marks=SLOW),   # tiles without queries
    pytest.param(1, 130, 130, 2, 2, False, None, dict(mgpu_bwd_one_bar=True), marks=SLOW),
])
def test_mosaic_gpu_backward_session9_pingpong_in_gpu_interpret_mode(b, lq, lk, hq, hkv, causal,
                                                                     window, extra):
    """Session 9b, D 128 rows + deferred dq without producer with the two warpgroups half a
    step apart (`mgpu_bwd_pingpong`: one-way dS mbarriers, warpgroup 0's dq two steps late,
    the ring refilled by warpgroup 1); GQA, ragged lengths, a causal window with Lq < Lk, one
    ring mbarrier per slot."""
    q, k, v, do = _inputs(31, b, lq, lk, hq, hkv, 128, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", mgpu_bwd_rows=True,
                                           mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                                           mgpu_bwd_pingpong=True, **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_gpu_backward_pingpong_options_are_checked():
    """mgpu_bwd_pingpong exists only on top of the D 128 full default's option set."""
    from pallas_kernels import attention_mgpu

    base = dict(causal=False, window=None, sm_scale=1.0, lq=128, lk=128, has_segments=False)
    with pytest.raises(ValueError, match="mgpu_bwd_pingpong"):
        attention_mgpu.check_backward_options(attn.FlashConfig(**base, mgpu_bwd_pingpong=True))
    with pytest.raises(ValueError, match="mgpu_bwd_pingpong"):
        attention_mgpu.check_backward_options(attn.FlashConfig(
            **base, mgpu_bwd_pingpong=True, mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True,
            mgpu_bwd_producer=False, mgpu_bwd_dv_early=True))
    attention_mgpu.check_backward_options(attn.FlashConfig(
        **base, mgpu_bwd_pingpong=True, mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True,
        mgpu_bwd_producer=False))


@pytest.mark.parametrize("b,lq,lk,hq,hkv,d,causal,window,extra", [
    pytest.param(1, 200, 200, 4, 2, 128, False, None, dict(MOSAIC_BWD_ROWS),
                 marks=SLOW),   # opt-in: measured slower on the H200 (session 6)
    pytest.param(1, 300, 300, 2, 1, 128, True, None, {}, marks=SLOW),
    pytest.param(2, 100, 330, 2, 1, 128, True, 40, dict(MOSAIC_BWD_ROWS), marks=SLOW),
    pytest.param(1, 100, 330, 4, 2, 64, True, 20, DEFER_NP, marks=SLOW),
    pytest.param(1, 200, 200, 4, 2, 128, False, None, dict(DEFER_NP, mgpu_bwd_rows=True),
                 marks=SLOW),
])
def test_mosaic_gpu_backward_persistent_in_gpu_interpret_mode(b, lq, lk, hq, hkv, d, causal,
                                                              window, extra):
    """mgpu_bwd_persistent (session 6): 3 persistent CTAs (interpret mode) walk the KV tiles;
    the Q/dO ring runs on from one tile to the next (a CTA with 2+ tiles prefetches), tiles
    without visible queries (window, lq < lk) write zeros; also with the deferred dq."""
    q, k, v, do = _inputs(23, b, lq, lk, hq, hkv, d, jnp.bfloat16)
    kw = dict(causal=causal, window=window)
    opts = extra or dict(mgpu_bwd_p_lo=True, mgpu_bwd_producer=False)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", mgpu_bwd_persistent=-1,
                                           **opts, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_gpu_forward_and_backward_together_in_gpu_interpret_mode():
    q, k, v, do = _inputs(19, 1, 260, 200, 2, 1, 128, jnp.bfloat16)
    kw = dict(causal=True, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           bwd_impl="mosaic", **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.slow   # every default forward path folds the scale (the default-tiles tests)
def test_mosaic_gpu_forward_with_scale_folded_into_exp2():
    """mgpu_fold_scale: row max on raw scores, scale applied inside exp2's argument (causal
    masking on raw scores, GQA, ragged length, Mosaic GPU interpret mode); with
    mgpu_tiles_fastest (grid order) for the Mosaic forward and backward, and the optimization
    barrier before the ping-pong arrive (mgpu_fwd_opt_barrier)."""
    q, k, v, do = _inputs(22, 1, 200, 200, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=True, window=50)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           mgpu_fold_scale=True, mgpu_tiles_fastest=True,
                                           mgpu_fwd_opt_barrier=True, bwd_impl="mosaic",
                                           block_k=64, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("causal,short", [(False, True), (False, False), (True, True),
                                          (True, False)])
def test_mosaic_gpu_forward_default_tiles_head_dim_64(causal, short, monkeypatch):
    """The Hopper defaults at D=64, Mosaic GPU interpret mode, ragged length. Full attention:
    up to 4k queries (MOSAIC_FWD_SHORT, session 8) two 64-row warpgroups on tokamax's structure
    (persistent CTAs, FA3's ping-pong; its GPU-only parts fall back in interpret mode); longer
    (`short=False`: the table's entries removed) 3 consumer warpgroups of 64 rows x 128 keys
    without ping-pong. Causal: 64 x 128, FA3's named-barrier ping-pong (two mbarriers in
    interpret mode), reversed tiles; up to 1k queries on persistent CTAs over snake
    rounds (3 CTAs in interpret mode)."""
    if not short:
        monkeypatch.setitem(attn.MOSAIC_FWD_SHORT, (64, causal), ())
    q, k, v, do = _inputs(20, 1, 300, 300, 2, 1, 64, jnp.bfloat16)
    kw = dict(causal=causal, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic", **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.slow
def test_mosaic_gpu_forward_head_dim_64_full_up_to_4k_entry(monkeypatch):
    """MOSAIC_FWD_SHORT's last D=64 full entry (up to 4k queries: two warpgroups on tokamax's
    structure, sessions 7-8; the default test at 300 queries runs it too), applied to 300
    queries by dropping any entry before it."""
    monkeypatch.setitem(attn.MOSAIC_FWD_SHORT, (64, False), attn.MOSAIC_FWD_SHORT[64, False][-1:])
    q, k, v, do = _inputs(30, 1, 300, 300, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=False, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic", **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_gpu_forward_default_tiles_head_dim_128_full():
    """The Hopper default at D=128 full attention since session 7 (tokamax's structure:
    persistent CTAs, FA3's ping-pong, the early K wait, the split optimization barriers, the read
    wait; the GPU-only one-warp producer, named slot release and tile end fall back in interpret
    mode), GQA, ragged length, Lq != Lk, Mosaic GPU interpret mode."""
    q, k, v, do = _inputs(29, 2, 200, 330, 4, 2, 128, jnp.bfloat16)
    kw = dict(causal=False, window=None)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic", **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("causal,window,stages,ping_pong", [
    pytest.param(False, None, 2, True, marks=SLOW),  # opt-in: default once measured faster
    pytest.param(True, None, 3, True, marks=SLOW),
    pytest.param(True, 40, 2, True, marks=SLOW),
    pytest.param(True, None, 2, False, marks=SLOW),
])
def test_mosaic_gpu_forward_three_consumer_warpgroups(causal, window, stages, ping_pong):
    """mgpu_fwd_wgs=3: 3 x 64-row consumer warpgroups per CTA with a staggered ping-pong over
    a 3-arrival schedule barrier (FA3's D=64 tile), GQA, ragged length, interpret mode."""
    q, k, v, do = _inputs(23, 1, 300, 300, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           block_q=64, block_k=128, mgpu_stages=stages,
                                           mgpu_fwd_wgs=3, mgpu_fwd_regs=(160, 24),
                                           mgpu_ping_pong=ping_pong, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("lq,lk,d,causal,window,extra", [
    pytest.param(257, 257, 64, True, 16, dict(block_q=64, block_k=64), marks=SLOW),
    pytest.param(200, 330, 128, True, None, dict(mgpu_ping_pong=False), marks=SLOW),
    pytest.param(300, 300, 64, False, None, dict(block_q=64, mgpu_stages=3, mgpu_fwd_wgs=2,
                                                 mgpu_fwd_regs=(232, 40), mgpu_ping_pong=True),
                 marks=SLOW),
])
def test_mosaic_gpu_forward_intra_warpgroup_overlap(lq, lk, d, causal, window, extra):
    """mgpu_fwd_overlap: S_j issued with P_{j-1} V_{j-1} (softmax of S_j while P V runs), the
    token-passing ping-pong, K released a step before V; padded rows with no visible key
    (window 16 at length 257), Lq != Lk, no ping-pong, a 3-deep ring; interpret mode."""
    q, k, v, do = _inputs(24, 1, lq, lk, 4, 1, d, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           mgpu_fwd_overlap=True, **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_f32_inputs_get_tiles_that_fit_shared_memory(monkeypatch):
    """f32 at D=128: the Triton forward uses 64-key blocks and 2 stages (the bf16 tiles, 128 keys
    and 3 stages, exceeded the H200's shared memory in session 4)."""
    seen = []
    monkeypatch.setattr(attn, "_flash", lambda q, k, v, seg, cfg: (seen.append(cfg), q)[1])
    for dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.ones((1, 777, 4, 128), dtype)
        attn.flash_attention_kernel(q, q, q, causal=True, fwd_impl="triton")
    f32, bf16 = seen
    assert (f32.block_k, f32.num_stages) == (64, 2)
    assert (bf16.block_k, bf16.num_stages) == (128, 3)


# (the default-tile D 64 causal test runs the reversed order too)
@pytest.mark.parametrize("lq,lk,window", [pytest.param(300, 300, None, marks=SLOW),
                                          pytest.param(200, 330, 40, marks=SLOW)])
def test_mosaic_gpu_forward_reversed_tile_order(lq, lk, window):
    """mgpu_fwd_reverse: CTA t computes query tile n_tiles - 1 - t (causal: the longest tiles
    start first); every tile is still written once (ragged lengths, Lq != Lk, GQA, window),
    interpret mode. (`mgpu_fwd_nab` changes only the GPU compile: ignored here.)"""
    q, k, v, do = _inputs(25, 1, lq, lk, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=True, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           block_q=64, block_k=64, mgpu_fwd_reverse=True,
                                           mgpu_fwd_nab=True, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("b,lq,lk,causal,window,extra", [
    # (the default-tile D 64 full test runs persistent CTAs with skip_pad at length 300)
    pytest.param(2, 300, 300, False, None, dict(block_q=64, block_k=64), marks=SLOW),
    # query tiles fastest over the CTAs (tokamax's order), GQA, two batches
    pytest.param(2, 300, 300, False, None, dict(block_q=64, block_k=64, mgpu_tiles_fastest=True),
                 marks=SLOW),
    (1, 200, 330, True, 40, dict(block_q=64, block_k=64, mgpu_fwd_reverse=True)),
    # snake rounds (query tiles slowest, alternating CTA order): 2 x 4 heads x 4 tiles = 32
    # tiles over 3 CTAs, the last round partial
    pytest.param(2, 500, 500, True, None, dict(block_q=64, block_k=64, mgpu_fwd_reverse=True,
                                               mgpu_fwd_snake=True), marks=SLOW),
    pytest.param(1, 300, 300, False, None, dict(block_q=64, block_k=128, mgpu_stages=3,
                                                mgpu_fwd_wgs=3, mgpu_fwd_regs=(160, 24),
                                                mgpu_ping_pong=False), marks=SLOW),
    # the next K awaited during P V; causal window: visits inside each warpgroup's own range
    pytest.param(1, 330, 330, True, 40, dict(block_q=64, block_k=64,
                                             mgpu_fwd_early_kwait=True), marks=SLOW),
    # two Q buffers (the next Q loaded after the first step; warpgroups with no visited step
    # prefetch after their skips): causal window, and all-padding warpgroups with skip_pad
    pytest.param(1, 330, 330, True, 40, dict(block_q=64, block_k=64, mgpu_fwd_q2=True),
                 marks=SLOW),
    pytest.param(1, 200, 200, False, None, dict(block_q=64, block_k=64, mgpu_fwd_wgs=3,
                                                mgpu_fwd_regs=(160, 24), mgpu_ping_pong=False,
                                                mgpu_fwd_skip_pad=True, mgpu_fwd_q2=True),
                 marks=SLOW),
    # 200 rows in 192-row CTAs: the second tile's warpgroups 1 and 2 are all padding
    pytest.param(1, 200, 200, False, None, dict(block_q=64, block_k=64, mgpu_fwd_wgs=3,
                                                mgpu_fwd_regs=(160, 24), mgpu_ping_pong=False,
                                                mgpu_fwd_skip_pad=True), marks=SLOW),
])
def test_mosaic_gpu_forward_persistent_ctas(b, lq, lk, causal, window, extra):
    """mgpu_fwd_persistent=-1 (3 CTAs in interpret mode, one per SM on the GPU) walk all
    (batch, head, query tile) tiles (more tiles than CTAs, uneven counts per CTA), one K/V
    ring across tiles, the next Q prefetched during the epilogue, O through its own buffer;
    ragged lengths, Lq != Lk, GQA; interpret mode."""
    q, k, v, do = _inputs(26, b, lq, lk, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           mgpu_fwd_persistent=-1, **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("lq,lk,causal,window,extra", [
    pytest.param(300, 300, True, 40, dict(block_q=64, block_k=64), marks=SLOW),
    pytest.param(200, 330, False, None, dict(block_q=64, block_k=128, mgpu_fwd_persistent=3),
                 marks=SLOW),
])
def test_mosaic_gpu_forward_fa3_schedule(lq, lk, causal, window, extra):
    """mgpu_fwd_fa3_sched: FA3's ping-pong on one barrier per consumer (interpret mode: two
    2-arrival mbarriers standing in for the GPU's named barriers), with the skipped steps of
    a causal window (each consumer's own range inside the CTA's), persistent CTAs."""
    q, k, v, do = _inputs(27, 1, lq, lk, 4, 2, 128, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic",
                                           mgpu_fwd_fa3_sched=True, **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


@pytest.mark.parametrize("causal,extra", [
    (False, dict(mgpu_fwd_persistent=-1)),                  # persistent: the CTAs' tile lists
    (True, dict(mgpu_fwd_reverse=True)),                    # one CTA per tile: the grid order
])
def test_mosaic_gpu_forward_only_tile_order(causal, extra):
    """mgpu_fwd_tiles_fastest (session 8): the forward takes its query tiles fastest, then heads
    (tokamax's order; persistent CTAs or the CUDA grid), every tile written once (ragged length,
    GQA, two batches, more tiles than the 3 interpret-mode CTAs); forward only, interpret mode."""
    q, k, v, _ = _inputs(31, 2, 300, 300, 4, 2, 64, jnp.bfloat16)
    o = attn.flash_attention_kernel(q, k, v, causal=causal, interpret=True, fwd_impl="mosaic",
                                    block_q=64, block_k=64, mgpu_fwd_tiles_fastest=True, **extra)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert _rel_err(o, attn.attention_reference(*f32, causal=causal)) < 2e-2


def test_mosaic_forward_tile_order_leaves_the_backward_grid(monkeypatch):
    """mgpu_fwd_tiles_fastest reorders the forward's grid only (the shared mgpu_tiles_fastest
    also reorders the backward's, measured 1-21 % slower there): traced, no kernel run."""
    from pallas_kernels import attention_mgpu
    grids, grid = [], attention_mgpu._grid
    monkeypatch.setattr(attention_mgpu, "_grid",
                        lambda *a, **kw: grids.append(grid(*a, **kw)) or grids[-1])
    q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)

    def loss(q):
        return attn.flash_attention_kernel(q, q, q, causal=True, interpret=True,
                                           fwd_impl="mosaic", bwd_impl="mosaic",
                                           mgpu_fwd_persistent=0, mgpu_fwd_snake=False,
                                           mgpu_fwd_tiles_fastest=True).sum()
    jax.make_jaxpr(jax.grad(loss))(q)
    assert [g["grid_names"][0] for g in grids] == ["q_tile", "heads"]


@pytest.mark.parametrize("lq,window", [(200, 40), pytest.param(330, None, marks=SLOW)])
def test_mosaic_backward_short_causal_default(lq, window):
    """The D=128 causal backward options (session 8, MOSAIC_BWD_OPTS: query rows, dS / dV issued
    early, one step loop, one ring mbarrier) with a causal window and MQA, ragged length; Mosaic
    GPU interpret mode (the Triton forward)."""
    assert attn.mosaic_bwd_options(128, True, 2048)["mgpu_bwd_one_loop"]
    q, k, v, do = _inputs(41, 1, lq, lq, 4, 1, 128, jnp.bfloat16)
    kw = dict(causal=True, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic",
                                           **attn.mosaic_bwd_options(128, True, lq), **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_forward_short_query_options(monkeypatch):
    """MOSAIC_FWD_SHORT: the first (max_lq, options) entry with lq <= max_lq is applied on top of
    MOSAIC_FWD_BLOCKS for the Mosaic forward; longer queries keep the cell's options."""
    seen = []
    monkeypatch.setattr(attn, "_flash", lambda q, k, v, seg, cfg: (seen.append(cfg), q)[1])
    monkeypatch.setitem(attn.MOSAIC_FWD_SHORT, (64, False),
                        ((1024, dict(mgpu_fwd_wgs=2, mgpu_fwd_regs=(232, 40))),
                         (2048, dict(mgpu_fwd_wgs=3, mgpu_stages=3))))
    for n in (1000, 2048, 4096):
        q = jnp.ones((1, n, 2, 64), jnp.bfloat16)
        attn.flash_attention_kernel(q, q, q, fwd_impl="mosaic", bwd_impl="split")
    short, mid, long = seen
    assert (short.mgpu_fwd_wgs, short.mgpu_fwd_regs) == (2, (232, 40))
    assert (mid.mgpu_fwd_wgs, mid.mgpu_stages) == (3, 3)
    base = attn.MOSAIC_FWD_BLOCKS[64, False]
    assert (long.mgpu_fwd_wgs, long.mgpu_stages) == (base["mgpu_fwd_wgs"], base["mgpu_stages"])


@pytest.mark.parametrize("d,lq,causal,window,extra", [
    # D 64 full: two 64-row ping-pong warpgroups, FA3's barriers, persistent CTAs (tokamax's
    # structure), the next K awaited during P V, named "slot consumed" barriers
    pytest.param(64, 300, False, None, dict(block_q=64, block_k=128, mgpu_fwd_wgs=2,
                                            mgpu_fwd_regs=(232, 40), mgpu_ping_pong=True,
                                            mgpu_fold_scale=True, mgpu_fwd_persistent=-1,
                                            mgpu_fwd_fa3_sched=True, mgpu_fwd_early_kwait=True,
                                            mgpu_fwd_named_free=True), marks=SLOW),
    pytest.param(128, 330, True, 100, dict(block_q=64, block_k=64, mgpu_fwd_reverse=True,
                                           mgpu_fwd_fa3_sched=True, mgpu_fwd_early_kwait=True,
                                           mgpu_fwd_named_free=True), marks=SLOW),
    # session 7: tokamax's structure in full (persistent, FA3's barriers, early K wait, one
    # producer warp, named slot release, its optimization barriers and tile end, the last
    # stores awaited until read), and three warpgroups without automatic barriers,
    # all-padding warpgroups skipped, the split barriers, the read-only wait
    pytest.param(128, 330, False, None, dict(block_q=64, block_k=64, mgpu_fwd_persistent=-1,
                                             mgpu_fwd_nab=True, mgpu_fwd_fa3_sched=True,
                                             mgpu_fwd_early_kwait=True,
                                             mgpu_fwd_warp_producer=True,
                                             mgpu_fwd_named_free=True, mgpu_fwd_ob_split=True,
                                             mgpu_fwd_lean_end=True, mgpu_fwd_read_wait=True),
                 marks=SLOW),
    pytest.param(64, 300, False, None, dict(block_q=64, block_k=64, mgpu_fwd_wgs=3,
                                            mgpu_fwd_regs=(160, 24), mgpu_ping_pong=False,
                                            mgpu_fwd_nab=True, mgpu_fwd_skip_pad=True,
                                            mgpu_fwd_ob_split=True, mgpu_fwd_read_wait=True),
                 marks=SLOW),
])
def test_mosaic_gpu_forward_fa3_early_k_wait_named_free(d, lq, causal, window, extra):
    """Session-6 forward candidates together: FA3's schedule, the early K wait and
    `mgpu_fwd_named_free` (interpret mode has no named barriers: the consumed signals stay
    mbarriers there, so this covers the schedule and the options' plumbing), GQA, ragged."""
    q, k, v, do = _inputs(28, 2, lq, lq, 4, 2, d, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="mosaic", **extra,
                                           **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_forward_named_free_needs_at_most_three_stages():
    q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="mgpu_fwd_named_free"):
        attn.flash_attention_kernel(q, q, q, interpret=True, fwd_impl="mosaic", mgpu_stages=4,
                                    mgpu_fwd_named_free=True)


@pytest.mark.parametrize("b,lq,lk,hq,hkv,causal,window,extra", [
    pytest.param(1, 200, 200, 4, 2, False, None, dict(mgpu_bwd_one_bar=True), marks=SLOW),
    pytest.param(2, 100, 330, 2, 1, True, 40, dict(mgpu_bwd_fold_scale=True,
                                                   mgpu_bwd_one_loop=True), marks=SLOW),
    # session 12 call 3: the causal candidates (n12_dqmid_ol: one step loop, one ring
    # mbarrier; n12_dqmid: the masked / unmasked loops), MQA, ragged
    pytest.param(1, 200, 200, 4, 1, True, None, dict(mgpu_bwd_one_bar=True,
                                                     mgpu_bwd_one_loop=True), marks=SLOW),
    pytest.param(1, 256, 256, 2, 1, True, None, dict(mgpu_bwd_one_bar=True), marks=SLOW),
])
def test_mosaic_gpu_backward_session12_dq_mid_in_gpu_interpret_mode(b, lq, lk, hq, hkv, causal,
                                                                    window, extra):
    """Session 12, rows + deferred dq + dV early without producer: dq_{t-1} issued after dS_t,
    before dK_t (`mgpu_bwd_dq_mid`: no dq accumulator live with S, dP, P); GQA, ragged
    lengths, a causal window with Lq < Lk (tiles without queries), one ring mbarrier, the
    folded scale."""
    q, k, v, do = _inputs(32, b, lq, lk, hq, hkv, 128, jnp.bfloat16)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v):
        return attn.flash_attention_kernel(q, k, v, interpret=True, fwd_impl="triton",
                                           bwd_impl="mosaic", mgpu_bwd_rows=True,
                                           mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                                           mgpu_bwd_dv_early=True, mgpu_bwd_dq_mid=True,
                                           **extra, **kw)

    _check_fwd_bwd(fn, q, k, v, do, kw, 2e-2)


def test_mosaic_backward_dq_mid_needs_the_deferred_dv_early_step():
    from pallas_kernels import attention_mgpu

    base = dict(causal=False, window=None, sm_scale=1.0, lq=128, lk=128, has_segments=False,
                mgpu_bwd_rows=True, mgpu_bwd_defer_dq=True, mgpu_bwd_producer=False,
                mgpu_bwd_dq_mid=True)
    with pytest.raises(ValueError, match="mgpu_bwd_dq_mid"):
        attention_mgpu.check_backward_options(attn.FlashConfig(**base))   # no dV early
    with pytest.raises(ValueError, match="mgpu_bwd_dq_mid"):
        attention_mgpu.check_backward_options(attn.FlashConfig(
            **base, mgpu_bwd_dv_early=True, mgpu_bwd_s_first=(1,)))
    attention_mgpu.check_backward_options(attn.FlashConfig(**base, mgpu_bwd_dv_early=True))

"""PoNet pooling kernels against their jnp references (Pallas interpret mode, CPU).

Inputs are rounded to a few values so that ties are everywhere: the max pools must give the
gradient to the earliest maximum, as the references do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pooling as pool

SMALL = pool.PoolBlocks(block_l=8, block_d=16, group=2)   # many tiles, segments and programs


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _tied(seed, shape, dtype):
    """Random values on a grid of step 0.5: many exact ties."""
    return (jnp.round(jax.random.normal(jax.random.key(seed), shape) * 2) / 2).astype(dtype)


def _check(fn, ref_fn, args, seed, tol):
    """Forward and every gradient of fn against ref_fn, both under jit."""
    def fwd_bwd(f):
        def run(*a):
            y, vjp = jax.vjp(f, *a)
            dy = jax.random.normal(jax.random.key(seed), y.shape, jnp.float32).astype(y.dtype)
            return y, vjp(dy)
        return jax.jit(run)(*args)

    (y, grads), (y_ref, grads_ref) = fwd_bwd(fn), fwd_bwd(ref_fn)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _rel_err(y, y_ref) < tol
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, i
        assert _rel_err(g, g_ref) < tol, i


def _tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 1e-2


SLOW = pytest.mark.slow
SEGMENT_CASES = [  # length, channels, segment_size, causal, dtype
    (37, 40, 5, False, jnp.float32),
    pytest.param(37, 40, 16, False, jnp.bfloat16, marks=SLOW),
    (50, 24, 20, False, jnp.float32),      # segment longer than a tile: chunked reduce
    pytest.param(37, 40, 1, False, jnp.float32, marks=SLOW),
    pytest.param(37, 40, 5, True, jnp.float32, marks=SLOW),
    (45, 24, 16, True, jnp.bfloat16),
    pytest.param(30, 16, 64, True, jnp.float32, marks=SLOW),   # one segment longer than L
]


@pytest.mark.parametrize("length,channels,size,causal,dtype", SEGMENT_CASES)
def test_segment_max_matches_reference_with_ties(length, channels, size, causal, dtype):
    x = _tied(length + size, (2, length, channels), dtype)
    _check(lambda x: pool.segment_max(x, size, causal=causal, backend="interpret", blocks=SMALL),
           lambda x: pool.segment_max_reference(x, size, causal=causal), (x,), size, _tol(dtype))


LOCAL_CASES = [  # length, channels, window, causal, dtype
    (37, 40, 3, False, jnp.float32),
    pytest.param(29, 24, 5, False, jnp.bfloat16, marks=SLOW),
    pytest.param(37, 40, 1, False, jnp.float32, marks=SLOW),
    pytest.param(37, 40, 3, True, jnp.float32, marks=SLOW),
    (29, 24, 4, True, jnp.bfloat16),
]


@pytest.mark.parametrize("length,channels,window,causal,dtype", LOCAL_CASES)
def test_local_max_matches_reference_with_ties(length, channels, window, causal, dtype):
    x = _tied(length + window, (2, length, channels), dtype)
    _check(lambda x: pool.local_max(x, window, causal=causal, backend="interpret", blocks=SMALL),
           lambda x: pool.local_max_reference(x, window, causal=causal), (x,), window,
           _tol(dtype))


@pytest.mark.parametrize("length,chunks,dot,dtype", [
    (37, 2, False, jnp.float32), pytest.param(70, 4, False, jnp.bfloat16, marks=SLOW),
    pytest.param(37, 1, False, jnp.float32, marks=SLOW), (70, 1, True, jnp.bfloat16),
    pytest.param(90, 4, True, jnp.bfloat16, marks=SLOW),
    pytest.param(37, 2, True, jnp.float32, marks=SLOW)])     # dot ignored for float32
def test_prefix_mean_matches_reference(length, chunks, dot, dtype):
    """chunks > 1: chunk sums first, then the chunks in parallel; 1: one walk over L. dot: the
    in-tile prefix sums as triangular-matrix products (tiles of 16 rows, the least a dot
    takes)."""
    x = jax.random.normal(jax.random.key(length), (2, length, 40), dtype)
    blocks = pool.PoolBlocks(block_l=16 if dot else 8, block_d=16, group=chunks, dot=dot)
    _check(lambda x: pool.prefix_mean(x, backend="interpret", blocks=blocks),
           pool.prefix_mean_reference, (x,), 1, _tol(dtype))


POOL_FUSE_CASES = [  # causal, g has a length axis, segment_size, window, dtype
    (False, False, 5, 3, jnp.float32),
    pytest.param(False, True, 8, 5, jnp.bfloat16, marks=SLOW),
    pytest.param(True, False, 6, 4, jnp.float32, marks=SLOW),
    (True, True, 5, 3, jnp.bfloat16),
    pytest.param(False, False, 16, 3, jnp.float32, marks=SLOW),   # S > block_l: three kernels
]


@pytest.mark.parametrize("causal,g_full,size,window,dtype", POOL_FUSE_CASES)
def test_ponet_pool_fuse_matches_reference(causal, g_full, size, window, dtype):
    b, length, d = 2, 37, 40
    keys = jax.random.split(jax.random.key(size + window), 4)
    g = jax.random.normal(keys[0], (b, length if g_full else 1, d), dtype)
    s, o, l = (_tied(i, (b, length, d), dtype) for i in range(3))
    _check(lambda *a: pool.ponet_pool_fuse(*a, size, window, causal=causal, backend="interpret",
                                           blocks=SMALL),
           lambda *a: pool.ponet_pool_fuse_reference(*a, size, window, causal=causal),
           (g, s, o, l), 3, _tol(dtype))


@pytest.mark.parametrize("g_len,dtype", [(1, jnp.float32),
                                         pytest.param(None, jnp.float32, marks=SLOW),
                                         pytest.param(1, jnp.bfloat16, marks=SLOW)])
def test_ponet_fuse_matches_reference(g_len, dtype):
    b, length, d = 2, 37, 40
    keys = jax.random.split(jax.random.key(3), 4)
    g = jax.random.normal(keys[0], (b, g_len or length, d), dtype)
    s, o, l = (jax.random.normal(k, (b, length, d), dtype) for k in keys[1:])
    _check(lambda *a: pool.ponet_fuse(*a, backend="interpret", blocks=SMALL),
           pool.ponet_fuse_reference, (g, s, o, l), 2, _tol(dtype))


@pytest.mark.parametrize("length,heads,head_dim,dtype", [
    (37, 3, 24, jnp.float32),
    pytest.param(50, 4, 16, jnp.bfloat16, marks=pytest.mark.slow)])
def test_global_aggregate_matches_reference(length, heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(length), 3)
    q, k, v = (jax.random.normal(key, (2, length, heads, head_dim), dtype) for key in keys)
    blocks = pool.PoolBlocks(block_l=8, block_d=32)        # chunks of the length, head blocks
    _check(lambda *a: pool.global_aggregate(*a, backend="interpret", blocks=blocks),
           pool.global_aggregate_reference, (q, k, v), 4, 2e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.slow
def test_default_blocks_match_reference():
    """The tile sizes the GPU runs with (one tile spans the whole toy problem)."""
    x = _tied(0, (2, 70, 48), jnp.float32)
    for fn, ref in [(lambda x: pool.segment_max(x, 8, backend="interpret"),
                     lambda x: pool.segment_max_reference(x, 8)),
                    (lambda x: pool.segment_max(x, 8, causal=True, backend="interpret"),
                     lambda x: pool.segment_max_reference(x, 8, causal=True)),
                    (lambda x: pool.local_max(x, 3, backend="interpret"),
                     lambda x: pool.local_max_reference(x, 3)),
                    (lambda x: pool.prefix_mean(x, backend="interpret"),
                     pool.prefix_mean_reference)]:
        _check(fn, ref, (x,), 5, 1e-5)


def test_max_gradients_go_to_the_earliest_tie():
    """All-equal input: each output's gradient lands on the first position it sees."""
    x = jnp.ones((1, 12, 16), jnp.float32)
    dx = jax.grad(lambda x: pool.segment_max(x, 4, backend="interpret", blocks=SMALL).sum())(x)
    np.testing.assert_array_equal(dx[0, :, 0], [4, 0, 0, 0] * 3)
    dx = jax.grad(lambda x: pool.segment_max(x, 4, causal=True, backend="interpret",
                                             blocks=SMALL).sum())(x)
    np.testing.assert_array_equal(dx[0, :, 0], [4, 0, 0, 0] * 3)
    dx = jax.grad(lambda x: pool.local_max(x, 3, backend="interpret", blocks=SMALL).sum())(x)
    np.testing.assert_array_equal(dx[0, :, 0], [2, 1] + [1] * 9 + [0])   # window [t-1, t+1]
    dx = jax.grad(lambda x: pool.local_max(x, 3, causal=True, backend="interpret",
                                           blocks=SMALL).sum())(x)
    np.testing.assert_array_equal(dx[0, :, 0], [3] + [1] * 9 + [0, 0])   # window [t-2, t]


@pytest.mark.parametrize("op", ["segment", "local", "mean"])
def test_causal_ops_ignore_the_future(op):
    fn = {"segment": lambda x: pool.segment_max(x, 6, causal=True, backend="interpret",
                                                blocks=SMALL),
          "local": lambda x: pool.local_max(x, 4, causal=True, backend="interpret", blocks=SMALL),
          "mean": lambda x: pool.prefix_mean(x, backend="interpret", blocks=SMALL)}[op]
    x = jax.random.normal(jax.random.key(7), (1, 30, 16))
    t = 17
    y0 = fn(x)
    y1 = fn(x.at[:, t].add(10.0))
    np.testing.assert_array_equal(y0[:, :t], y1[:, :t])
    assert not np.allclose(y0[:, t], y1[:, t])


def test_ponet_fuse_accepts_one_decoding_step():
    keys = jax.random.split(jax.random.key(9), 4)
    g, s, o, l = (jax.random.normal(k, (3, 24)) for k in keys)
    y = pool.ponet_fuse(g, s, o, l, backend="interpret")
    np.testing.assert_allclose(y, (g + s) * o + l, rtol=1e-6)


def test_bad_arguments_raise():
    x = jnp.ones((2, 8, 4))
    with pytest.raises(ValueError, match="window"):
        pool.local_max(x, 4, backend="interpret")
    with pytest.raises(ValueError, match="segment_size"):
        pool.segment_max(x, 0, backend="interpret")
    with pytest.raises(ValueError, match="x must have shape"):
        pool.prefix_mean(x[0], backend="interpret")
    with pytest.raises(ValueError, match="g must have shape"):
        pool.ponet_fuse(jnp.ones((2, 3, 4)), x, x, x, backend="interpret")
    with pytest.raises(ValueError, match="power of two"):
        pool.prefix_mean(x, backend="interpret", blocks=pool.PoolBlocks(block_d=24))


TPU_CASES = [  # op, length, causal, dtype
    pytest.param("segment", 37, False, jnp.float32, marks=SLOW),
    ("segment", 45, True, jnp.bfloat16),
    pytest.param("local", 37, False, jnp.bfloat16, marks=SLOW),
    ("local", 29, True, jnp.float32),
    ("mean", 37, True, jnp.float32), ("fuse", 37, False, jnp.bfloat16),
    pytest.param("aggregate", 37, False, jnp.float32, marks=SLOW),
]


@pytest.mark.parametrize("op,length,causal,dtype", TPU_CASES)
def test_tpu_variants_match_reference_in_tpu_interpret_mode(op, length, causal, dtype):
    b, d = 2, 40
    x = _tied(length, (b, length, d), dtype)
    if op == "segment":
        args, fn, ref = (x,), lambda x: pool.segment_max(
            x, 5, causal=causal, backend="tpu_interpret"), lambda x: pool.segment_max_reference(
            x, 5, causal=causal)
    elif op == "local":
        w = 4 if causal else 3
        args, fn, ref = (x,), lambda x: pool.local_max(
            x, w, causal=causal, backend="tpu_interpret"), lambda x: pool.local_max_reference(
            x, w, causal=causal)
    elif op == "mean":
        args = (jax.random.normal(jax.random.key(1), (b, length, d), dtype),)
        fn, ref = lambda x: pool.prefix_mean(x, backend="tpu_interpret"), pool.prefix_mean_reference
    elif op == "fuse":
        keys = jax.random.split(jax.random.key(2), 4)
        args = (jax.random.normal(keys[0], (b, 1, d), dtype),
                *(jax.random.normal(k, (b, length, d), dtype) for k in keys[1:]))
        fn, ref = lambda *a: pool.ponet_fuse(*a, backend="tpu_interpret"), pool.ponet_fuse_reference
    else:
        keys = jax.random.split(jax.random.key(3), 3)
        args = tuple(jax.random.normal(k, (b, length, 4, 16), dtype) for k in keys)
        fn, ref = (lambda *a: pool.global_aggregate(*a, backend="tpu_interpret"),
                   pool.global_aggregate_reference)
    _check(fn, ref, args, 6, 2e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("causal,fused", [(True, True), pytest.param(False, True, marks=SLOW),
                                          (False, False), pytest.param(True, False, marks=SLOW)])
def test_pooling_mixer_interpret_equals_reference(causal, fused):
    """The PoolingMixer on the kernels (impl: interpret) computes what it computes on the
    references: output and gradients with respect to the input and every parameter, with the
    fused pooling kernel (the default) and with the three separate kernels."""
    from flax import nnx

    from mixers import build_mixer

    spec = {"type": "pooling", "n_heads": 2, "segment_size": 5, "local_window": 3,
            "causal": causal, "fused_pool": fused}
    x = jax.random.normal(jax.random.key(0), (2, 37, 32))
    results = []
    for impl in ("interpret", "reference"):
        mixer = build_mixer({**spec, "impl": impl}, d_model=32, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(mixer)

        def loss(state, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

        y = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))(state, x)
        results.append((y, jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)))
    (y, grads), (y_ref, grads_ref) = results
    assert _rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert _rel_err(g, g_ref) < 1e-4

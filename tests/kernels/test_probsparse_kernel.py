"""ProbSparse's sparsity-measure kernel against its jnp reference (Pallas interpret mode, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.probsparse import (
    active_rows_attention,
    active_rows_reference,
    sparsity_measure,
    sparsity_reference,
    top_u,
    top_u_reference,
)

measure = jax.jit(sparsity_measure, static_argnames=("causal_samples", "backend", "block_q",
                                                   "unroll", "blocks"))


def _qk(keys, b=2, lq=40, lk=40, h=3, d=16, dtype=jnp.float32):
    kq, kk = keys(2)
    return (jax.random.normal(kq, (b, lq, h, d), dtype),
            jax.random.normal(kk, (b, lk, h, d), dtype))


@pytest.mark.parametrize("lq,lk,d,per_query,causal", [
    (40, 40, 16, False, False),       # 40 = 2.5 blocks of 16: masked tail rows
    (40, 40, 16, False, True),        # keys idx_s <= i only; rows without a valid key get 0
    (40, 40, 16, True, False),        # row gathers, one sample per query
    (24, 70, 24, False, False),       # cross lengths, head_dim padded to 32
    (70, 24, 24, True, False),
])
def test_measure_matches_reference(keys, lq, lk, d, per_query, causal):
    q, k = _qk(keys, lq=lq, lk=lk, d=d)
    shape = (lq, 9) if per_query else (9,)
    idx = jax.random.randint(jax.random.PRNGKey(4), shape, 3 if causal else 0, lk)
    got = measure(q, k, idx, causal_samples=causal, backend="interpret", block_q=16)
    ref = sparsity_reference(q, k, idx, causal_samples=causal)
    assert got.shape == (2, 3, lq) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    if causal:                                    # queries 0..2 see no sampled key (all >= 3)
        assert np.all(np.asarray(got)[..., :3] == 0) and np.all(np.asarray(got)[..., 3:] != 0)


def test_measure_bf16_is_accumulated_in_f32(keys):
    q, k = _qk(keys, lq=64, lk=64, d=64, dtype=jnp.bfloat16)
    idx = jax.random.randint(jax.random.PRNGKey(1), (64, 25), 0, 64)
    got = measure(q, k, idx, backend="interpret")
    exact = sparsity_reference(q.astype(jnp.float32), k.astype(jnp.float32), idx)
    np.testing.assert_allclose(got, exact, atol=1e-4, rtol=1e-4)


def test_measure_takes_no_gradient(keys):
    q, k = _qk(keys)
    idx = jnp.arange(9)
    g = jax.grad(lambda q: sparsity_measure(q, k, idx, backend="interpret").sum())(q)
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("idx_shape,match", [((5, 9), r"idx must have shape"),
                                             ((2, 3, 4), r"idx must have shape")])
def test_bad_idx_shape_names_it(keys, idx_shape, match):
    q, k = _qk(keys)
    with pytest.raises(ValueError, match=match):
        sparsity_measure(q, k, jnp.zeros(idx_shape, jnp.int32), backend="interpret")


def test_bad_k_shape_names_it(keys):
    q, k = _qk(keys)
    with pytest.raises(ValueError, match=r"k must have shape"):
        sparsity_measure(q, k[..., :8], jnp.arange(9), backend="interpret")


@pytest.mark.parametrize("unroll,blocks", [(1, 1), (4, 2), (9, 3), (16, 8)])
def test_per_query_unroll_and_blocks_give_the_same_measure(keys, unroll, blocks):
    q, k = _qk(keys, lq=40, lk=33)                # 3 blocks of 16: 2 per program leaves a gap
    idx = jax.random.randint(jax.random.PRNGKey(2), (40, 9), 0, 33)
    got = measure(q, k, idx, backend="interpret", block_q=16, unroll=unroll, blocks=blocks)
    np.testing.assert_allclose(got, sparsity_reference(q, k, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,u", [(40, 7), (100, 30), (16, 16), (33, 1)])
@pytest.mark.parametrize("values", ["normal", "ties", "negative", "constant"])
def test_top_u_is_the_set_of_lax_top_k(length, u, values):
    m = jax.random.normal(jax.random.PRNGKey(length), (2, 3, length))
    m = {"normal": m, "ties": jnp.round(m * 2) / 2, "negative": -jnp.abs(m) - 1e-30,
         "constant": jnp.zeros_like(m)}[values]
    got = jax.jit(top_u, static_argnames=("u", "backend"))(m, u, backend="interpret")
    want = top_u_reference(m, u)
    assert got.shape == (2, 3, u) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, np.sort(np.asarray(jax.lax.top_k(m, u)[1]), -1))


def test_top_u_rejects_bad_u():
    with pytest.raises(ValueError, match=r"u must be in \[1, 8\]"):
        top_u(jnp.zeros((1, 1, 8)), 9, backend="interpret")


@pytest.mark.parametrize("lq,lk,u", [(40, 40, 20), (24, 70, 5), (64, 33, 50)])
def test_active_rows_match_reference_with_gradients(keys, lq, lk, u):
    """u padded to 32 / 16 / 64 rows (padding: distinct lazy rows, masked); partial blocks."""
    kq, kk, kv, kt, kw = keys(5)
    q = jax.random.normal(kq, (2, lq, 3, 16))
    k, v = (jax.random.normal(x, (2, lk, 3, 16)) for x in (kk, kv))
    perm = jax.vmap(lambda x: jax.random.permutation(x, lq)[:u])(jax.random.split(kt, 6))
    top = perm.reshape(2, 3, u).astype(jnp.int32)
    w = jax.random.normal(kw, q.shape)
    f = lambda q, k, v: active_rows_attention(q, k, v, top, backend="interpret", block_k=16)
    r = lambda q, k, v: active_rows_reference(q, k, v, top, sm_scale=0.25)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), r(q, k, v), atol=1e-5, rtol=1e-5)
    grad = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))
    for g, ref in zip(jax.jit(grad(f))(q, k, v), grad(r)(q, k, v), strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_active_rows_rejects_odd_head_dim_and_short_sequences(keys):
    q = jnp.zeros((1, 8, 1, 24))
    with pytest.raises(ValueError, match=r"power-of-2 head_dim"):
        active_rows_attention(q, q, q, jnp.zeros((1, 1, 2), jnp.int32), backend="interpret")
    q = jnp.zeros((1, 12, 1, 16))                 # u = 10 pads to 16 rows > 12
    with pytest.raises(ValueError, match=r"needs Lq >= 16 rows for u = 10"):
        active_rows_attention(q, q, q, jnp.zeros((1, 1, 10), jnp.int32), backend="interpret")


def test_top_u_permutation_lists_the_others_after(keys):
    m = jax.random.normal(keys(1)[0], (2, 3, 20))
    perm = np.asarray(top_u(m, 5, backend="interpret", permutation=True))
    assert perm.shape == (2, 3, 32)
    np.testing.assert_array_equal(perm[..., :5], top_u_reference(m, 5))
    rest = perm[..., 5:]
    assert np.all(np.diff(rest, axis=-1) > 0)                       # increasing, distinct
    np.testing.assert_array_equal(np.sort(perm, -1), np.broadcast_to(np.arange(32), perm.shape))

"""ProbSparse attention: exact full attention when every query is active, the sparse path's
shapes and lazy queries, causality of the strict variant by perturbation, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixers import build_mixer
from mixers.probsparse import probsparse_attention, probsparse_sizes

# One compiled program per option set: much cheaper on CPU than op-by-op dispatch.
ps = jax.jit(probsparse_attention, static_argnames=(
    "factor", "causal", "query_selection", "sampling", "lazy_causal", "backend"))


def _qkv(keys, b=2, length=16, h=2, d=8, dtype=jnp.float32):
    return [jax.random.normal(k, (b, length, h, d), dtype) for k in keys(3)]


def test_sizes_follow_the_authors_code():
    assert probsparse_sizes(96, 96, 5) == (25, 25)            # 5 * ceil(ln 96) = 5 * 5
    assert probsparse_sizes(48, 24, 5) == (20, 20)            # L_K = 24: 5 * ceil(3.18)
    assert probsparse_sizes(10, 10, 5) == (10, 10)            # capped at L


@pytest.mark.parametrize("causal,selection,sampling", [
    (False, "global", "per_query"), (True, "global", "shared"), (True, "prefix", "per_query"),
    (True, "prefix", "shared")])
def test_equals_full_attention_when_every_query_is_active(keys, causal, selection, sampling):
    q, k, v = _qkv(keys, length=16)                           # u = 6 * ceil(ln 16) = 18 >= 16
    out = ps(q, k, v, jax.random.PRNGKey(1), factor=6, causal=causal,
                               query_selection=selection, sampling=sampling)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_sparse_path_gives_full_rows_for_top_queries_and_mean_for_lazy(keys):
    q, k, v = _qkv(keys, length=64)                           # u = 5 * ceil(ln 64) = 25 < 64
    out = ps(q, k, v, jax.random.PRNGKey(3), factor=5)
    full = jax.nn.dot_product_attention(q, k, v)
    mean = jnp.broadcast_to(v.mean(1, keepdims=True), v.shape)
    is_full = jnp.isclose(out, full, atol=1e-5).all(-1)       # [B, L, H]
    is_mean = jnp.isclose(out, mean, atol=1e-5).all(-1)
    assert bool((is_full | is_mean).all())
    assert (is_full.sum(1) == 25).all()                       # exactly u active per (b, h)


def test_cross_lengths_and_bf16(keys):
    kq, kk, kv = keys(3)
    q = jax.random.normal(kq, (2, 24, 4, 16), jnp.bfloat16)
    k = jax.random.normal(kk, (2, 40, 4, 16), jnp.bfloat16)
    v = jax.random.normal(kv, (2, 40, 4, 16), jnp.bfloat16)
    out = ps(q, k, v, jax.random.PRNGKey(0), factor=2)
    assert out.shape == (2, 24, 4, 16) and out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())


@pytest.mark.parametrize("lazy", ["cumsum", "cummean"])
def test_prefix_selection_is_causal_by_perturbation(keys, lazy):
    q, k, v = _qkv(keys, length=48)                           # u = 20 < 48: sparse
    key = jax.random.PRNGKey(5)
    f = lambda q, k, v: ps(q, k, v, key, factor=5, causal=True,
                                             query_selection="prefix", lazy_causal=lazy)
    base = f(q, k, v)
    for t in (7, 30, 47):
        moved = f(*(x.at[:, t].add(3.0) for x in (q, k, v)))
        np.testing.assert_array_equal(moved[:, :t], base[:, :t])
        assert not np.allclose(moved[:, t:], base[:, t:])


def test_global_selection_can_look_ahead(keys):
    """The authors' masked variant picks queries with the whole sequence: documented, shown."""
    q, k, v = _qkv(keys, length=48)
    key = jax.random.PRNGKey(5)
    f = lambda q, k: ps(q, k, v, key, factor=2, causal=True,
                                          query_selection="global")
    base = f(q, k)
    moved = f(q.at[:, 40:].multiply(10.0), k.at[:, 40:].multiply(10.0))
    assert not np.allclose(moved[:, :40], base[:, :40])


def test_mixer_from_registry_trains_and_resamples(keys):
    mixer = build_mixer({"type": "probsparse", "n_heads": 4, "factor": 2}, d_model=32,
                        rngs=nnx.Rngs(0))
    assert not mixer.causal or mixer.cfg.selection == "prefix"
    x = jax.random.normal(keys(1)[0], (2, 40, 32))
    call = nnx.jit(lambda m, x: m(x))
    y1, y2 = call(mixer, x), call(mixer, x)                   # a fresh sample per call
    assert y1.shape == x.shape and not np.allclose(y1, y2)
    grads = nnx.jit(nnx.grad(lambda m: (m(x) ** 2).mean()))(mixer)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("spec,match", [
    ({"factor": 0}, r"mixer.factor: must be >= 1"),
    ({"sampling": "random"}, r"mixer.sampling: must be one of"),
    ({"query_selection": "top"}, r"mixer.query_selection"),
    ({"n_heads": 3}, r"mixer.n_heads: 3 does not divide"),
])
def test_config_errors_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        build_mixer({"type": "probsparse", **spec}, d_model=32, rngs=nnx.Rngs(0))


def test_active_queries_are_the_top_u_of_the_authors_measure(keys):
    """Transcription of the code's _prob_QK: M = max - sum / L_K over per-query samples."""
    q, k, v = _qkv(keys, length=64)
    key = jax.random.PRNGKey(3)
    out = ps(q, k, v, key, factor=5)
    n_sample, u = probsparse_sizes(64, 64, 5)
    idx = np.asarray(jax.random.randint(key, (64, n_sample), 0, 64))     # the mixer's draw
    qn, kn = np.asarray(q), np.asarray(k)
    qk = np.einsum("blhd,blshd->bhls", qn, kn[:, idx])
    m = qk.max(-1) - qk.sum(-1) / 64                                      # [B, H, L]
    expected = np.sort(np.argsort(-m, axis=-1)[..., :u], axis=-1)
    full = jax.nn.dot_product_attention(q, k, v)
    active = np.isclose(out, full, atol=1e-5).all(-1).transpose(0, 2, 1)  # [B, H, L]
    got = np.stack([[np.flatnonzero(active[b, h]) for h in range(2)] for b in range(2)])
    np.testing.assert_array_equal(got, expected)


def test_mix_heads_is_the_authors_reshape(keys):
    """`mix_heads: true`: output row l of the [B, L, H*D] tensor fed to the output projection is
    the flat chunk l of the [B, H, L, D] attention output (the authors' `mix=True`)."""
    spec = {"type": "probsparse", "n_heads": 4, "factor": 2, "causal": True,
            "query_selection": "global"}
    plain = build_mixer(spec, d_model=32, rngs=nnx.Rngs(0))
    mixed = build_mixer({**spec, "mix_heads": True}, d_model=32, rngs=nnx.Rngs(0))
    x = jax.random.normal(keys(1)[0], (2, 12, 32))
    captured = {}
    for name, m in (("plain", plain), ("mixed", mixed)):
        m.o_proj = _Capture(m.o_proj, captured, name)
        m(x)
    b, l, h, d = 2, 12, 4, 8
    o_blhd = np.asarray(captured["plain"]).reshape(b, l, h, d)
    flat = np.transpose(o_blhd, (0, 2, 1, 3)).reshape(b, -1)       # [B, H*L*D], head-major
    want = flat.reshape(b, l, h * d)                                  # chunk l -> row l
    np.testing.assert_allclose(np.asarray(captured["mixed"]), want, rtol=1e-6, atol=1e-6)
    # row 1 holds positions 4..7 of head 0 (H = 4 divides L = 12)
    np.testing.assert_allclose(want[:, 1].reshape(b, 4, d), o_blhd[:, 4:8, 0], rtol=1e-6)


class _Capture:                     # a plain callable standing in for o_proj (no jit here)
    def __init__(self, inner, store, name):
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, x):
        self.store[self.name] = x
        return self.inner(x)


@pytest.mark.parametrize("causal,selection,sampling,lazy", [
    (False, "global", "shared", "cumsum"),
    pytest.param(False, "global", "per_query", "cumsum", marks=pytest.mark.slow),
    (True, "prefix", "per_query", "cumsum"),
    pytest.param(True, "global", "per_query", "cumsum", marks=pytest.mark.slow),
    pytest.param(True, "prefix", "shared", "cummean", marks=pytest.mark.slow)])
def test_kernel_path_matches_the_jnp_form_with_gradients(keys, causal, selection, sampling, lazy):
    """backend="interpret" (Pallas measure kernel, flash on the gathered rows, the fused fill)
    against the plain jnp form: the same sampled keys and active queries, values and grads."""
    q, k, v = _qkv(keys, length=40)                           # u = 20 < 40: sparse
    kw = dict(factor=5, causal=causal, query_selection=selection, sampling=sampling,
              lazy_causal=lazy)
    key = jax.random.PRNGKey(7)
    loss = lambda backend: jax.jit(jax.value_and_grad(
        lambda q, k, v: (ps(q, k, v, key, backend=backend, **kw) ** 2).sum(),
        argnums=(0, 1, 2)))(q, k, v)
    (ref_l, ref_g), (got_l, got_g) = loss("reference"), loss("interpret")
    np.testing.assert_allclose(got_l, ref_l, rtol=1e-5)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)
    out = ps(q, k, v, key, backend="interpret", **kw)
    np.testing.assert_allclose(out, ps(q, k, v, key, backend="reference", **kw), atol=1e-5)


@pytest.mark.parametrize("sampling,variant", [("shared", "v1"), ("per_query", "v1"),
                                              ("shared", "lax.top_k")])
def test_other_tunings_give_the_same_layer_and_grads(keys, sampling, variant):
    """V1 (lax.top_k, flash on the gathered rows, scatter into the fill) and the default with
    lax.top_k instead of the top_u kernel, against the jnp form."""
    from mixers.probsparse import TUNING, V1
    tuning = V1 if variant == "v1" else {**TUNING, "top_u": "xla"}
    q, k, v = _qkv(keys, length=40, d=16)
    key = jax.random.PRNGKey(2)
    loss = lambda **kw: jax.jit(jax.value_and_grad(
        lambda q, k, v: (probsparse_attention(q, k, v, key, sampling=sampling, **kw) ** 2).sum(),
        argnums=(0, 1, 2)))(q, k, v)
    (got_l, got_g), (ref_l, ref_g) = loss(backend="interpret", tuning=tuning), loss(
        backend="reference")
    np.testing.assert_allclose(got_l, ref_l, rtol=1e-5)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_mixer_impl_interpret_equals_reference(keys):
    x = jax.random.normal(keys(1)[0], (2, 40, 32))
    outs = [build_mixer({"type": "probsparse", "n_heads": 4, "factor": 3, "impl": impl},
                        d_model=32, rngs=nnx.Rngs(0))(x) for impl in ("reference", "interpret")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)

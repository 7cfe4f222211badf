"""The pure-jnp references against plain loops and dense math (the ground truth of the kernels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import pooling
from pallas_kernels.selective_scan import selective_scan_reference


def _gla_inputs(keys, b=2, length=37, h=2, dk=8, dv=6, strength=3.0):
    k = keys(5)
    q = jax.random.normal(k[0], (b, length, h, dk))
    kk = jax.random.normal(k[1], (b, length, h, dk))
    v = jax.random.normal(k[2], (b, length, h, dv))
    log_g = -strength * jax.nn.sigmoid(jax.random.normal(k[3], (b, length, h, dk)))
    s0 = jax.random.normal(k[4], (b, h, dk, dv))
    return q, kk, v, log_g, s0


@pytest.mark.parametrize("length", [1, 16, 37])
def test_gla_chunked_matches_recurrence_with_initial_state(keys, length):
    q, k, v, g, s0 = _gla_inputs(keys, length=length)
    o1, f1 = pk.gla_recurrent_reference(q, k, v, g, initial_state=s0)
    o2, f2 = pk.gla_chunked_reference(q, k, v, g, initial_state=s0)
    np.testing.assert_allclose(o2, o1, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(f2, f1, atol=2e-5, rtol=2e-5)


def test_gla_chunked_gradients_match_recurrence(keys):
    q, k, v, g, s0 = _gla_inputs(keys)
    w = jax.random.normal(keys(1, seed=9)[0], (2, 37, 2, 6))

    def loss(fn, *args):
        o, f = fn(*args[:4], initial_state=args[4])
        return (o * w).sum() + f.sum()

    g1 = jax.grad(lambda *a: loss(pk.gla_recurrent_reference, *a), argnums=range(5))(
        q, k, v, g, s0)
    g2 = jax.grad(lambda *a: loss(pk.gla_chunked_reference, *a), argnums=range(5))(
        q, k, v, g, s0)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def test_gla_strong_decay_stays_finite(keys):
    q, k, v, g, _ = _gla_inputs(keys, length=200, strength=10.0)   # log_g down to -10 per step
    o, f = pk.gla_chunked_reference(q, k, v, g)
    assert np.isfinite(o).all() and np.isfinite(f).all()
    o1, _ = pk.gla_recurrent_reference(q, k, v, g)
    np.testing.assert_allclose(o, o1, atol=2e-5, rtol=2e-5)


def test_gla_step_is_one_recurrence_step(keys):
    q, k, v, g, s0 = _gla_inputs(keys, length=1)
    o, f = pk.gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0)
    o1, f1 = pk.gla_recurrent_reference(q, k, v, g, initial_state=s0)
    np.testing.assert_allclose(o, o1[:, 0], atol=1e-5)
    np.testing.assert_allclose(f, f1, atol=1e-5)


def _ssm_inputs(keys, b=2, length=45, dn=8, n=5, groups=None):
    k = keys(8)
    bc_shape = (b, length, n) if groups is None else (b, length, groups, n)
    return dict(
        u=jax.random.normal(k[0], (b, length, dn)),
        delta=jax.random.normal(k[1], (b, length, dn)) * 0.5,
        A=-jnp.exp(jax.random.normal(k[2], (dn, n))),
        B=jax.random.normal(k[3], bc_shape), C=jax.random.normal(k[4], bc_shape),
        D=jax.random.normal(k[5], (dn,)), z=jax.random.normal(k[6], (b, length, dn)),
        delta_bias=jax.random.normal(k[7], (dn,)) * 0.1)


@pytest.mark.parametrize("method", ["associative", "chunked"])
@pytest.mark.parametrize("groups", [None, 2])
def test_selective_scan_methods_match_scan(keys, method, groups):
    x = _ssm_inputs(keys, groups=groups)
    h0 = jax.random.normal(keys(1, seed=3)[0], (2, 8, 5))
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True,
              initial_state=h0)
    y1, f1 = selective_scan_reference(*args, method="scan", **kw)
    y2, f2 = selective_scan_reference(*args, method=method, chunk_size=16, **kw)
    np.testing.assert_allclose(y2, y1, atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(f2, f1, atol=3e-5, rtol=3e-5)


def test_selective_scan_scan_matches_python_loop(keys):
    x = _ssm_inputs(keys, length=7)
    y, _ = selective_scan_reference(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"],
                                    method="scan")
    u, dt, A, B, C = (np.asarray(x[k], np.float64) for k in ("u", "delta", "A", "B", "C"))
    h = np.zeros((2, 8, 5))
    for t in range(7):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None]
        expected = (h * C[:, t, None]).sum(-1) + np.asarray(x["D"]) * u[:, t]
        np.testing.assert_allclose(y[:, t], expected, atol=1e-4, rtol=1e-4)


def _naive_attention(q, k, v, causal, window=None, seg=None):
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                scores, vals = [], []
                for j in range(k.shape[1]):
                    if causal and j > i or window and j <= i - window:
                        continue
                    if seg is not None and seg[bi, i] != seg[bi, j]:
                        continue
                    scores.append(q[bi, i, h] @ k[bi, j, h // rep] / np.sqrt(d))
                    vals.append(v[bi, j, h // rep])
                p = np.exp(np.array(scores) - max(scores))
                out[bi, i, h] = (p[:, None] * np.array(vals)).sum(0) / p.sum()
    return out


@pytest.mark.parametrize("causal,window,use_seg", [(False, None, False), (True, None, False),
                                                   (True, 3, False), (True, None, True)])
def test_attention_reference_matches_naive_softmax(keys, causal, window, use_seg):
    k = keys(3)
    q = jax.random.normal(k[0], (2, 9, 4, 8))
    kk = jax.random.normal(k[1], (2, 9, 2, 8))
    v = jax.random.normal(k[2], (2, 9, 2, 8))
    seg = np.array([[0] * 4 + [1] * 5, [0] * 9]) if use_seg else None
    out = pk.attention_reference(q, kk, v, causal=causal, window=window,
                                 segment_ids=None if seg is None else jnp.asarray(seg))
    expected = _naive_attention(*(np.asarray(x, np.float64) for x in (q, kk, v)), causal,
                                window, seg)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_reference_matches_full_attention(keys):
    k = keys(3)
    q = jax.random.normal(k[0], (2, 12, 4, 8))
    kk = jax.random.normal(k[1], (2, 12, 2, 8))
    v = jax.random.normal(k[2], (2, 12, 2, 8))
    full = pk.attention_reference(q, kk, v, causal=True)
    cache_k = jnp.pad(kk, ((0, 0), (0, 4), (0, 0), (0, 0)))
    cache_v = jnp.pad(v, ((0, 0), (0, 4), (0, 0), (0, 0)))
    out = pk.decode_attention(q[:, -3:], cache_k, cache_v, jnp.array([12, 12]),
                              backend="reference")
    np.testing.assert_allclose(out, full[:, -3:], atol=1e-5)


def _ties(keys, shape):
    return jnp.round(jax.random.normal(keys(1, seed=4)[0], shape) * 2) / 2   # many ties


@pytest.mark.parametrize("causal", [False, True])
def test_pooling_references_match_loops(keys, causal):
    x = _ties(keys, (2, 19, 3))
    xn = np.asarray(x)
    seg = np.asarray(pooling.segment_max_reference(x, 4, causal=causal))
    loc = np.asarray(pooling.local_max_reference(x, 3, causal=causal))
    for t in range(19):
        s0 = t - t % 4
        hi = t + 1 if causal else min(s0 + 4, 19)
        np.testing.assert_array_equal(seg[:, t], xn[:, s0:hi].max(1))
        lo, hi = (max(t - 2, 0), t + 1) if causal else (max(t - 1, 0), min(t + 2, 19))
        np.testing.assert_array_equal(loc[:, t], xn[:, lo:hi].max(1))
    np.testing.assert_allclose(pooling.prefix_mean_reference(x),
                               np.cumsum(xn, 1) / np.arange(1, 20)[None, :, None], rtol=1e-6)


def test_max_pool_gradient_goes_to_earliest_argmax():
    x = jnp.array([[[1.0], [3.0], [3.0], [2.0]]])
    g = jax.grad(lambda x: pooling.segment_max_reference(x, 4).sum())(x)
    np.testing.assert_array_equal(g[0, :, 0], [0, 4, 0, 0])
    g = jax.grad(lambda x: pooling.local_max_reference(x, 3, causal=True).sum())(x)
    np.testing.assert_array_equal(g[0, :, 0], [1, 3, 0, 0])


def test_kernel_functions_reject_bad_shapes(keys):
    q = jax.random.normal(keys(1)[0], (2, 8, 4, 16))
    with pytest.raises(ValueError, match="k/v heads|heads"):
        pk.flash_attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="log_g"):
        pk.gla(q, q, q, q[:, :4])
    with pytest.raises(ValueError, match="A must have shape"):
        pk.selective_scan(q[..., 0, :], q[..., 0, :], jnp.ones((3, 4)), q[..., 0, :4],
                          q[..., 0, :4])
    with pytest.raises(ValueError, match="backend"):
        pk.gla(q, q, q, -jnp.abs(q), backend="cuda")

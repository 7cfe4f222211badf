"""Every registered mixer against the Mixer contract: shape, causality, gradients, decoding,
config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixers import build_mixer, mixer_types

D_MODEL = 32
CAUSAL_SPECS = {
    "attention": {"type": "attention", "n_heads": 4, "n_kv_heads": 2},
    "attention_window": {"type": "attention", "n_heads": 4, "window": 5},
    "attention_xla": {"type": "attention", "n_heads": 4, "n_kv_heads": 1, "impl": "xla"},
    "gla": {"type": "gla", "n_heads": 2},
    "mamba": {"type": "mamba", "d_state": 4},
    "pooling": {"type": "pooling", "segment_size": 4, "local_window": 3},
}
BIDIRECTIONAL_SPECS = {
    "attention": {"type": "attention", "n_heads": 4, "causal": False},
    "gla": {"type": "gla", "n_heads": 2, "causal": False},
    "mamba": {"type": "mamba", "d_state": 4, "causal": False},
    "pooling": {"type": "pooling", "n_heads": 2, "segment_size": 4, "causal": False},
}


def _x(length=19, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (2, length, D_MODEL))


def _build(spec):
    return build_mixer(spec, d_model=D_MODEL, rngs=nnx.Rngs(0))


# The forward and the decode step jitted, as the models run them (one compile per shape instead
# of op-by-op dispatch: about half the time of these tests).
_call = nnx.jit(lambda m, x, **kw: m(x, **kw))
_decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))


@pytest.mark.parametrize("name", sorted(CAUSAL_SPECS))
def test_causal_mixer_output_shape_and_causality(name):
    mixer = _build(CAUSAL_SPECS[name])
    x = _x()
    y = _call(mixer, x)
    assert y.shape == x.shape and np.isfinite(y).all()
    t = 11
    x2 = x.at[:, t].add(jax.random.normal(jax.random.PRNGKey(5), (2, D_MODEL)))
    y2 = _call(mixer, x2)
    np.testing.assert_allclose(y2[:, :t], y[:, :t], atol=1e-5)
    assert np.abs(y2[:, t:] - y[:, t:]).max() > 1e-4         # the change is seen from t on


@pytest.mark.parametrize("name", sorted(BIDIRECTIONAL_SPECS))
def test_bidirectional_mixer_sees_the_future(name):
    mixer = _build(BIDIRECTIONAL_SPECS[name])
    x = _x()
    y = _call(mixer, x)
    x2 = x.at[:, 15].add(1.0)
    assert np.abs(_call(mixer, x2)[:, :3] - y[:, :3]).max() > 1e-5
    with pytest.raises(ValueError, match="cannot decode"):
        mixer.init_cache(2, 8)


@pytest.mark.parametrize("name", sorted(CAUSAL_SPECS))
def test_decode_matches_full_forward(name):
    mixer = _build(CAUSAL_SPECS[name])
    x = _x(length=13)
    full = _call(mixer, x)
    cache = mixer.init_cache(2, 13, jnp.float32)
    steps = []
    for t in range(13):
        y, cache = _decode(mixer, x[:, t:t + 1], cache)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", sorted(CAUSAL_SPECS) + ["gla_bidirectional"])
def test_every_parameter_gets_a_gradient(name):
    spec = CAUSAL_SPECS.get(name) or BIDIRECTIONAL_SPECS["gla"]
    mixer = _build(spec)
    x = _x()
    w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    grads = nnx.jit(nnx.grad(lambda m: (m(x) * w).sum()))(mixer)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_attention_segment_ids_block_cross_segment_attention():
    mixer = _build(CAUSAL_SPECS["attention"])
    x = _x(length=12)
    seg = jnp.array([[0] * 6 + [1] * 6] * 2)
    y = _call(mixer, x, segment_ids=seg)
    x2 = x.at[:, 2].add(1.0)                           # inside segment 0
    np.testing.assert_allclose(_call(mixer, x2, segment_ids=seg)[:, 6:], y[:, 6:], atol=1e-5)


def test_bf16_compute_runs_for_every_mixer():
    for spec in CAUSAL_SPECS.values():
        mixer = build_mixer(spec, d_model=D_MODEL, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        y = _call(mixer, _x().astype(jnp.bfloat16))
        assert y.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y, np.float32)).all()


@pytest.mark.parametrize("spec,match", [
    ({"type": "transformer"}, r"mixer.type: unknown mixer type 'transformer'; valid types"),
    ({"n_heads": 2}, r"needs a 'type'"),
    ({"type": "gla", "heads": 2}, r"mixer.heads: unknown key; valid keys"),
    ({"type": "attention", "n_heads": 5}, r"mixer.n_heads: 5 does not divide d_model=32"),
    ({"type": "attention", "n_heads": 4, "n_kv_heads": 3}, r"mixer.n_kv_heads"),
    ({"type": "attention", "n_heads": "4"}, r"mixer.n_heads: expected int"),
    ({"type": "attention", "impl": "cuda"}, r"mixer.impl: must be one of"),
    ({"type": "attention", "window": 4, "causal": False}, r"mixer.window"),
    ({"type": "pooling", "local_window": 4, "causal": False}, r"mixer.local_window"),
    ({"type": "gla", "n_heads": 3}, r"mixer.expand_k"),
])
def test_bad_specs_raise_errors_naming_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        _build(spec)


def test_registry_lists_every_mixer():
    assert {"attention", "gla", "mamba", "pooling"} <= set(mixer_types())


def test_readme_example_runs():
    """The 'use a mixer in your own model' example of the README, verbatim."""
    import re
    from pathlib import Path
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"<!-- example: mixer -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its mixer example"
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 128, 256)

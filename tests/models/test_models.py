"""Language models built from every config in configs/ (shrunk), per-layer mixer choice,
cached decoding against the full forward, and config errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from models import build_model, count_params

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
# the forward jitted, as training runs it (about half the time of op-by-op dispatch here)
_forward = nnx.jit(lambda m, tokens: m(tokens))


def _small(model_cfg):
    """Shrink a config's model to test size, keeping its mixer pattern."""
    cfg = dict(model_cfg, d_model=32, n_layers=len(model_cfg["layers"]))
    cfg["mixers"] = {name: {k: (2 if k in ("n_heads", "n_kv_heads") else v)
                            for k, v in spec.items()}
                     for name, spec in model_cfg["mixers"].items()}
    return cfg


def _lm_configs():
    out = []
    for path in CONFIGS:
        model = yaml.safe_load(path.read_text())["model"]
        if model.get("type", "lm") == "lm":
            # mqar_ponet: the ponet model on the MQAR task (ponet and the MQAR training run
            # in the default set; this one with -m slow)
            marks = pytest.mark.slow if path.stem == "mqar_ponet" else ()
            out.append(pytest.param(model, id=path.stem, marks=marks))
    return out


@pytest.mark.parametrize("model_cfg", _lm_configs())
def test_model_from_config_runs_forward_and_backward(model_cfg):
    model = build_model(_small(model_cfg), rngs=nnx.Rngs(0))
    vocab = model_cfg.get("vocab_size", 256)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, vocab)
    logits = _forward(model, tokens)
    assert logits.shape == (2, 24, vocab) and np.isfinite(logits).all()

    def loss(m):
        lp = jax.nn.log_softmax(m(tokens[:, :-1]))
        return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_layers_pattern_repeats_to_n_layers():
    cfg = {"d_model": 32, "n_layers": 8, "layers": ["gla", "gla", "gla", "attn"],
           "mixers": {"attn": {"type": "attention", "n_heads": 2},
                      "gla": {"type": "gla", "n_heads": 2}}}
    model = build_model(cfg, rngs=nnx.Rngs(0))
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["GatedLinearAttention"] * 3 + ["Attention"] + \
        ["GatedLinearAttention"] * 3 + ["Attention"]


def test_hybrid_decode_matches_full_forward():
    cfg = {"d_model": 32, "n_layers": 4, "layers": ["gla", "mamba", "pool", "attn"],
           "mixers": {"attn": {"type": "attention", "n_heads": 2},
                      "gla": {"type": "gla", "n_heads": 2},
                      "mamba": {"type": "mamba", "d_state": 4},
                      "pool": {"type": "pooling", "segment_size": 4}}}
    model = build_model(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 256)
    full = _forward(model, tokens)
    caches = model.init_cache(2, 10)
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))     # one compile for the 10 steps
    steps = []
    for t in range(10):
        logits, caches = decode(model, tokens[:, t:t + 1], caches)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_parameter_count_matches_hand_count():
    cfg = {"vocab_size": 256, "d_model": 32, "n_layers": 1, "layers": ["a"], "mlp_hidden": 64,
           "mixers": {"a": {"type": "attention", "n_heads": 2}}}
    model = build_model(cfg, rngs=nnx.Rngs(0))
    expected = 256 * 32 + (32 + 4 * 32 * 32) + (32 + 3 * 32 * 64) + 32
    assert count_params(model) == expected


@pytest.mark.parametrize("change,match", [
    ({"layers": ["gla", "nope"]}, r"model.layers\[1\]: 'nope' \(layer 1\) is not in model.mixers"),
    ({"n_layers": 3}, r"model.layers: 2 names cannot fill n_layers=3"),
    ({"mixers": {"gla": {"type": "gla", "n_heads": 5}}}, r"model.mixers.gla.expand_k"),
    ({"dmodel": 3}, r"model.dmodel: unknown key"),
    ({"type": "rnn"}, r"model.type: unknown model type 'rnn'"),
    ({"embed_lookup": "table"}, r"model.embed_lookup: must be one of"),
])
def test_bad_model_configs_name_the_key(change, match):
    cfg = {"d_model": 32, "n_layers": 2, "layers": ["gla", "gla"],
           "mixers": {"gla": {"type": "gla", "n_heads": 2}}}
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        build_model(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_equals_the_gather(dtype):
    """embed_lookup one_hot (the default up to 4096 tokens) gives the gather's logits and
    embedding gradient: the same model, a matmul instead of a scatter in the backward."""
    base = {"d_model": 32, "n_layers": 1, "layers": ["attn"], "dtype": dtype,
            "mixers": {"attn": {"type": "attention", "n_heads": 2, "impl": "reference"}}}
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 17), 0, 256)
    results = {}
    for lookup in ("gather", "one_hot"):
        model = build_model({**base, "embed_lookup": lookup}, rngs=nnx.Rngs(0))
        assert model.cfg.one_hot_embed == (lookup == "one_hot")
        loss, grads = nnx.jit(nnx.value_and_grad(lambda m: (m(tokens) ** 2).mean()))(model)
        results[lookup] = loss, grads.embed.embedding[...]
    tol = 1e-6 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(results["one_hot"][0], results["gather"][0], rtol=tol)
    g_one_hot, g_gather = results["one_hot"][1], results["gather"][1]
    assert float(jnp.abs(g_gather).max()) > 0
    scale = float(jnp.abs(g_gather).max())
    np.testing.assert_allclose(g_one_hot, g_gather, rtol=0, atol=tol * scale)
    big = build_model({**base, "vocab_size": 5000}, rngs=nnx.Rngs(0))
    assert not big.cfg.one_hot_embed                       # auto: a gather above 4096 tokens

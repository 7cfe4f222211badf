"""Informer: output shapes, the distilling encoder halving lengths, every registry mixer as the
encoder's self-attention, the time-feature embeddings, config errors naming the key path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model

TINY = {"type": "informer", "enc_in": 3, "dec_in": 3, "c_out": 2, "pred_len": 6, "d_model": 16,
        "d_ff": 32, "cross_heads": 2, "e_layers": 2,
        "encoder_mixer": {"type": "probsparse", "n_heads": 2, "factor": 2},
        "decoder_mixer": {"type": "probsparse", "n_heads": 2, "factor": 2,
                          "query_selection": "global"}}


def _inputs(key, b=2, seq=24, label=6, pred=6, c=3, int_marks=False):
    k1, k2, k3 = jax.random.split(key, 3)
    x_enc = jax.random.normal(k1, (b, seq, c))
    x_dec = jnp.concatenate([x_enc[:, -label:], jnp.zeros((b, pred, c))], axis=1)
    if int_marks:
        sizes = jnp.array([13, 32, 7, 24, 4])
        marks = jax.random.randint(k2, (b, seq + pred, 5), 0, 1000) % sizes
    else:
        marks = jax.random.uniform(k2, (b, seq + pred, 4), minval=-0.5, maxval=0.5)
    return x_enc, marks[:, :seq], x_dec, marks[:, seq - label:]


def test_forward_shapes_and_distilling_halves_the_encoder_length():
    model = build_model(TINY, rngs=nnx.Rngs(0))
    x_enc, m_enc, x_dec, m_dec = _inputs(jax.random.PRNGKey(0), seq=25)

    @nnx.jit
    def run(model):
        return model(x_enc, m_enc, x_dec, m_dec), model.encode(x_enc, m_enc)

    out, memory = run(model)
    assert out.shape == (2, 6, 2) and out.dtype == jnp.float32
    assert memory.shape == (2, 13, 16)                          # 25 -> 13 (ceil halving)
    # Training mode (dropout, BatchNorm statistics) runs in tests/training/test_ett.py.


ENCODERS = {
    "attention": {"type": "attention", "n_heads": 2, "rope": False},
    "gla": {"type": "gla", "n_heads": 2},
    "mamba": {"type": "mamba", "d_state": 4},
    "pooling": {"type": "pooling", "n_heads": 2, "segment_size": 4},
}


@pytest.mark.parametrize("name", [
    "attention", "pooling",
    pytest.param("gla", marks=pytest.mark.slow), pytest.param("mamba", marks=pytest.mark.slow)])
def test_every_registry_mixer_works_as_the_encoder(name):
    """(probsparse is the default encoder, run by the other tests.)"""
    x_enc, m_enc, _, _ = _inputs(jax.random.PRNGKey(2))
    model = build_model(dict(TINY, e_layers=1, encoder_mixer=ENCODERS[name]), rngs=nnx.Rngs(0))
    assert model.encoder[0].mixer.causal is False              # encoders are bidirectional
    memory = nnx.jit(lambda m, x, t: m.encode(x, t))(model, x_enc, m_enc)
    assert memory.shape == (2, 24, 16) and bool(jnp.isfinite(memory).all())


def test_integer_time_feature_embedding():
    model = build_model(dict(TINY, e_layers=1, embed="fixed"), rngs=nnx.Rngs(0))
    assert build_model(dict(TINY, e_layers=1, embed="learned"), rngs=nnx.Rngs(0)).enc_embed.tables
    x_enc, m_enc, _, _ = _inputs(jax.random.PRNGKey(3), int_marks=True)
    encode = nnx.jit(lambda m, x, t: m.encode(x, t))
    out = encode(model, x_enc, m_enc)
    moved = encode(model, x_enc, m_enc.at[..., 3].set((m_enc[..., 3] + 5) % 24))
    assert bool(jnp.isfinite(out).all())
    assert not np.allclose(out, moved)                          # the hour feature is used


@pytest.mark.parametrize("change,match", [
    ({"encoder_mixer": {"type": "lstm"}}, r"model.encoder_mixer.type: unknown mixer type"),
    ({"decoder_mixer": {"type": "probsparse", "factor": 0}}, r"model.decoder_mixer.factor"),
    ({"embed": "onehot"}, r"model.embed: must be one of"),
    ({"cross_heads": 3}, r"model.cross_heads: 3 does not divide"),
    ({"init": "kaiming"}, r"model.init: must be one of"),
])
def test_config_errors_name_the_key_path(change, match):
    with pytest.raises(ValueError, match=match):
        build_model(dict(TINY, **change), rngs=nnx.Rngs(0))


def test_torch_init_redraws_linears_and_convs_but_not_the_value_embedding():
    """`init: torch`: weights and biases U(+-1/sqrt(fan_in)) as torch's defaults, in the model's
    own layers and inside the mixers; the value convolution keeps its kaiming normal."""
    flax_m = build_model(dict(TINY, d_model=64, d_ff=128), rngs=nnx.Rngs(0))
    torch_m = build_model(dict(TINY, d_model=64, d_ff=128, init="torch"), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(torch_m.enc_embed.value.kernel[...],
                                  flax_m.enc_embed.value.kernel[...])
    for layer in (torch_m.encoder[0].ffn.up, torch_m.encoder[0].mixer.q_proj,
                  torch_m.distil[0].conv):
        w = np.asarray(layer.kernel[...])
        bound = 1 / np.sqrt(np.prod(w.shape[:-1]))
        assert np.abs(w).max() <= bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound           # uniform, not normal
    up_bias = np.asarray(torch_m.encoder[0].ffn.up.bias[...])
    assert np.abs(up_bias).max() <= 1 / 8 and up_bias.std() > 0.02     # flax: zeros
    assert not np.allclose(torch_m.head.kernel[...], flax_m.head.kernel[...])

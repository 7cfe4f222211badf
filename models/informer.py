"""Informer (Zhou et al. 2021, AAAI): an encoder with self-attention distilling and a
generative decoder for long-sequence time-series forecasting, after the authors' code
(zhouhaoyi/Informer2020, `models/model.py`, `embed.py`, `encoder.py`, `decoder.py`).

    x_enc [B, Ls, C_in], mark_enc [B, Ls, F]  -> embed -> (mixer layer -> distil) x (e_layers - 1)
                                                -> mixer layer -> LayerNorm        = memory
    x_dec [B, Ld, C_in] (label_len known steps, then pred_len zeros), mark_dec [B, Ld, F]
                                              -> embed -> decoder layers (masked self-mixer,
                                                 cross-attention to memory, FFN) -> LayerNorm
                                              -> Linear -> last pred_len steps  [B, pred_len, c_out]

Embedding = value (Conv1d k3 circular, no bias) + sinusoidal position + time features, then
dropout. Time features: `embed: timeF` a linear map of float features; `fixed` (sinusoidal
tables, not trained) or `learned` embeddings of integer month, day, weekday, hour (and minute
// 15 with `freq: t`). Layers are post-norm, as the reference: x = LN(x + drop(mixer(x))), then
LN(x + FFN(x)) with FFN = Linear d_ff -> activation -> Linear (the code's 1x1 convolutions).
Distilling between encoder layers: Conv1d k3 circular -> BatchNorm -> ELU -> MaxPool(3, 2, pad 1)
halves the length. The encoder's and decoder's self-mixers are registry specs
(`encoder_mixer`, `decoder_mixer`): probsparse, attention, gla, mamba, pooling; the encoder
defaults to `causal: false`, the decoder to `causal: true`. Cross-attention is full softmax
attention with dropout on its weights, as the reference. LayerNorms use torch's epsilon (1e-5).
`init: torch` re-draws every Linear and Conv (the mixers' too) as torch's defaults, uniform
+-1/sqrt(fan_in) for weights and biases, instead of flax's LeCun normal with zero biases.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixers import build_mixer
from mixers.base import dense
from mixers.registry import mixer_config
from models.lm import DTYPES

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu}
MARK_SIZES = (13, 32, 7, 24, 4)          # month, day, weekday, hour, minute // 15


def _default_encoder():
    return {"type": "probsparse", "factor": 5, "n_heads": 8}


def _default_decoder():
    return {"type": "probsparse", "factor": 5, "n_heads": 8, "query_selection": "global"}


@dataclasses.dataclass(frozen=True)
class InformerConfig:
    enc_in: int = 7                   # set from the data by training.ett
    dec_in: int = 7
    c_out: int = 7
    pred_len: int = 24
    d_model: int = 512
    d_ff: int = 2048
    e_layers: int = 2
    d_layers: int = 1
    cross_heads: int = 8
    dropout: float = 0.05
    activation: str = "gelu"
    distil: bool = True
    embed: str = "timeF"              # timeF | fixed | learned
    freq: str = "h"                   # h: 4 timeF features; t (minutes): 5
    encoder_mixer: dict = dataclasses.field(default_factory=_default_encoder)
    decoder_mixer: dict = dataclasses.field(default_factory=_default_decoder)
    dtype: str = "float32"
    init: str = "flax"                # flax (LeCun normal, zero bias) | torch (the reference's)
    type: str = "informer"

    def specs(self) -> tuple[dict, dict]:
        """Encoder and decoder mixer specs with the default directions filled in."""
        return ({"causal": False, **self.encoder_mixer}, {"causal": True, **self.decoder_mixer})

    def layer_specs(self, path: str = "model") -> list[tuple[str, dict]]:
        enc, dec = self.specs()
        return [("encoder", enc)] * self.e_layers + [("decoder", dec)] * self.d_layers

    def validate(self, path: str = "model") -> None:
        for key in ("enc_in", "dec_in", "c_out", "pred_len", "d_model", "d_ff", "e_layers",
                    "d_layers", "cross_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key}: must be >= 1, got {getattr(self, key)}")
        choices = {"activation": tuple(ACTIVATIONS), "embed": ("timeF", "fixed", "learned"),
                   "freq": ("h", "t"), "dtype": tuple(DTYPES), "init": ("flax", "torch")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"{path}.{key}: must be one of {valid}, got "
                                 f"{getattr(self, key)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        if self.d_model % self.cross_heads:
            raise ValueError(f"{path}.cross_heads: {self.cross_heads} does not divide d_model="
                             f"{self.d_model}")
        enc, dec = self.specs()
        mixer_config(enc, d_model=self.d_model, path=f"{path}.encoder_mixer")
        mixer_config(dec, d_model=self.d_model, path=f"{path}.decoder_mixer")

    @property
    def n_time_features(self) -> int:
        return 5 if self.freq == "t" else 4


def sinusoid_table(n: int, d: int) -> jax.Array:
    """[n, d] table: sin at even, cos at odd channels (Vaswani et al.)."""
    pos = jnp.arange(n, dtype=jnp.float32)[:, None]
    div = jnp.exp(jnp.arange(0, d, 2, dtype=jnp.float32) * -(math.log(10000.0) / d))
    table = jnp.zeros((n, d), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * div))
    return table.at[:, 1::2].set(jnp.cos(pos * div)[:, : d // 2])


def layer_norm(d: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    """LayerNorm with torch's epsilon (1e-5), as the reference."""
    return nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs, dtype=dtype)


def torch_init(module: nnx.Module, rngs: nnx.Rngs, skip=()) -> None:
    """Re-draw every Linear and Conv under `module` (mixers included) as torch's defaults do:
    weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`kaiming_uniform_(a=sqrt(5))`; a third
    of the variance of LeCun normal). Modules in `skip` keep their init."""
    skip = {id(m) for m in skip}
    for _, m in nnx.iter_modules(module):
        if not isinstance(m, (nnx.Linear, nnx.Conv)) or id(m) in skip:
            continue
        shape = m.kernel.shape
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))       # fan_in: [k..., in, out]
        for p in (m.kernel, m.bias):
            if p is not None:
                p[...] = jax.random.uniform(rngs.params(), p.shape, p.dtype,
                                             -bound, bound)


def circular_pad(x_BLC, pad: int = 1):
    return jnp.concatenate([x_BLC[:, -pad:], x_BLC, x_BLC[:, :pad]], axis=1)


class DataEmbedding(nnx.Module):
    """Value (circular Conv1d k3) + position + time-feature embedding, then dropout."""

    def __init__(self, c_in: int, cfg: InformerConfig, *, rngs: nnx.Rngs, dtype=None):
        d = cfg.d_model
        self.embed_kind, self.freq = cfg.embed, cfg.freq
        kaiming = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.value = nnx.Conv(c_in, d, 3, padding="VALID", use_bias=False, kernel_init=kaiming,
                              dtype=dtype, rngs=rngs)
        self.time = nnx.data(None)
        self.tables = nnx.data(None)
        if cfg.embed == "timeF":
            self.time = dense(cfg.n_time_features, d, (None, "embed"), rngs=rngs, dtype=dtype)
        elif cfg.embed == "learned":
            self.tables = nnx.List([nnx.Embed(n, d, rngs=rngs, dtype=dtype) for n in MARK_SIZES])
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def _time(self, mark, d):
        if self.embed_kind == "timeF":
            return self.time(mark)
        used = range(5 if self.freq == "t" else 4)
        if self.embed_kind == "fixed":             # constant tables: nothing to train
            return sum(sinusoid_table(MARK_SIZES[i], d)[mark[..., i]] for i in used)
        return sum(self.tables[i](mark[..., i]) for i in used)

    def __call__(self, x_BLC, mark_BLF, *, train: bool):
        v = self.value(circular_pad(x_BLC))
        d = v.shape[-1]
        x = v + sinusoid_table(x_BLC.shape[1], d).astype(v.dtype) + self._time(mark_BLF, d)
        return self.dropout(x, deterministic=not train)


class FeedForward(nnx.Module):
    """Linear d_model -> d_ff -> activation -> dropout -> Linear -> dropout."""

    def __init__(self, cfg: InformerConfig, *, rngs: nnx.Rngs, dtype=None):
        self.up = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                        use_bias=True)
        self.down = dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                          use_bias=True)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, *, train: bool):
        y = self.dropout(self.act(self.up(x)), deterministic=not train)
        return self.dropout(self.down(y), deterministic=not train)


class CrossAttention(nnx.Module):
    """Full multi-head attention of decoder queries over the encoder memory (dropout on the
    attention weights, as the reference's FullAttention)."""

    def __init__(self, cfg: InformerConfig, *, rngs: nnx.Rngs, dtype=None):
        d, self.n_heads = cfg.d_model, cfg.cross_heads
        kw = dict(rngs=rngs, dtype=dtype, use_bias=True)
        self.q_proj = dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = dense(d, d, ("embed", "heads"), **kw)
        self.o_proj = dense(d, d, ("heads", "embed"), **kw)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BQD, memory_BKD, *, train: bool):
        heads = lambda t: t.reshape(*t.shape[:2], self.n_heads, -1)
        q, k, v = heads(self.q_proj(x_BQD)), heads(self.k_proj(memory_BKD)), \
            heads(self.v_proj(memory_BKD))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
        p = self.dropout(jax.nn.softmax(s, axis=-1), deterministic=not train)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
        return self.o_proj(o.reshape(*x_BQD.shape[:2], -1))


class EncoderLayer(nnx.Module):
    def __init__(self, spec: dict, cfg: InformerConfig, *, rngs: nnx.Rngs, dtype=None):
        d = cfg.d_model
        self.mixer = build_mixer(spec, d_model=d, rngs=rngs, dtype=dtype,
                                 path="model.encoder_mixer")
        self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, *, train: bool):
        x = self.norm1(x + self.dropout(self.mixer(x), deterministic=not train))
        return self.norm2(x + self.ffn(x, train=train))


class DistilLayer(nnx.Module):
    """Conv1d k3 circular -> BatchNorm -> ELU -> MaxPool(3, stride 2, pad 1): L -> ceil(L/2)."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = nnx.Conv(d, d, 3, padding="VALID", rngs=rngs, dtype=dtype)
        self.norm = nnx.BatchNorm(d, momentum=0.9, epsilon=1e-5, rngs=rngs, dtype=dtype)

    def __call__(self, x_BLD, *, train: bool):
        y = jax.nn.elu(self.norm(self.conv(circular_pad(x_BLD)), use_running_average=not train))
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 1), (1, 2, 1),
                                     ((0, 0), (1, 1), (0, 0)))


class DecoderLayer(nnx.Module):
    def __init__(self, spec: dict, cfg: InformerConfig, *, rngs: nnx.Rngs, dtype=None):
        d = cfg.d_model
        self.mixer = build_mixer(spec, d_model=d, rngs=rngs, dtype=dtype,
                                 path="model.decoder_mixer")
        self.cross = CrossAttention(cfg, rngs=rngs, dtype=dtype)
        self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
        self.norm3 = layer_norm(d, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, memory, *, train: bool):
        drop = lambda t: self.dropout(t, deterministic=not train)
        x = self.norm1(x + drop(self.mixer(x)))
        x = self.norm2(x + drop(self.cross(x, memory, train=train)))
        return self.norm3(x + self.ffn(x, train=train))


class Informer(nnx.Module):
    """Informer forecaster; see the module docstring. Call with
    (x_enc, mark_enc, x_dec, mark_dec, train=...) -> [B, pred_len, c_out] float32."""

    def __init__(self, cfg: InformerConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        enc_spec, dec_spec = cfg.specs()
        self.enc_embed = DataEmbedding(cfg.enc_in, cfg, rngs=rngs, dtype=dtype)
        self.dec_embed = DataEmbedding(cfg.dec_in, cfg, rngs=rngs, dtype=dtype)
        self.encoder = nnx.List([EncoderLayer(enc_spec, cfg, rngs=rngs, dtype=dtype)
                                 for _ in range(cfg.e_layers)])
        n_distil = cfg.e_layers - 1 if cfg.distil else 0
        self.distil = nnx.List([DistilLayer(cfg.d_model, rngs=rngs, dtype=dtype)
                                for _ in range(n_distil)])
        self.enc_norm = layer_norm(cfg.d_model, rngs=rngs, dtype=dtype)
        self.decoder = nnx.List([DecoderLayer(dec_spec, cfg, rngs=rngs, dtype=dtype)
                                 for _ in range(cfg.d_layers)])
        self.dec_norm = layer_norm(cfg.d_model, rngs=rngs, dtype=dtype)
        self.head = dense(cfg.d_model, cfg.c_out, ("embed", None), rngs=rngs, dtype=dtype,
                          use_bias=True)
        if cfg.init == "torch":        # the value convolutions keep the reference's kaiming normal
            torch_init(self, rngs, skip=(self.enc_embed.value, self.dec_embed.value))

    def encode(self, x_enc, mark_enc, *, train: bool = False):
        """[B, Ls, C_in] -> memory [B, Ls / 2^(e_layers - 1), d_model] (with distilling)."""
        x = self.enc_embed(x_enc, mark_enc, train=train)
        for i, layer in enumerate(self.encoder):
            x = layer(x, train=train)
            if i < len(self.distil):
                x = self.distil[i](x, train=train)
        return self.enc_norm(x)

    def __call__(self, x_enc, mark_enc, x_dec, mark_dec, *, train: bool = False):
        memory = self.encode(x_enc, mark_enc, train=train)
        x = self.dec_embed(x_dec, mark_dec, train=train)
        for layer in self.decoder:
            x = layer(x, memory, train=train)
        out = self.head(self.dec_norm(x))
        return out[:, -self.cfg.pred_len:].astype(jnp.float32)

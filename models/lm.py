"""Decoder-only language model with a mixer chosen per layer: embed -> blocks -> norm -> head.

tokens [B, L] int -> logits [B, L, vocab] (float32). The `layers:` list names a spec of the
`mixers:` table for each layer; a shorter list repeats to fill `n_layers`, e.g.
[gla, gla, gla, attn] gives a 3:1 hybrid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mixers.base import axis_metadata
from mixers.registry import mixer_config
from models.blocks import Block, rms_norm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    layers: list | None = None
    mixers: dict | None = None
    mlp_ratio: float = 4.0               # SwiGLU hidden = 2/3 * mlp_ratio * d_model, rounded to 8
    mlp_hidden: int | None = None        # overrides mlp_ratio; 0 drops the MLPs
    tie_embeddings: bool = True
    embed_lookup: str = "auto"           # "gather", "one_hot", or "auto": one_hot up to 4096 tokens
    dtype: str = "float32"               # compute dtype; parameters stay float32
    type: str = "lm"

    def layer_specs(self, path: str = "model") -> list[tuple[str, dict]]:
        """The (name, spec) of every layer; ValueError naming the key path when inconsistent."""
        mixers = self.mixers or {}
        layers = self.layers
        if not layers:
            raise ValueError(f"{path}.layers: must list at least one mixer name "
                             f"(from {path}.mixers: {sorted(mixers)})")
        if self.n_layers < 1:
            raise ValueError(f"{path}.n_layers: must be >= 1, got {self.n_layers}")
        if len(layers) > self.n_layers or self.n_layers % len(layers):
            raise ValueError(f"{path}.layers: {len(layers)} names cannot fill n_layers="
                             f"{self.n_layers} (give a pattern whose length divides it, "
                             "or one name per layer)")
        names = list(layers) * (self.n_layers // len(layers))
        for i, name in enumerate(names):
            if name not in mixers:
                raise ValueError(f"{path}.layers[{i % len(layers)}]: {name!r} (layer {i}) is not "
                                 f"in {path}.mixers; defined: {sorted(mixers)}")
        return [(name, mixers[name]) for name in names]

    @property
    def one_hot_embed(self) -> bool:
        """Token embedding as one_hot(tokens) @ table instead of a gather. The gather's gradient is
        a scatter-add of every token's row into a [vocab, d_model] table; with a small vocabulary
        each row collects thousands of colliding updates. On an H200 the largest kernel of a
        hybrid_3to1_gpu step (byte vocabulary, 65k tokens per step) was a scatter fusion: 77 of
        the 166 ms (docs/BENCHMARKS.md). The embedding gradient is the model's only scatter with
        repeated indices. As a matmul the gradient is one_hot^T @ grad on the tensor cores."""
        if self.embed_lookup == "auto":
            return self.vocab_size <= 4096
        return self.embed_lookup == "one_hot"

    def validate(self, path: str = "model") -> None:
        if self.embed_lookup not in ("auto", "gather", "one_hot"):
            raise ValueError(f"{path}.embed_lookup: must be one of ['auto', 'gather', 'one_hot'], "
                             f"got {self.embed_lookup!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{path}.dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for key in ("vocab_size", "d_model"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key}: must be >= 1, got {getattr(self, key)}")
        for name, spec in (self.mixers or {}).items():
            mixer_config(spec, d_model=self.d_model, path=f"{path}.mixers.{name}")
        self.layer_specs(path)

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return int(round(2 / 3 * self.mlp_ratio * self.d_model / 8)) * 8


class LanguageModel(nnx.Module):
    """Decoder-only LM; see the module docstring. `decode` runs one token with per-layer caches."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs,
                               embedding_init=nnx.initializers.normal(1.0),
                               embedding_metadata=axis_metadata("vocab", "embed"))
        self.blocks = nnx.List([
            Block(spec, d_model=cfg.d_model, mlp_hidden=cfg.hidden, rngs=rngs, dtype=dtype,
                  path=f"model.mixers.{name}")
            for name, spec in cfg.layer_specs()])
        self.norm = rms_norm(cfg.d_model, rngs=rngs, dtype=dtype)
        self.head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype,
                                   rngs=rngs, kernel_metadata=axis_metadata("embed", "vocab"))

    def _logits(self, x):
        x = self.norm(x)
        if self.head is not None:
            return self.head(x).astype(jnp.float32)
        return self.embed.attend(x).astype(jnp.float32) / jnp.sqrt(self.cfg.d_model)

    def _embed(self, tokens):
        if not self.cfg.one_hot_embed:
            return self.embed(tokens)
        dtype = DTYPES[self.cfg.dtype]
        table = self.embed.embedding[...].astype(dtype)
        return jax.nn.one_hot(tokens, self.cfg.vocab_size, dtype=dtype) @ table

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x, segment_ids=segment_ids, positions=positions)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_length: int):
        dtype = DTYPES[self.cfg.dtype]
        return [block.init_cache(batch_size, max_length, dtype) for block in self.blocks]

    def decode(self, tokens_B1, caches):
        """One token per sequence: tokens [B, 1] -> (logits [B, 1, vocab], caches)."""
        x = self._embed(tokens_B1)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode(x, cache)
            new.append(cache)
        return self._logits(x), new


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

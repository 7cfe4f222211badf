"""Models assembled from config: `build_model(cfg["model"], rngs=nnx.Rngs(0))`.

Types: "lm" (LanguageModel, decoder-only with a mixer per layer), "informer" (Informer
forecaster: distilling encoder, generative decoder).
"""

from __future__ import annotations

from flax import nnx

from mixers.registry import parse_config
from models.informer import Informer, InformerConfig
from models.lm import LanguageModel, LMConfig, count_params

MODEL_TYPES = {"lm": (LMConfig, LanguageModel), "informer": (InformerConfig, Informer)}


def model_config(model_cfg: dict, path: str = "model"):
    """Validate a model section; returns its config dataclass."""
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: must be a mapping")
    kind = model_cfg.get("type", "lm")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{path}.type: unknown model type {kind!r}; valid: {sorted(MODEL_TYPES)}")
    config_cls, _ = MODEL_TYPES[kind]
    cfg = parse_config(config_cls, model_cfg, path, skip=())
    cfg.validate(path)
    return cfg


def build_model(model_cfg: dict, *, rngs: nnx.Rngs):
    """Build the model a config's `model:` section describes."""
    cfg = model_config(model_cfg)
    _, model_cls = MODEL_TYPES[cfg.type]
    return model_cls(cfg, rngs=rngs)


__all__ = ["Informer", "InformerConfig", "LMConfig", "LanguageModel", "MODEL_TYPES", "build_model",
           "count_params", "model_config"]

"""Build mixers by name from config specs: `build_mixer({"type": "gla", "n_heads": 4}, ...)`.

Each registered type pairs a frozen config dataclass (the valid keys and their defaults) with a
Mixer class. Unknown types, unknown keys, wrong types and impossible values raise ValueError naming
the key path and, for unknown names, the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from flax import nnx

from mixers.base import ConfigError, Mixer, MixerConfig

_REGISTRY: dict[str, tuple[type[MixerConfig], type[Mixer]]] = {}


def register_mixer(name: str, config_cls: type[MixerConfig], mixer_cls: type[Mixer]) -> None:
    """Make `name` buildable from specs; config_cls lists its keys."""
    _REGISTRY[name] = (config_cls, mixer_cls)


def mixer_types() -> list[str]:
    return sorted(_REGISTRY)


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, {})          # dataclass fields use postponed annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def parse_config(config_cls, spec: dict, path: str, *, skip=("type",)):
    """Check `spec` against the fields of `config_cls` and build it; errors name `path.key`."""
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: must be a mapping, got {type(spec).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in spec.items():
        if key in skip:
            continue
        if key not in fields:
            raise ValueError(f"{path}.{key}: unknown key; valid keys: {sorted(fields)}")
        if not _type_ok(value, fields[key].type):
            raise ValueError(f"{path}.{key}: expected {fields[key].type}, got {value!r}")
    return config_cls(**{k: v for k, v in spec.items() if k not in skip})


def mixer_config(spec: dict, *, d_model: int, path: str = "mixer") -> MixerConfig:
    """Validate a spec and return its config dataclass (no parameters are created)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{path}: a mixer spec needs a 'type'; valid types: {mixer_types()}")
    if spec["type"] not in _REGISTRY:
        raise ValueError(f"{path}.type: unknown mixer type {spec['type']!r}; "
                         f"valid types: {mixer_types()}")
    config_cls, _ = _REGISTRY[spec["type"]]
    cfg = parse_config(config_cls, spec, path)
    try:
        cfg.validate(d_model)
    except ConfigError as e:
        raise ValueError(f"{path}.{e.key}: {e.message}") from None
    return cfg


def build_mixer(spec: dict, *, d_model: int, rngs: nnx.Rngs, dtype=None,
                path: str = "mixer") -> Mixer:
    """Build the mixer named by spec['type'] with the other keys as its config."""
    cfg = mixer_config(spec, d_model=d_model, path=path)
    _, mixer_cls = _REGISTRY[spec["type"]]
    return mixer_cls(cfg, d_model=d_model, rngs=rngs, dtype=dtype)

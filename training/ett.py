"""Long-sequence time-series forecasting on ETT-format CSVs (Zhou et al. 2021, "Informer").

A CSV with a `date` column (first) and numeric columns; the target (`data.target`, default `OT`)
is moved last. One example is a window at start s of the split's rows:

    x_enc = rows[s : s + seq_len]                                          [seq_len, C_in]
    x_dec = rows[s + seq_len - label_len : s + seq_len], then pred_len zeros  [label + pred, C_in]
    y     = rows[s + seq_len : s + seq_len + pred_len] (target column only for S/MS)  [pred, C_out]

with time features for both windows: `mark_*` float (timeF: hour-of-day, day-of-week,
day-of-month, day-of-year, and minute-of-hour first for sub-hourly data, each scaled to
[-0.5, 0.5]) and `mark_*_int` int (month, day, weekday, hour, minute // 15).

Splits (Informer's): ETTh* files 12/4/4 months, rows [0, 8640), [8640 - seq_len, 11520),
[11520 - seq_len, 14400); ETTm* the same x 4; other CSVs 70/10/20 (validation and test start
seq_len rows early so that their first window predicts the split's first row). A standard
scaler is fitted on the training rows only (`data.scale_fit: all` fits it on every row of the
file instead, as the authors' first code releases did: see docs/RESULTS.md); metrics (MSE, MAE)
are on the scaled data, as the paper reports. Training batches: a permutation per epoch, the
last partial batch dropped (as the reference); evaluation passes over every window in order
and keeps the last partial batch (the reference's drop_last on the test set skipped up to
batch_size - 1 windows).

Without `data.path` the source is a synthetic hourly series (see `synthetic_series`), so
`python train.py --config informer.yaml` needs no download.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from training.config import ConfigError, ETTDataConfig

SPLITS = ("train", "eval", "test")


def read_csv(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(column names without `date`, dates datetime64[m] [N], values float64 [N, C])."""
    lines = Path(os.path.expanduser(path)).read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].split(",")]
    if header[0].lower() != "date":
        raise ConfigError(f"data.path: {path} must have `date` as its first column, got "
                          f"{header[0]!r}")
    rows = [line.split(",") for line in lines[1:] if line.strip()]
    try:
        dates = np.array([r[0].strip() for r in rows], dtype="datetime64[m]")
        values = np.array([[float(x) for x in r[1:]] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise ConfigError(f"data.path: {path} is not an ETT-format CSV ({e})") from None
    return header[1:], dates, values


def synthetic_series(length: int = 17420, seed: int = 0):
    """A documented stand-in for ETTh1: hourly from 2016-07-01, 7 channels (6 loads + `OT`).

    Each load channel c is a sum of daily (24 h), half-daily, weekly (168 h) and yearly
    (8766 h) sinusoids with random amplitudes and phases, a slowly mean-reverting level
    (AR(1), phi 0.999, std about 0.45) and AR(1) noise (phi 0.8, std 0.5); `OT` is a lagged mix
    of the loads plus its own yearly cycle and noise, so the multivariate input helps predict
    it. Deterministic given `seed`.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    dates = np.datetime64("2016-07-01T00:00", "m") + (t * 60).astype("timedelta64[m]")
    loads = []
    for _ in range(6):
        amp = rng.uniform(0.3, 1.5, 4)
        ph = rng.uniform(0, 2 * np.pi, 4)
        season = sum(a * np.sin(2 * np.pi * t / p + f)
                     for a, p, f in zip(amp, (24.0, 12.0, 168.0, 8766.0), ph, strict=True))
        level, noise = np.zeros(length), np.zeros(length)
        eps_level, eps = rng.normal(0, 0.02, length), rng.normal(0, 0.3, length)
        for i in range(1, length):
            level[i] = 0.999 * level[i - 1] + eps_level[i]
            noise[i] = 0.8 * noise[i - 1] + eps[i]
        loads.append(rng.uniform(2, 10) + season + level + noise)
    loads = np.stack(loads, axis=1)
    mix = rng.normal(0, 1, 6)
    ot = 20 + np.roll(loads @ mix, 3) + 8 * np.sin(2 * np.pi * t / 8766.0) + \
        rng.normal(0, 0.5, length)
    cols = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    return cols, dates, np.concatenate([loads, ot[:, None]], axis=1)


def time_features(dates) -> tuple[np.ndarray, np.ndarray]:
    """(timeF float32 [N, 4 or 5] in [-0.5, 0.5], integer marks int32 [N, 5])."""
    d = dates.astype("datetime64[m]")
    days = d.astype("datetime64[D]")
    month = (d.astype("datetime64[M]") - d.astype("datetime64[Y]")).astype(int) + 1
    day = (days - d.astype("datetime64[M]")).astype(int) + 1
    weekday = (days.astype(int) + 3) % 7                     # 1970-01-01 was a Thursday
    hour = (d.astype("datetime64[h]") - days).astype(int)
    minute = (d - d.astype("datetime64[h]")).astype(int)
    day_of_year = (days - d.astype("datetime64[Y]")).astype(int) + 1
    feats = [hour / 23 - 0.5, weekday / 6 - 0.5, (day - 1) / 30 - 0.5, (day_of_year - 1) / 365
             - 0.5]
    if is_sub_hourly(dates):
        feats.insert(0, minute / 59 - 0.5)
    marks = np.stack([month, day, weekday, hour, minute // 15], axis=1).astype(np.int32)
    return np.stack(feats, axis=1).astype(np.float32), marks


def is_sub_hourly(dates) -> bool:
    return len(dates) > 1 and np.median(np.diff(dates.astype("datetime64[m]")).astype(int)) < 60


def split_borders(n: int, seq_len: int, kind: str) -> list[tuple[int, int]]:
    """Row ranges of train, validation and test (Informer's Dataset_ETT_* / Dataset_Custom)."""
    if kind in ("etth", "ettm"):
        month = 30 * 24 * (4 if kind == "ettm" else 1)
        ends = [12 * month, 16 * month, 20 * month]
        if n < ends[-1]:
            raise ConfigError(f"data.split: {kind!r} needs {ends[-1]} rows, the file has {n}")
    else:
        n_train, n_test = int(n * 0.7), int(n * 0.2)
        ends = [n_train, n - n_test, n]
    starts = [0, ends[0] - seq_len, ends[1] - seq_len]
    return list(zip(starts, ends, strict=True))


class ETTData:
    """Forecasting windows of an ETT-format series; see the module docstring."""

    test_splits = ("test",)

    def __init__(self, cfg: ETTDataConfig, seq_len: int, seed: int):
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.label_len, self.pred_len = cfg.label_len, cfg.pred_len
        if cfg.path is None:
            cols, dates, values = synthetic_series(cfg.synthetic_length, cfg.synthetic_seed)
            name = "ETTh-synthetic"
        else:
            cols, dates, values = read_csv(cfg.path)
            name = Path(cfg.path).name
        if cfg.target not in cols:
            raise ConfigError(f"data.target: {cfg.target!r} is not a column; columns: {cols}")
        order = [c for c in cols if c != cfg.target] + [cfg.target]
        values = values[:, [cols.index(c) for c in order]]
        if cfg.features == "S":
            values = values[:, -1:]
        self.columns = order if cfg.features != "S" else [cfg.target]
        kind = cfg.split
        if kind == "auto":
            kind = "etth" if name.startswith("ETTh") else "ettm" if name.startswith("ETTm") \
                else "ratio"
        borders = split_borders(len(values), seq_len, kind)
        fit = slice(*borders[0]) if cfg.scale_fit == "train" else slice(None)
        self.mean, self.std = values[fit].mean(0), values[fit].std(0)
        if cfg.scale:
            values = (values - self.mean) / np.where(self.std > 0, self.std, 1.0)
        marks_f, marks_i = time_features(dates)
        self.sub_hourly = is_sub_hourly(dates)
        self.splits = {}
        for split, (lo, hi) in zip(SPLITS, borders, strict=True):
            n = hi - lo - seq_len - self.pred_len + 1
            if n < 1:
                raise ConfigError(f"train.seq_len: {seq_len} + data.pred_len {self.pred_len} "
                                  f"is longer than the {split} split ({hi - lo} rows)")
            self.splits[split] = (values[lo:hi].astype(np.float32), marks_f[lo:hi],
                                  marks_i[lo:hi], n)
        self.c_in = values.shape[1]
        self.c_out = 1 if cfg.features in ("S", "MS") else self.c_in

    # -- the model's sizes come from the data -------------------------------------------------
    def configure_model(self, model_cfg: dict) -> dict:
        """Fill the model's input/output sizes from the data; ConfigError on a mismatch."""
        sizes = {"enc_in": self.c_in, "dec_in": self.c_in, "c_out": self.c_out,
                 "pred_len": self.pred_len, "freq": "t" if self.sub_hourly else "h"}
        out = dict(model_cfg)
        for key, value in sizes.items():
            if out.get(key) is not None and out[key] != value:
                raise ConfigError(f"model.{key}: {out[key]!r} does not match the data "
                                  f"({value!r}, from data.features={self.cfg.features!r}); "
                                  "leave it unset")
            out[key] = value
        return out

    # -- batches ------------------------------------------------------------------------------
    def num_windows(self, split: str) -> int:
        return self.splits[split][3]

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(self.num_windows("train") // batch_size, 1)

    def windows(self, split: str, starts, n_valid: int | None = None) -> dict:
        """The examples at `starts`; those after the first `n_valid` get weight 0 (padding)."""
        values, marks_f, marks_i, _ = self.splits[split]
        s, lab, pred = self.seq_len, self.label_len, self.pred_len
        enc = np.stack([np.arange(i, i + s) for i in starts])
        dec = np.stack([np.arange(i + s - lab, i + s + pred) for i in starts])
        x_dec = values[dec].copy()
        x_dec[:, lab:] = 0.0
        y = values[dec[:, lab:]][..., -self.c_out:]
        weight = (np.arange(len(starts)) < (len(starts) if n_valid is None else n_valid))
        return {"weight": weight.astype(np.float32), "x_enc": values[enc],
                "mark_enc": marks_f[enc], "mark_enc_int": marks_i[enc], "x_dec": x_dec,
                "mark_dec": marks_f[dec], "mark_dec_int": marks_i[dec], "y": y}

    def batch(self, step: int, batch_size: int, split: str = "train") -> dict:
        """Training: shuffled per epoch, full batches. Other splits: windows in order."""
        n = self.num_windows(split)
        if split == "train":
            per_epoch = self.steps_per_epoch(batch_size)
            epoch, i = divmod(step, per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            starts = perm[i * batch_size:(i + 1) * batch_size]
        else:
            starts = (np.arange(batch_size) + step * batch_size) % n
        return self.windows(split, starts)

    def eval_batches(self, batch_size: int, split: str = "eval"):
        """Every window of the split in order. The last batch is padded to batch_size with
        weight-0 copies (one compiled shape; the metrics count only the real windows)."""
        n = self.num_windows(split)
        for lo in range(0, n, batch_size):
            starts = np.minimum(np.arange(lo, lo + batch_size), n - 1)
            yield self.windows(split, starts, n_valid=min(batch_size, n - lo))

    # -- the task -----------------------------------------------------------------------------
    def loss(self, model, batch, train: bool = True):
        """MSE loss; metrics MSE and MAE on the scaled data (weighted by `weight`)."""
        suffix = "" if model.cfg.embed == "timeF" else "_int"
        pred = model(batch["x_enc"], batch["mark_enc" + suffix], batch["x_dec"],
                     batch["mark_dec" + suffix], train=train)
        err = pred.astype(jnp.float32) - batch["y"]
        w = batch["weight"]
        mean = lambda e_B: (e_B * w).sum() / jnp.maximum(w.sum(), 1.0)
        mse, mae = mean((err ** 2).mean((1, 2))), mean(jnp.abs(err).mean((1, 2)))
        return mse, {"mse": mse, "mae": mae}

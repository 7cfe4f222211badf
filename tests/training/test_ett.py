"""ETT-format data (splits, scaler, features, time features, evaluation keeping every window)
and an end-to-end Informer training run with epochs, the halving schedule, early stopping and
a final test evaluation."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from training import load_config
from training.config import ConfigError, ETTDataConfig, TrainConfig
from training.ett import ETTData, synthetic_series, time_features
from training.loop import Trainer, make_optimizer

ETTH1 = Path(__file__).parents[3] / "shared" / "data" / "ETT" / "ETTh1.csv"
needs_etth1 = pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")


@needs_etth1
def test_etth1_splits_and_scaler_fitted_on_train_only():
    data = ETTData(ETTDataConfig(path=str(ETTH1), pred_len=24), seq_len=96, seed=0)
    # Informer's borders: [0, 8640), [8640 - 96, 11520), [11520 - 96, 14400).
    assert [data.num_windows(s) for s in ("train", "eval", "test")] == [8521, 2857, 2857]
    train_rows = data.splits["train"][0]
    np.testing.assert_allclose(train_rows.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train_rows.std(0), 1, atol=1e-4)
    assert np.abs(data.splits["test"][0].mean(0)).max() > 0.1     # not refitted on test
    assert data.columns[-1] == "OT" and data.c_in == data.c_out == 7
    b = data.windows("eval", [0])
    np.testing.assert_array_equal(b["x_enc"][0, -1], data.splits["eval"][0][95])
    np.testing.assert_array_equal(b["y"][0, 0], data.splits["eval"][0][96])   # row 8640


@needs_etth1
def test_scale_fit_all_uses_every_row_of_the_file():
    """`data.scale_fit: all` (the authors' first releases): statistics of the whole file."""
    data = ETTData(ETTDataConfig(path=str(ETTH1), scale_fit="all"), seq_len=96, seed=0)
    raw = np.loadtxt(ETTH1, delimiter=",", skiprows=1, usecols=range(1, 8))
    np.testing.assert_allclose(data.std, raw.std(0), rtol=1e-6)
    train = data.splits["train"][0]
    np.testing.assert_allclose(train[:, 0], (raw[:8640, 0] - raw[:, 0].mean()) / raw[:, 0].std(),
                               rtol=1e-4, atol=1e-4)
    assert np.abs(train.std(0) - 1).max() > 0.05           # not the training rows' scaling
    with pytest.raises(ConfigError, match="data.scale_fit"):
        ETTDataConfig(path=str(ETTH1), scale_fit="test").validate()


def test_features_target_and_decoder_input(tmp_path):
    cols, dates, values = synthetic_series(600, seed=1)
    csv = tmp_path / "custom.csv"
    lines = ["date," + ",".join(["OT"] + cols[:-1])]            # target first: moved last
    for d, row in zip(dates, values, strict=True):
        lines.append(f"{str(d).replace('T', ' ')}:00," + ",".join(
            f"{x:.6f}" for x in [row[-1], *row[:-1]]))
    csv.write_text("\n".join(lines) + "\n")
    for features, c_in, c_out in (("M", 7, 7), ("S", 1, 1), ("MS", 7, 1)):
        data = ETTData(ETTDataConfig(path=str(csv), features=features, label_len=8,
                                     pred_len=4), seq_len=16, seed=0)
        n = len(values)                                           # ratio split 70/10/20
        assert data.num_windows("train") == int(n * 0.7) - 16 - 4 + 1
        b = data.batch(0, 5)
        assert b["x_enc"].shape == (5, 16, c_in) and b["y"].shape == (5, 4, c_out)
        assert b["x_dec"].shape == (5, 12, c_in) and not b["x_dec"][:, 8:].any()
        np.testing.assert_array_equal(b["x_dec"][:, :8], b["x_enc"][:, -8:])
        assert data.configure_model({})["enc_in"] == c_in
    with pytest.raises(ConfigError, match="data.target: 'load'"):
        ETTData(ETTDataConfig(path=str(csv), target="load"), seq_len=16, seed=0)
    with pytest.raises(ConfigError, match="model.c_out: 3 does not match"):
        data.configure_model({"c_out": 3})


def test_time_features_match_the_reference_encoding():
    dates = np.array(["2016-07-01T00:00", "2017-12-31T23:45"], dtype="datetime64[m]")
    feats, marks = time_features(dates)
    # 2016-07-01 was a Friday (weekday 4), day of year 183.
    np.testing.assert_allclose(feats[0], [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5], atol=1e-6)
    np.testing.assert_array_equal(marks, [[7, 1, 4, 0, 0], [12, 31, 6, 23, 3]])
    assert time_features(dates.repeat(3) + np.arange(6).astype("timedelta64[m]") * 15)[0] \
        .shape[1] == 5                                            # sub-hourly: minute feature


def test_evaluation_keeps_the_last_partial_batch():
    data = ETTData(ETTDataConfig(synthetic_length=3000, split="ratio"), seq_len=24, seed=0)
    n = data.num_windows("test")
    batches = list(data.eval_batches(32, "test"))
    assert n % 32 and all(len(b["y"]) == 32 for b in batches)      # one compiled shape
    assert sum(b["weight"].sum() for b in batches) == n
    assert batches[-1]["weight"].sum() == n % 32


def test_halving_schedule_matches_the_reference():
    cfg = TrainConfig(lr=1e-4, lr_schedule="halve_every_epoch")
    _, schedule = make_optimizer(cfg, steps_per_epoch=10)
    lrs = [float(schedule(s)) for s in (0, 9, 10, 19, 20, 30)]
    np.testing.assert_allclose(lrs, [1e-4, 1e-4, 1e-4, 1e-4, 5e-5, 2.5e-5])


TINY = ["model.d_model=16", "model.d_ff=32", "model.cross_heads=2",
        "model.encoder_mixer={type: probsparse, n_heads: 2}",
        "model.decoder_mixer={type: probsparse, n_heads: 2, query_selection: global}",
        "data.synthetic_length=2400", "data.split=ratio", "data.label_len=12",
        "data.pred_len=6", "train.seq_len=24", "train.batch_size=64", "train.log_every=5",
        "train.epochs=3", "train.lr=3.0e-3", "train.early_stopping_patience=3"]


def test_informer_trains_end_to_end(tmp_path):
    # dropout 0: the dropout RNG more than doubles the train step's compile time on CPU.
    trainer = Trainer(load_config("informer", TINY + ["model.dropout=0.0"]), tmp_path,
                      log=lambda *a, **k: None)
    summary = trainer.train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    per_epoch = (int(2400 * 0.7) - 24 - 6 + 1) // 64
    assert [r["step"] for r in evals] == [per_epoch * (i + 1) for i in range(3)]
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert [r["split"] for r in records][-1] == "test"
    assert np.isfinite(summary["test_mse"]) and summary["test_mse"] == summary["test_loss"]
    assert {"mse", "mae"} <= set(evals[0])
    model, _ = nnx.merge(trainer.graphdef, trainer.state)
    assert np.abs(model.distil[0].norm.mean[...]).max() > 0    # BatchNorm statistics moved


def test_early_stopping_keeps_the_best_state():
    fake = SimpleNamespace(cfg=TrainConfig(early_stopping_patience=2), best=(math.inf, None, 0))
    stops = []
    for i, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71]):
        fake.state = {"w": np.float32(i)}
        stops.append(Trainer._early_stop(fake, loss))
    assert stops == [False, False, False, False, False, True]
    assert fake.best[0] == 0.7 and float(fake.best[1]["w"]) == 3

"""The training entry point: config errors, a tiny run that learns, interruption and exact
resume, MQAR data, generation with caches, plots."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from models import build_model
from training import ConfigError, TrainingStopped, generate, load_config, train
from training.config import MQARDataConfig
from training.data import MQARData

ROOT = Path(__file__).parents[2]
TINY = ["model.d_model=32", "model.n_layers=2", "model.layers=[gla, attn]",
        "model.mixers.attn.n_heads=2", "model.mixers.attn.n_kv_heads=1",
        "model.mixers.gla.n_heads=2", "train.seq_len=32", "train.batch_size=4",
        "train.steps=24", "train.log_every=4", "train.eval_every=12", "train.eval_batches=2",
        "train.checkpoint_every=8", "train.warmup_steps=4", "train.sample_tokens=8"]


@pytest.mark.parametrize("overrides,match", [
    (["train.batch_size=0"], r"^train.batch_size: must be >= 1"),
    (["train.bath_size=4"], r"^train.bath_size: unknown key; valid keys"),
    (["train.steps=ten"], r"^train.steps: expected int"),
    (["model.mixers.attn.n_heads=3"], r"^model.mixers.attn.n_heads: 3 does not divide"),
    (["model.layers=[gla, mlp]"], r"^model.layers\[1\]: 'mlp'"),
    (["data.source=wiki"], r"^data.source: unknown source 'wiki'"),
    (["data.path=/no/such/file.txt"], r"^data.path: '/no/such/file.txt' matches no file"),
    (["optim.lr=1"], r"unknown section 'optim'"),
    (["train.dtype=float8"], r"^train.dtype"),
    (["mesh.data=0"], r"^mesh.data"),
    (["train.compiler_options=[1]"], r"^train.compiler_options: expected dict"),
    (["mesh.shard_optimizer=maybe"], r"^mesh.shard_optimizer: expected bool"),
])
def test_config_errors_name_the_key_path(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("hybrid_3to1", overrides)


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "hybrid_3to1",
                          "--set", "train.batch_size=-1", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: train.batch_size: must be >= 1, got -1"]
    assert not list(tmp_path.iterdir())                       # stopped before any work


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*hybrid_3to1"):
        load_config("hybrid_9to1")


class _Interrupt:
    """A log function that raises KeyboardInterrupt at one progress line (like Ctrl-C)."""

    def __init__(self, at_step):
        self.at, self.lines = f"step {at_step:>6}/", []

    def __call__(self, line, **_):
        self.lines.append(line)
        if line.startswith(self.at):
            raise KeyboardInterrupt


def _records(workdir, split):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def test_tiny_run_learns_is_interrupted_and_resumes_exactly(tmp_path):
    run = load_config("hybrid_3to1", TINY)
    full = train(run, tmp_path / "full", log=lambda *a, **k: None, plot=False)
    assert full["eval_loss"] < np.log(256) - 1.0          # far below a uniform guess
    train_losses = _records(tmp_path / "full", "train")
    assert train_losses[24] < train_losses[4] - 0.5
    assert (tmp_path / "full" / "config.yaml").is_file()
    assert isinstance(full["sample"], str) and full["sample"].startswith("And God said")

    interrupt = _Interrupt(12)
    part = train(run, tmp_path / "resumed", log=interrupt, plot=False)
    assert part["interrupted"] and part["step"] == 12
    assert (tmp_path / "resumed" / "checkpoints" / "12").is_dir()
    lines = []
    resumed = train(run, tmp_path / "resumed", log=lines.append, plot=False)
    assert any("resumed from" in line and "(step 12)" in line for line in lines)
    assert resumed["step"] == 24
    after = _records(tmp_path / "resumed", "train")
    for step in (16, 20, 24):
        np.testing.assert_allclose(after[step], train_losses[step], rtol=1e-5)
    np.testing.assert_allclose(resumed["eval_loss"], full["eval_loss"], rtol=1e-5)


def test_interrupt_before_the_first_log_line_saves_and_skips_the_plot(tmp_path, monkeypatch):
    """A run stopped (Ctrl-C, SIGTERM of a timeout) before any metrics row keeps its checkpoint
    and returns its summary; the loss plot is skipped instead of failing on the missing file."""
    from training import loop

    batch = loop.Trainer._device_batch

    def stop_at_step_3(self, step, split):
        if split == "train" and step == 3:
            raise KeyboardInterrupt
        return batch(self, step, split)

    monkeypatch.setattr(loop.Trainer, "_device_batch", stop_at_step_3)
    run = load_config("hybrid_3to1", TINY)
    summary = train(run, tmp_path, log=lambda *a, **k: None, plot=True)
    assert summary["interrupted"] and summary["step"] == 3
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert not (tmp_path / "metrics.jsonl").exists() and "plot" not in summary


def test_compiler_options_reach_the_steps_and_bad_names_fail_at_start(tmp_path):
    from training.loop import Trainer
    run = load_config("hybrid_3to1", TINY)
    assert Trainer(run, tmp_path / "a", log=lambda *a, **k: None).compiler_options == {}  # CPU
    run = load_config("hybrid_3to1", TINY + [
        "train.compiler_options={xla_gpu_enable_latency_hiding_scheduler: true}"])
    t = Trainer(run, tmp_path / "b", log=lambda *a, **k: None)
    assert t.compiler_options == {"xla_gpu_enable_latency_hiding_scheduler": True}
    t._train_step(t.state, t._device_batch(0, "train"))
    run = load_config("hybrid_3to1", TINY + ["train.compiler_options={xla_no_such_option: 1}"])
    with pytest.raises(ConfigError, match=r"^train.compiler_options: .*xla_no_such_option"):
        Trainer(run, tmp_path / "c", log=lambda *a, **k: None)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    run = load_config("hybrid_3to1", TINY + ["train.lr=1.0e+30", "train.warmup_steps=0",
                                             "train.grad_clip=0"])
    with pytest.raises(TrainingStopped, match="last good checkpoint is step"):
        train(run, tmp_path, log=lambda *a, **k: None, plot=False)


def test_mqar_batches_hold_recallable_answers():
    data = MQARData(MQARDataConfig(vocab_size=64, num_kv_pairs=4), seq_len=32, seed=0)
    batch = data.batch(7, 8)
    again = data.batch(7, 8)
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])      # deterministic
    assert batch["mask"].sum(1).tolist() == [4.0] * 8
    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["mask"],
                                     strict=True):
        pairs = dict(zip(inputs[0:8:2], inputs[1:8:2], strict=True))
        assert len(pairs) == 4 and all(k < 32 <= v for k, v in pairs.items())
        for pos in np.nonzero(mask)[0]:
            assert inputs[pos] in pairs and targets[pos] == pairs[inputs[pos]]
    assert not np.array_equal(data.batch(8, 8)["inputs"], batch["inputs"])


def test_mqar_config_trains_and_reports_accuracy(tmp_path):
    run = load_config(ROOT / "configs" / "mqar_hybrid.yaml",
                      ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                       "train.batch_size=4", "train.eval_batches=1", "model.n_layers=2",
                       "model.layers=[gla, attn]", "train.seq_len=64", "data.num_kv_pairs=4"])
    summary = train(run, tmp_path, log=lambda *a, **k: None, plot=False)
    assert 0 <= summary["eval_accuracy"] <= 1 and "sample" not in summary


def test_greedy_generation_matches_the_full_forward():
    cfg = {"d_model": 32, "n_layers": 2, "layers": ["mamba", "attn"],
           "mixers": {"attn": {"type": "attention", "n_heads": 2},
                      "mamba": {"type": "mamba", "d_state": 4}}}
    model = build_model(cfg, rngs=nnx.Rngs(0))
    prompt = np.array([[65, 110, 100], [84, 104, 101]])
    out = generate(model, prompt, 5, temperature=0.0)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :3], prompt)
    full = nnx.jit(lambda m, x: m(x))(model, out)   # causal: position t-1 sees out[:, :t]
    for t in range(3, 8):                       # each new token is the argmax of a full pass
        np.testing.assert_array_equal(out[:, t], np.argmax(full[:, t - 1], -1))


def test_plot_command_compares_runs(tmp_path):
    pytest.importorskip("matplotlib")
    for name, losses in (("a", [3.0, 2.0]), ("b", [3.1, 2.5])):
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "split": "train", "loss": x} for i, x in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = subprocess.run([sys.executable, "-m", "training.plot", str(tmp_path / "a"),
                          str(tmp_path / "b"), "-o", str(tmp_path / "c.png")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000



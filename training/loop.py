"""The training loop: AdamW with warmup + cosine decay, jit-compiled steps, periodic evaluation,
orbax checkpoints with automatic resume, metrics in `<workdir>/metrics.jsonl`, progress lines,
a final summary and (text task) a generated sample.

    summary = train(load_config("hybrid_3to1"), workdir="runs/hybrid")
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import yaml
from flax import nnx

from models import build_model, count_params
from training import sharding
from training.checkpoint import Checkpointer
from training.config import ConfigError, RunConfig
from training.data import TextData, make_data


class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite loss); the message says why and where to resume."""


def make_optimizer(cfg, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)
    if cfg.lr_schedule == "constant":
        schedule = optax.constant_schedule(cfg.lr)
    elif cfg.lr_schedule == "halve_every_epoch":
        # The Informer code's `type1`: epochs 0 and 1 at lr, then halved after every epoch.
        schedule = lambda step: cfg.lr * 0.5 ** jax.numpy.maximum(
            step // steps_per_epoch - 1, 0)
    # No weight decay on gains, biases and other vectors.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule


def default_compiler_options(mesh) -> dict:
    """XLA options of the train / eval steps when `train.compiler_options` is not set.

    On GPUs with a mesh of several devices: XLA's latency-hiding scheduler, which starts the
    gradient all-reduces (or FSDP's gathers) early and overlaps them with the backward. On two
    H200s 0.2-0.6 ms of 1-1.5 ms of collectives per data-parallel step stay exposed with it,
    most of 2.0 ms without (docs/BENCHMARKS.md). Off elsewhere (XLA's default)."""
    devices = mesh.devices.flat
    if mesh.size > 1 and all(d.platform == "gpu" for d in devices):
        return {"xla_gpu_enable_latency_hiding_scheduler": True}
    return {}


def _check_compiler_options(options: dict) -> None:
    """Unknown XLA option names fail at the first compile; fail at start instead, by name."""
    if not options:
        return
    try:
        jax.jit(lambda: 0, compiler_options=options).lower().compile()
    except Exception as err:      # jaxlib's error type for a bad option varies by version
        raise ConfigError(f"train.compiler_options: {err}") from None


class Trainer:
    """Holds the model, optimizer, data and compiled steps of one run."""

    def __init__(self, run: RunConfig, workdir: str | Path, *, log=print, devices=None):
        self.run, self.cfg, self.log = run, run.train, log
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        sharding.initialize_distributed()         # several hosts: before touching devices
        self.is_main = jax.process_index() == 0
        if not self.is_main:
            self.log = lambda *args, **kwargs: None
        self.mesh = sharding.make_mesh(run.mesh, devices)      # devices: default all
        sharding.check_batch(self.cfg.batch_size, self.mesh)
        self.data = make_data(run.data, self.cfg.seq_len, self.cfg.seed)
        model_cfg = dict(run.raw["model"])
        if hasattr(self.data, "configure_model"):      # the data fixes the model's sizes
            model_cfg = self.data.configure_model(model_cfg)
        per_epoch = getattr(self.data, "steps_per_epoch", lambda _: None)(self.cfg.batch_size)
        if (self.cfg.epochs or self.cfg.lr_schedule == "halve_every_epoch") and not per_epoch:
            raise ConfigError("train.epochs: the data source has no epochs (steps_per_epoch)")
        if self.cfg.epochs:                            # evaluate at every epoch end
            self.cfg = dataclasses.replace(self.cfg, steps=self.cfg.epochs * per_epoch,
                                           eval_every=per_epoch)
        self.best = (math.inf, None, 0)                # early stopping: loss, state, evals since
        self.tx, self.schedule = make_optimizer(self.cfg, per_epoch or 1)

        def init():
            model = build_model(model_cfg, rngs=nnx.Rngs(self.cfg.seed))
            return model, nnx.Optimizer(model, self.tx, wrt=nnx.Param)

        # Parameters and optimizer state are created already split over the mesh by their
        # logical axes (training.sharding), never whole on one device.
        self.graphdef, abstract = nnx.split(nnx.eval_shape(init))
        rules = sharding.logical_rules(run.mesh)
        self.state_sharding = sharding.state_shardings(
            abstract, self.mesh, rules,
            sharding.zero1_rules(rules) if run.mesh.shard_optimizer else None)
        self.state = jax.jit(lambda: nnx.split(init())[1],
                             out_shardings=self.state_sharding)()
        self.model, self.optimizer = nnx.merge(self.graphdef, self.state)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.checkpointer = Checkpointer(self.workdir, self.cfg.keep_checkpoints)
        shardings, rep = (self.state_sharding, self.batch_sharding), sharding.replicated(self.mesh)
        self.compiler_options = (default_compiler_options(self.mesh)
                                 if self.cfg.compiler_options is None
                                 else dict(self.cfg.compiler_options))
        _check_compiler_options(self.compiler_options)
        self._train_step = self._on_mesh(jax.jit(
            self._step, in_shardings=shardings, out_shardings=(self.state_sharding, rep),
            donate_argnums=0, compiler_options=self.compiler_options))
        self._eval_step = self._on_mesh(jax.jit(self._eval, in_shardings=shardings,
                                                out_shardings=rep,
                                                compiler_options=self.compiler_options))

    # -- compiled functions -------------------------------------------------------------------
    def _step(self, state, batch):
        model, optimizer = nnx.merge(self.graphdef, state)

        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: self.data.loss(m, batch, train=True), has_aux=True)(model)
        optimizer.update(model, grads)
        _, state = nnx.split((model, optimizer))
        return state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    def _eval(self, state, batch):
        model, _ = nnx.merge(self.graphdef, state)
        loss, metrics = self.data.loss(model, batch, train=False)
        return {"loss": loss, **metrics}

    # -- helpers ------------------------------------------------------------------------------
    def _on_mesh(self, fn):
        """`fn` traced and run with the mesh set, so the kernels run under shard_map."""
        def call(*args):
            with jax.set_mesh(self.mesh):
                return fn(*args)
        call.jitted = fn
        return call

    def _device_batch(self, step: int, split: str):
        batch = self.data.batch(step, self.cfg.batch_size, split)
        return sharding.global_batch(batch, self.batch_sharding)

    def _write(self, record: dict):
        if self.is_main:
            with open(self.workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self, split: str = "eval") -> dict:
        if hasattr(self.data, "eval_batches"):         # a full pass; `weight` marks padding
            batches = list(self.data.eval_batches(self.cfg.batch_size, split))
            rows = [jax.device_get(self._eval_step(
                self.state, sharding.global_batch(b, self.batch_sharding))) for b in batches]
            weights = [float(b["weight"].sum()) for b in batches]
            return {k: float(np.average([r[k] for r in rows], weights=weights)) for k in rows[0]}
        rows = [jax.device_get(self._eval_step(self.state, self._device_batch(i, "eval")))
                for i in range(self.cfg.eval_batches)]
        out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        if isinstance(self.data, TextData):
            out["perplexity"] = math.exp(min(out["loss"], 50.0))
            out["bits_per_byte"] = out["loss"] / math.log(2)
        return out

    def _early_stop(self, loss: float) -> bool:
        """Track the best eval loss and its state; True after `patience` evals without one."""
        patience = self.cfg.early_stopping_patience
        if patience <= 0:
            return False
        if loss < self.best[0]:
            self.best = (loss, jax.tree.map(jax.numpy.copy, self.state), 0)
            return False
        self.best = (self.best[0], self.best[1], self.best[2] + 1)
        return self.best[2] >= patience

    def save(self, step: int) -> Path:
        meta = {"step": step, "config": self.run.raw}
        return self.checkpointer.save(step, self.state, meta)

    def restore_latest(self) -> int:
        step = self.checkpointer.latest_step()
        if step is None:
            return 0
        self.state, meta = self.checkpointer.restore(step, self.state)
        self.log(f"resumed from {self.checkpointer.directory / str(step)} (step {step})")
        return int(meta["step"])

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            (self.workdir / "config.yaml").write_text(yaml.safe_dump(self.run.raw,
                                                                     sort_keys=False))
        n_params = count_params(self.model)
        self.log(f"model: {n_params / 1e6:.2f}M parameters, layers "
                 f"{[spec['type'] for _, spec in self.run.model.layer_specs()]}; "
                 f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
                 f"mesh {dict(self.mesh.shape)}")
        start = self.restore_latest()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        t0 = time.time()
        window_t, window_steps, window_metrics = time.time(), 0, []
        last_saved, train_loss, eval_metrics = start, float("nan"), {}
        step = start
        interrupted = False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while step < cfg.steps:
                new_state, metrics = self._train_step(self.state, self._device_batch(step,
                                                                                   "train"))
                self.state = new_state
                step += 1
                window_steps += 1
                window_metrics.append(metrics)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    m = jax.device_get(window_metrics)
                    losses = [float(x["loss"]) for x in m]
                    if not all(map(math.isfinite, losses)):
                        raise TrainingStopped(
                            f"loss became {losses[-1]} by step {step}; stopped. The last good "
                            f"checkpoint is step {last_saved} in {self.checkpointer.directory}; "
                            "lower train.lr or raise train.warmup_steps, then rerun to resume")
                    train_loss = float(np.mean(losses))
                    dt = time.time() - window_t
                    tps = window_steps * tokens_per_step / max(dt, 1e-9)
                    eta = (cfg.steps - step) * dt / window_steps
                    record = {"step": step, "split": "train", "loss": train_loss,
                              **{k: float(np.mean([x[k] for x in m])) for k in m[-1]
                                 if k not in ("loss", "grad_norm")},
                              "grad_norm": float(m[-1]["grad_norm"]),
                              "lr": float(self.schedule(step)), "tokens_per_s": tps}
                    self._write(record)
                    self.log(f"step {step:>6}/{cfg.steps} | loss {train_loss:.4f} | "
                             f"{tps:,.0f} tok/s | lr {record['lr']:.2e} | "
                             f"eta {_fmt_time(eta)}")
                    window_t, window_steps, window_metrics = time.time(), 0, []
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    eval_metrics = self.evaluate()
                    self._write({"step": step, "split": "eval", **eval_metrics})
                    self.log(f"eval  {step:>6} | " + " | ".join(
                        f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    window_t = time.time()
                    if self._early_stop(eval_metrics["loss"]):
                        self.log(f"early stopping at step {step}: no better eval loss in "
                                 f"{cfg.early_stopping_patience} evaluations")
                        break
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.save(step)
                    last_saved = step
                    window_t = time.time()
        except KeyboardInterrupt:
            interrupted = True
            if step > last_saved:
                self.save(step)
                last_saved = step
            self.log(f"interrupted at step {step}; checkpoint saved to "
                     f"{self.checkpointer.directory / str(last_saved)}. Rerun the same command "
                     "to resume.")
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.best[1] is not None:                   # early stopping keeps the best state
            self.state = self.best[1]
            if not interrupted and step > last_saved:
                self.save(step)
                last_saved = step
        test_metrics = {} if interrupted else {
            split: self.evaluate(split) for split in getattr(self.data, "test_splits", ())}
        for split, metrics in test_metrics.items():
            self._write({"step": step, "split": split, **metrics})
            self.log(f"{split} (best eval state) | " + " | ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()))
        wall = time.time() - t0
        summary = {"step": step, "train_loss": train_loss, "wall_time_s": wall,
                   "tokens_per_s": (step - start) * tokens_per_step / max(wall, 1e-9),
                   "checkpoint": str(self.checkpointer.directory / str(last_saved)),
                   "interrupted": interrupted, "parameters": n_params}
        summary.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        for split, metrics in test_metrics.items():
            summary.update({f"{split}_{k}": v for k, v in metrics.items()})
        if isinstance(self.data, TextData):
            summary["unigram_eval_loss"] = self.data.unigram_loss()
        self.checkpointer.close()
        return summary

    def sample(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        from training.generate import generate
        model, _ = nnx.merge(self.graphdef, self.state)
        tokens = np.frombuffer(prompt.encode("utf-8"), np.uint8)[None].astype(np.int32)
        out = generate(model, tokens, max_new_tokens, temperature=temperature,
                       seed=self.cfg.seed)
        return bytes(out[0].astype(np.uint8)).decode("utf-8", errors="replace")


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def train(run: RunConfig, workdir: str | Path, *, log=print, plot: bool = True) -> dict:
    """Train (or resume) a run; returns the summary dict and writes the artefacts."""
    trainer = Trainer(run, workdir, log=log)
    summary = trainer.train()
    if not summary["interrupted"] and isinstance(trainer.data, TextData) and \
            run.train.sample_tokens > 0:
        summary["sample"] = trainer.sample(run.train.sample_prompt, run.train.sample_tokens,
                                           run.train.sample_temperature)
    if trainer.is_main:
        (Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
        # A run stopped before its first progress line has no metrics yet: nothing to plot.
        if plot and (Path(workdir) / "metrics.jsonl").is_file():
            try:
                from training.plot import plot_runs
                summary["plot"] = str(plot_runs([workdir], Path(workdir) / "loss.png"))
            except RuntimeError as e:
                log(f"(no loss plot: {e})", file=sys.stderr) if log is print else None
    return summary


__all__ = ["Trainer", "TrainingStopped", "train"]

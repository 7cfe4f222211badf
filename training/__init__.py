"""Training: config schema, data sources, the loop, checkpoints, sharding, generation, plots.

    from training import load_config, train
    summary = train(load_config("hybrid_3to1", ["train.steps=100"]), workdir="runs/demo")
"""

from training.config import ConfigError, RunConfig, load_config
from training.generate import generate
from training.loop import Trainer, TrainingStopped, train

__all__ = ["ConfigError", "RunConfig", "Trainer", "TrainingStopped", "generate", "load_config",
           "train"]

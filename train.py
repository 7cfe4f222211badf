"""Train a model from a YAML config.

    python train.py --config hybrid_3to1.yaml [--set train.steps=100 model.d_model=128 ...]
                    [--workdir runs/hybrid]

A bare config name resolves in configs/. `--set` values are parsed as YAML. The workdir
(default runs/<config name>) receives config.yaml, metrics.jsonl, checkpoints/, loss.png and
summary.json; rerunning the same command resumes from the newest checkpoint there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# One hardware queue per CUDA stream pair keeps XLA's scheduled order of the gradient collectives
# and the backward on several GPUs (NVIDIA's advice with the latency-hiding scheduler; measured
# 53.2 against 55.1 ms per data-parallel step on 2 H200s, docs/BENCHMARKS.md). Must be set
# before CUDA starts; a value from the environment wins.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config file, or a name in configs/ (e.g. hybrid_3to1)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE",
                        help="override config keys, e.g. train.steps=100 model.n_layers=8")
    parser.add_argument("--workdir", default=None,
                        help="output directory (default runs/<config name>); resumes if it "
                             "holds checkpoints")
    args = parser.parse_args(argv)

    from training.config import ConfigError, load_config
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from training.loop import TrainingStopped, train
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    try:
        summary = train(run, workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    print("\n== summary ==")
    for key, value in summary.items():
        if key != "sample":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())

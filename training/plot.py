"""Loss curves from one or more workdirs' metrics.jsonl, as a PNG.

    python -m training.plot runs/hybrid runs/transformer -o compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {workdir} a training workdir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(workdirs: list[str | Path], out: str | Path, key: str = "loss") -> Path:
    """Train (thin) and eval (thick, dots) curves of `key` for each run in one chart."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or the README's "
                           "set-up command, which installs the dev extra)") from e
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, wd in enumerate(workdirs):
        rows = read_metrics(wd)
        color = f"C{i}"
        for split, style in (("train", dict(lw=1, alpha=0.6)),
                             ("eval", dict(lw=2, marker="o", ms=4))):
            pts = sorted((r["step"], r[key]) for r in rows if r.get("split") == split
                         and key in r)
            if pts:
                # A resumed run may log a step twice; keep the last value of each.
                pts = sorted(dict(pts).items())
                ax.plot(*zip(*pts, strict=True), color=color, label=f"{Path(wd).name} {split}",
                        **style)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (holding metrics.jsonl)")
    parser.add_argument("-o", "--out", default="loss.png", help="output PNG (default loss.png)")
    parser.add_argument("--key", default="loss", help="metric to plot (default loss)")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.workdirs, args.out, args.key))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

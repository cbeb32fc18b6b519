"""Plot a run's learning curve from its metrics.jsonl: `python -m scripts.plot RUN_DIR [--out FILE]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402


def plot(run_dir: Path, out: Path) -> Path:
    rows = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines() if line]
    if not rows:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} holds no steps yet")
    minutes = [r["time"] / 60 for r in rows]
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, x, label in ((by_step, [r["step"] for r in rows], "learner step"), (by_time, minutes, "minutes since the learner started")):
        axis.plot(x, [r["accuracy"] for r in rows], marker="o", ms=3, label="accuracy")
        axis.plot(x, [r["reward_mean"] for r in rows], ls="--", label="mean reward")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    by_step.set_ylabel("per batch of samples")
    by_step.legend()
    fig.suptitle(f"{_describe(run_dir)}, {rows[-1]['samples']} samples per step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _describe(run_dir: Path) -> str:
    """'model on task' from the run's resolved config, or the folder name."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return f"{config['model']['path'].removeprefix('builtin:')} on {config['task']['name']}"
    except (OSError, KeyError, TypeError):
        return run_dir.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/curve.png)")
    args = parser.parse_args()
    print(plot(args.run_dir, args.out or args.run_dir / "curve.png"))


if __name__ == "__main__":
    main()

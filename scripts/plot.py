"""Turn a run directory's metrics.jsonl into PNGs: `python -m scripts.plot RUN_DIR` (or `launch.py plot RUN_DIR`).

Writes into RUN_DIR (or --out DIR):
- curve.png: reward and accuracy against learner steps and against minutes,
- reward.png: reward and accuracy against steps and against samples trained on,
- lag.png: how many policy versions old the trained samples were (histogram),
- off_policy.png: mean importance weight, truncated / masked / clipped token fractions,
- throughput.png: generated and trained tokens per second, and the learner's wait for data,
- eval.png: pass@k of each checkpoint, when an `eval.watch` evaluator wrote eval_metrics.jsonl.
Panels whose metrics a run does not have are left out. Offline (matplotlib Agg).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist (is {run_dir} a run directory?)")
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} holds no steps yet")
    return rows


def plot_all(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Every figure the run's metrics allow; returns the PNG paths."""
    rows, out = read_rows(run_dir), out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    title = _describe(run_dir)
    figures = [plot_curve(rows, title, out / "curve.png"), plot_reward(rows, title, out / "reward.png"),
               plot_lag(rows, title, out / "lag.png"), plot_off_policy(rows, title, out / "off_policy.png"),
               plot_throughput(rows, title, out / "throughput.png"), plot_eval(run_dir, title, out / "eval.png")]  # fmt: skip
    return [f for f in figures if f is not None]


def plot_curve(rows: list[dict], title: str, out: Path) -> Path:
    minutes = [r["time"] / 60 for r in rows]
    return _accuracy_pair(rows, title, out, minutes, "minutes since the learner started")


def plot_reward(rows: list[dict], title: str, out: Path) -> Path:
    samples = np.cumsum([r["samples"] for r in rows])
    return _accuracy_pair(rows, title, out, samples, "samples trained on")


def plot_lag(rows: list[dict], title: str, out: Path) -> Path:
    fig, axis = plt.subplots(figsize=(5, 3.4))
    counts = lag_histogram(rows)
    if counts is not None:
        axis.bar(np.arange(len(counts)), counts, width=0.8)
        axis.set_xticks(np.arange(len(counts)))
        axis.set_ylabel("samples")
    else:  # older runs log only the per-step mean
        axis.hist([r["lag_mean"] for r in rows], bins=20)
        axis.set_ylabel("steps (mean lag per step)")
    axis.set_xlabel("policy lag (versions behind the learner)")
    return _save(fig, f"{title}: policy lag", out)


def lag_histogram(rows: list[dict]) -> np.ndarray | None:
    """Samples trained at lag 0, 1, ... over the whole run (None if the run did not log lag_counts)."""
    if not all("lag_counts" in r for r in rows):
        return None
    width = max(len(r["lag_counts"]) for r in rows)
    return np.sum([np.pad(r["lag_counts"], (0, width - len(r["lag_counts"]))) for r in rows], axis=0)


def plot_off_policy(rows: list[dict], title: str, out: Path) -> Path | None:
    keys = [k for k in ("is_truncated_frac", "is_masked_frac", "clip_frac") if k in rows[0]]
    if "is_weight_mean" not in rows[0] and not keys:
        return None
    steps = [r["step"] for r in rows]
    fig, (weight, fractions) = plt.subplots(1, 2, figsize=(10, 3.6))
    if "is_weight_mean" in rows[0]:
        weight.plot(steps, [r["is_weight_mean"] for r in rows], marker="o", ms=3)
    weight.set(xlabel="learner step", ylabel="mean IS weight (pi_prox / pi_behavior)")
    for key in keys:
        fractions.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=key.removesuffix("_frac").replace("is_", ""))
    fractions.set(xlabel="learner step", ylabel="fraction of tokens")
    fractions.legend()
    for axis in (weight, fractions):
        axis.grid(alpha=0.3)
    return _save(fig, f"{title}: off-policy correction", out)


def plot_throughput(rows: list[dict], title: str, out: Path) -> Path | None:
    if "train_tokens_per_s" not in rows[0]:
        return None
    steps = [r["step"] for r in rows]
    fig, (rates, wait) = plt.subplots(1, 2, figsize=(10, 3.6))
    rates.plot(steps, [r["train_tokens_per_s"] for r in rows], marker="o", ms=3, label="trained tokens/s (learner)")
    if "gen_tokens_per_s" in rows[0]:
        rates.plot(steps, [r["gen_tokens_per_s"] for r in rows], marker="o", ms=3, label="generated tokens/s (actors)")
    rates.set(xlabel="learner step", ylabel="tokens per second")
    rates.legend()
    if "wait_seconds" in rows[0]:
        wait.plot(steps, [r["wait_seconds"] for r in rows], marker="o", ms=3)
    wait.set(xlabel="learner step", ylabel="learner waiting for a batch (s)")
    for axis in (rates, wait):
        axis.grid(alpha=0.3)
    return _save(fig, f"{title}: throughput", out)


def plot_eval(run_dir: Path, title: str, out: Path) -> Path | None:
    """pass@k of each checkpoint scored by `launch.py --role eval eval.watch=true` (run.dir/eval_metrics.jsonl)."""
    path = run_dir / "eval_metrics.jsonl"
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return None
    fig, axis = plt.subplots(figsize=(5, 3.4))
    for key in sorted({k for r in rows for k in r if k.startswith("pass@")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        axis.plot(*zip(*points), marker="o", ms=4, label=key.replace("_", " "))
    axis.set(xlabel="learner step (checkpoint)", ylabel=f"held-out score ({rows[-1]['problems']} problems)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, f"{title}: evaluation", out)


def _accuracy_pair(rows: list[dict], title: str, out: Path, x, x_label: str) -> Path:
    fig, (by_step, other) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, xs, label in ((by_step, [r["step"] for r in rows], "learner step"), (other, x, x_label)):
        axis.plot(xs, [r["accuracy"] for r in rows], marker="o", ms=3, label="accuracy")
        axis.plot(xs, [r["reward_mean"] for r in rows], ls="--", label="mean reward")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    by_step.set_ylabel("per batch of samples")
    by_step.legend()
    return _save(fig, f"{title}, {rows[-1]['samples']} samples per step", out)


def _save(fig, title: str, out: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _describe(run_dir: Path) -> str:
    """'model on task' from the run's resolved config, or the folder name."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        task = config["task"]
        name = task.get("reasoning_gym", {}).get("generator") if task["name"] == "reasoning_gym" else task["name"]
        return f"{config['model']['path'].removeprefix('builtin:')} on {name}"
    except (OSError, KeyError, TypeError, AttributeError):
        return run_dir.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    for path in plot_all(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()

"""The plot command: PNGs from a metrics.jsonl written here with the learner's field names."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import yaml

import launch
from scripts.plot import lag_histogram, plot_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(step: int, **extra) -> dict:
    return {"step": step, "reward_mean": 0.1 * step, "accuracy": 0.05 * step, "samples": 48, "lag_mean": 1.0, "lag_max": 2,
            "lag_counts": [10, 30, 8][: 1 + step % 3], "is_weight_mean": 1.0, "is_truncated_frac": 0.01, "is_masked_frac": 0.0,
            "clip_frac": 0.02, "gen_tokens_per_s": 90.0, "train_tokens_per_s": 80.0, "wait_seconds": 0.5, "time": 10.0 * step,
            **extra}  # fmt: skip


def write_run(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "builtin:smollm2-135m-instruct"},
                                                         "task": {"name": "reasoning_gym", "reasoning_gym": {"generator": "basic_arithmetic"}}}))  # fmt: skip


def test_launch_plot_writes_every_figure(tmp_path, capsys):
    write_run(tmp_path / "run", [row(s) for s in range(1, 7)])
    evals = [{"step": s, "problems": 50, "pass@1_greedy": 0.1 * s, "pass@1": 0.08 * s, "pass@8": 0.15 * s} for s in (2, 4, 6)]
    (tmp_path / "run" / "eval_metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in evals))
    assert launch.main(["plot", str(tmp_path / "run")]) == 0
    names = ["curve.png", "reward.png", "lag.png", "off_policy.png", "throughput.png", "eval.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "run" / n) for n in names]
    for name in names:
        data = (tmp_path / "run" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_older_runs_without_lag_counts_or_rates_get_the_figures_they_can(tmp_path):
    rows = [{k: v for k, v in row(s).items() if k not in ("lag_counts", "train_tokens_per_s", "is_weight_mean", "is_truncated_frac",
                                                          "is_masked_frac", "clip_frac")} for s in range(1, 4)]  # fmt: skip
    write_run(tmp_path / "run", rows)
    assert [p.name for p in plot_all(tmp_path / "run", tmp_path / "pngs")] == ["curve.png", "reward.png", "lag.png"]
    assert lag_histogram(rows) is None


def test_lag_histogram_sums_and_pads():
    assert np.array_equal(lag_histogram([{"lag_counts": [1, 2]}, {"lag_counts": [3]}, {"lag_counts": [0, 0, 5]}]), [4, 2, 5])


def test_missing_metrics_is_named(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot_all(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="holds no steps yet"):
        plot_all(tmp_path)

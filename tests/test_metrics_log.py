"""The learner's metrics log: JSON lines always, the same scalars in TensorBoard when switched on."""

from __future__ import annotations

import orjson

from learner.metrics_log import MetricsLog

ROWS = [{"step": s, "reward_mean": 0.25 * s, "accuracy": 0.5, "lag_counts": [3, 1], "correct": True} for s in (1, 2, 3)]


def test_jsonl_only_by_default(tmp_path):
    with MetricsLog(tmp_path) as log:
        for row in ROWS:
            log.write(row)
    assert [orjson.loads(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()] == ROWS
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_gets_the_numeric_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLog(tmp_path, tensorboard=True) as log:
        for row in ROWS:
            log.write(row)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/accuracy", "train/reward_mean"]  # lists, bools and the step are not scalars
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert len(orjson.loads((tmp_path / "metrics.jsonl").read_bytes().splitlines()[0])) == 5

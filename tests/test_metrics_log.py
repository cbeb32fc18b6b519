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


def rows(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_a_resumed_learner_logs_each_step_once_and_its_time_goes_on(tmp_path):
    """A learner resumed at step 2 (checkpoints sparser than steps) trains step 3 again: its rows were logged twice,
    and `time` started again at 0, so the minutes plot ran backwards."""
    with MetricsLog(tmp_path) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "time": 10.0 * step})
    with (tmp_path / "metrics.jsonl").open("ab") as torn:
        torn.write(b'{"step": 4, "ti')  # cut short by a crash
    with MetricsLog(tmp_path, resume_step=2) as log:
        assert log.elapsed_before == 20.0
        log.write({"step": 3, "time": 25.0})
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "time": 10.0}, {"step": 2, "time": 20.0}, {"step": 3, "time": 25.0}]
    superseded = (tmp_path / "metrics.superseded.jsonl").read_bytes().splitlines()
    assert superseded == [b'{"step":3,"time":30.0}', b'{"step": 4, "ti']  # nothing is lost


def test_tensorboard_hides_the_steps_a_resumed_learner_trains_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLog(tmp_path, tensorboard=True) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": float(step)})
    with MetricsLog(tmp_path, tensorboard=True, resume_step=2) as log:
        log.write({"step": 3, "loss": 30.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]

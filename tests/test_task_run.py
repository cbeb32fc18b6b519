"""A real run (all roles, tiny model) on a reasoning-gym task with a plug-in reward that sometimes raises:
the actor survives and drops those groups, named and counted; TensorBoard and the plot command work on the run."""

from __future__ import annotations

import pytest

import launch as launch_py
from tests.test_launch import launch, read_metrics

pytestmark = pytest.mark.slow

PLUGIN = """
def flaky(completion, answer):
    if answer.endswith("7"):  # about one problem in ten
        raise ValueError("cannot judge this one")
    return float(len(completion) % 2)
"""


def test_reasoning_gym_run_with_a_flaky_plugin_reward(tmp_path, endpoints, monkeypatch):
    (tmp_path / "flaky_rewards.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    run_dir = tmp_path / "run"
    result = launch(run_dir, endpoints, "task.name=reasoning_gym", "task.reasoning_gym.size=100", "task.holdout=10",
                    "task.reward.function=flaky_rewards:flaky", "train.steps=3", "run.tensorboard=true")  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(sum(r["lag_counts"]) == r["samples"] for r in rows)
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    actor_log = (run_dir / "logs" / "actor-0.log").read_text()
    assert "reward flaky_rewards:flaky failed (error): ValueError: cannot judge this one" in actor_log
    assert "reward_error: error: ValueError: cannot judge this one" in actor_log  # its group was dropped
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert launch_py.main(["plot", str(run_dir)]) == 0
    assert all((run_dir / name).stat().st_size > 10_000 for name in ("reward.png", "lag.png", "off_policy.png", "throughput.png"))

"""kill -9 an actor and the learner mid-run (roles started separately): the rest keeps going, restarted peers resume."""

from __future__ import annotations

import json
import signal

import pytest

from protocol.files import read_rows
from tests.helpers import finish_run, metrics_rows, role_processes, start_role, steps_done, wait_for

pytestmark = pytest.mark.slow


def test_killed_actor_and_learner_restart_and_the_run_completes(tmp_path, endpoints):
    every, ttl = "train.checkpoint_every=1", "broker.actor_ttl_s=3"
    broker = start_role("broker", tmp_path, endpoints, ttl)
    learner = start_role("learner", tmp_path, endpoints, every)
    actor = start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1.0")
    with role_processes(broker, learner, actor) as processes:
        wait_for(lambda: steps_done(tmp_path) >= 2, 300, "two learner steps")
        actor.send_signal(signal.SIGKILL)  # its unsent and partial groups die with it
        actor.wait()
        processes.append(actor := start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1.0"))
        wait_for(lambda: steps_done(tmp_path) >= 4, 300, "four learner steps")
        learner.send_signal(signal.SIGKILL)  # mid-step: its batch stays in flight at the broker
        learner.wait()
        assert broker.poll() is None and actor.poll() is None  # the rest keeps going
        processes.append(learner := start_role("learner", tmp_path, endpoints, every, "--resume"))
        finish_run(tmp_path, learner, actor, broker)
    steps = [row["step"] for row in metrics_rows(tmp_path)]
    assert steps[-1] == 10 and sorted(set(steps)) == list(range(1, 11))  # a killed step may be logged twice, none is missing
    stats = json.loads((tmp_path / "broker_stats.json").read_text())
    assert stats["rejected"] == 0 and stats["consumed_batches"] == 10  # each step's batch consumed once, none twice
    assert stats["consumed"] == 10 * 4 * 8  # steps x groups_per_step x group_size (configs/tiny.yaml)
    assert stats["accepted"] == stats["served"] + stats["dropped_stale"] + stats["expired"] + stats["buffered"]


def test_a_learner_resumed_behind_the_versions_actors_hold_moves_versions_on_and_a_synchronous_run_completes(
    tmp_path, endpoints
):
    """No checkpoint before step 5, killed after step 2: the resumed learner starts over from the base model, while
    the broker heard of version 2 or more and the actor holds it. Had versions restarted at 0, the synchronous actor
    (it generates one step's groups per version) would wait for a version above its own forever."""
    sync, every = "broker.max_policy_lag=0", "train.checkpoint_every=5"
    broker = start_role("broker", tmp_path, endpoints, sync)
    learner = start_role("learner", tmp_path, endpoints, sync, every)
    actor = start_role("actor", tmp_path, endpoints, sync)
    with role_processes(broker, learner, actor) as processes:
        wait_for(lambda: steps_done(tmp_path) >= 2, 300, "two learner steps")
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        assert not (tmp_path / "checkpoints").exists()
        first = metrics_rows(tmp_path)
        processes.append(learner := start_role("learner", tmp_path, endpoints, sync, every, "--resume"))
        finish_run(tmp_path, learner, actor, broker)
    resumed = metrics_rows(tmp_path)  # it started over from step 0: the killed learner's rows were moved aside
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert read_rows(tmp_path / "metrics.superseded.jsonl")[: len(first)] == first
    rows = first + resumed
    versions = [r["policy_version"] for r in rows]
    assert versions == sorted(set(versions))  # rising across the restart, never repeated
    assert resumed[0]["policy_version"] >= first[-1]["policy_version"] + 3  # past the version an actor may hold
    # Synchronous: each batch comes from the weights being trained, but for the first, which the killed learner was
    # given and never acknowledged (served again as it was: exactly once, the off-policy correction takes the lag).
    assert all(r["lag_max"] == 0 for r in resumed[1:])

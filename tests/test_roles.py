"""Roles started one by one (as on separate hosts), surviving a broker that is killed and restarted."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.helpers import finish_run, metrics_rows, role_processes, start_role, steps_done, wait_for

pytestmark = pytest.mark.slow


def test_separate_roles_survive_a_broker_crash(tmp_path, endpoints):
    broker = start_role("broker", tmp_path, endpoints)
    learner = start_role("learner", tmp_path, endpoints)
    actor = start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1.0")
    with role_processes(broker, learner, actor) as processes:
        wait_for(lambda: steps_done(tmp_path) >= 3, 300, "three learner steps")
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        time.sleep(2)
        processes.append(restarted := start_role("broker", tmp_path, endpoints))
        finish_run(tmp_path, learner, actor, restarted)  # the actor told to stop by the new broker
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    stats = json.loads((tmp_path / "broker_stats.json").read_text())  # the restarted broker's
    assert stats["policy_version"] >= 9 and stats["rejected"] == 0
    assert stats["accepted"] == stats["served"] + stats["dropped_stale"] + stats["buffered"]


def test_a_learner_stopped_early_can_resume_without_ending_the_actors(tmp_path, endpoints):
    every = "train.checkpoint_every=1"
    broker = start_role("broker", tmp_path, endpoints)
    learner = start_role("learner", tmp_path, endpoints, every)
    actor = start_role("actor", tmp_path, endpoints)
    with role_processes(broker, learner, actor) as processes:
        wait_for(lambda: steps_done(tmp_path) >= 2, 300, "two learner steps")
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(timeout=60) == 0
        time.sleep(3)
        assert actor.poll() is None and broker.poll() is None  # no FINISH: they wait for the learner
        processes.append(resumed := start_role("learner", tmp_path, endpoints, every, "--resume"))
        finish_run(tmp_path, resumed, actor, broker)
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))

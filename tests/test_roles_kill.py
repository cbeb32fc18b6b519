"""kill -9 an actor and the learner mid-run (roles started separately): the rest keeps going, restarted peers resume."""

from __future__ import annotations

import json
import signal

import pytest

from tests.helpers import start_role, steps_done, wait_for

pytestmark = pytest.mark.slow


def test_killed_actor_and_learner_restart_and_the_run_completes(tmp_path, endpoints):
    every, ttl = "train.checkpoint_every=1", "broker.actor_ttl_s=3"
    broker = start_role("broker", tmp_path, endpoints, ttl)
    learner = start_role("learner", tmp_path, endpoints, every)
    actor = start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1.0")
    processes = [broker, learner, actor]
    try:
        wait_for(lambda: steps_done(tmp_path) >= 2, 300, "two learner steps")
        actor.send_signal(signal.SIGKILL)  # its unsent and partial groups die with it
        actor.wait()
        processes.append(actor := start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1.0"))
        wait_for(lambda: steps_done(tmp_path) >= 4, 300, "four learner steps")
        learner.send_signal(signal.SIGKILL)  # mid-step: its batch stays in flight at the broker
        learner.wait()
        assert broker.poll() is None and actor.poll() is None  # the rest keeps going
        processes.append(learner := start_role("learner", tmp_path, endpoints, every, "--resume"))
        assert learner.wait(timeout=300) == 0, (tmp_path / "learner.log").read_text()[-3000:]
        assert actor.wait(timeout=60) == 0 and broker.wait(timeout=60) == 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10 and sorted(set(steps)) == list(range(1, 11))  # a killed step may be logged twice, none is missing
    stats = json.loads((tmp_path / "broker_stats.json").read_text())
    assert stats["rejected"] == 0 and stats["consumed_batches"] == 10  # each step's batch consumed once, none twice
    assert stats["consumed"] == 10 * 4 * 8  # steps x groups_per_step x group_size (configs/tiny.yaml)
    assert stats["accepted"] == stats["served"] + stats["dropped_stale"] + stats["expired"] + stats["buffered"]

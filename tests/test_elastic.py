"""Elastic actors: one joins a running job, the first one dies, the learner carries on with the rest."""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.helpers import start_role, steps_done, wait_for

pytestmark = pytest.mark.slow
STEPS = 24


def broker_stats(run_dir) -> dict:
    try:
        return json.loads((run_dir / "broker_stats.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def actor_counter(run_dir, actor: str, name: str) -> int:
    return broker_stats(run_dir).get("actor_counters", {}).get(actor, {}).get(name, 0)


def test_an_actor_joins_mid_run_and_the_first_one_dies(tmp_path, endpoints):
    args = (f"train.steps={STEPS}",)
    broker = start_role("broker", tmp_path, endpoints, *args)
    learner = start_role("learner", tmp_path, endpoints, *args)
    first = start_role("actor", tmp_path, endpoints, *args, "--index", "0", name="actor-0")
    processes = [broker, learner, first]
    try:
        wait_for(lambda: steps_done(tmp_path) >= 3, 300, "three learner steps")
        learner.send_signal(signal.SIGSTOP)  # hold the run while the second actor starts, so it joins mid-run
        joined_at = steps_done(tmp_path)
        processes.append(second := start_role("actor", tmp_path, endpoints, *args, "--index", "1", name="actor-1"))
        wait_for(lambda: "actor-1" in broker_stats(tmp_path).get("actor_counters", {}), 300, "actor-1 to say hello")
        learner.send_signal(signal.SIGCONT)
        wait_for(lambda: actor_counter(tmp_path, "actor-1", "groups_sent") >= 2, 300, "actor-1 to send groups")
        killed_at = steps_done(tmp_path)
        version_at_kill = actor_counter(tmp_path, "actor-0", "version")
        first.send_signal(signal.SIGKILL)
        assert learner.wait(timeout=300) == 0, (tmp_path / "learner.log").read_text()[-3000:]
        assert second.wait(timeout=60) == 0 and broker.wait(timeout=60) == 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert killed_at < STEPS - 5, "the first actor must die well before the end for the test to mean anything"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert version_at_kill >= killed_at - 3  # actor-0 tracked the learner (lag bound 2, stats a second old)
    log = (tmp_path / "actor-1.log").read_text()
    first_weights = int(re.search(r"actor-1 applied weights v(\d+)", log).group(1))
    assert first_weights >= joined_at  # it caught up to the current version before generating
    assert json.loads((tmp_path / "actor-1_stats.json").read_text())["version"] >= STEPS - 2
    assert any(r["actor_gen_tokens_per_s"].get("actor-1", 0) > 0 for r in rows[killed_at:])
    assert any(r["actor_gen_tokens_per_s"].get("actor-0", 0) > 0 for r in rows[:joined_at])

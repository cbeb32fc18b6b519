"""`launch.py --launcher ray` on a real local Ray cluster: the tiny config trains, and a killed actor comes back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.config import load_config
from protocol.transport import free_ports
from scripts.ray_launch import local_cpus, role_name
from tests.conftest import ROOT


def test_local_cluster_offers_what_the_roles_ask_for():
    config = load_config(None, ["actor.count=3", "learner.world_size=2", "ray.actor_cpus=1.5", "ray.learner_cpus=2"])
    assert local_cpus(config) == 1 + 5 + 4  # broker 1, 3 x 1.5 actors rounded up, 2 x 2 ranks
    assert [role_name("learner", 0, 1), role_name("learner", 1, 2), role_name("actor", 2, 3)] == ["learner", "learner-1", "actor-2"]


def test_roles_ray_cannot_place_are_a_named_error(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """A learner asking for a GPU on a cluster without one: an error that says so, not a hang."""
    import scripts.ray_launch as ray_launch

    monkeypatch.setattr(ray_launch, "PLACE_TIMEOUT_S", 3.0)
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"run.dir={tmp_path / 'run'}", "ray.learner_gpus=1"])
    assert ray_launch.run_ray(config) == 1
    assert "Ray placed no broker or no learner rank 0 within 3 s" in capsys.readouterr().out


@pytest.fixture
def ray_head(tmp_path, endpoints):
    """An existing Ray cluster (`ray start --head --block`), stopped through the process that started it.
    Its port is none of the run's endpoints (a free port asked for twice can come back twice)."""
    port = _port_besides(endpoints)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=5", "--include-dashboard=false", "--disable-usage-stats", "--block"],
        stdout=(tmp_path / "ray_head.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray_head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(timeout=60)


def _port_besides(endpoints: dict[str, str]) -> int:
    """A free port that is none of the run's endpoints (which are picked, not yet bound)."""
    taken = {int(address.rpartition(":")[2]) for address in endpoints.values()}
    return next(p for p in free_ports(len(taken) + 1) if p not in taken)


def ray_lines(log: str) -> list[tuple[str, int]]:
    """(started|restarted, Ray actor pid) for each time the role's Ray actor was (re)created."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^ray: \S+ (started|restarted) in Ray actor pid (\d+)", log, re.M)]


@pytest.mark.slow
def test_ray_run_survives_a_killed_actor(tmp_path, endpoints, tiny_model_dir, ray_head):
    """kill -9 of the actor's Ray actor: Ray restarts it, the new incarnation feeds the learner to the last step.

    The cluster exists before the run (`ray.address`); the learner runs as two FSDP ranks,
    each its own Ray actor, meeting at rank 0's node.
    The broker holds at most credits_per_actor = 32 samples (one step) of the dead incarnation,
    so three or more steps after the kill can only come from the restarted actor.
    """
    run_dir, steps = tmp_path / "run", 6
    master_port = _port_besides(endpoints)  # Ray holds its port already: no free port can be it
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", "all", "--launcher", "ray", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoints['broker']}", f"endpoints.weights={endpoints['weights']}", f"train.steps={steps}",
        "learner.world_size=2", f"learner.master_port={master_port}", f"ray.address={ray_head}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    metrics, actor_log = run_dir / "metrics.jsonl", run_dir / "logs" / "actor-0.log"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert metrics.exists() and metrics.read_text(), "the run never made a step"
        [(_, worker_pid)] = ray_lines(actor_log.read_text())
        os.kill(worker_pid, signal.SIGKILL)
        steps_at_kill = len(metrics.read_text().splitlines())
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    assert "Connecting to existing Ray cluster" in output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert steps - steps_at_kill >= 3, "the kill came too late to prove anything"

    log = actor_log.read_text()
    events = ray_lines(log)
    assert [e for e, _ in events] == ["started", "restarted"] and events[0][1] != events[1][1]
    after_restart = log.split("restarted in Ray actor pid")[1]
    assert "applied weights v" in after_restart and "stopping" in after_restart
    for role in ("broker", "learner-0", "learner-1"):  # never restarted
        assert [e for e, _ in ray_lines((run_dir / "logs" / f"{role}.log").read_text())] == ["started"]
    stats = json.loads((run_dir / "broker_stats.json").read_text())
    assert stats["rejected"] == 0 and stats["duplicates"] == 0
    assert stats["received"] == stats["acked"] == stats["accepted"]
    assert stats["served"] == sum(r["samples"] for r in rows)
    leftovers = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.strip()
    assert leftovers == "", "the killed actor's role process must die with its Ray actor"

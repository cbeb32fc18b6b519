"""Kill -9 the learner mid-run, restart it with --resume: the rest of the run is identical to an uninterrupted one."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from protocol import messages as m
from protocol.transport import Client
from tests.helpers import make_sample, start_role, steps_done, wait_for

pytestmark = pytest.mark.slow
GROUPS, N, STEPS = 12, 4, 6
SETTINGS = ["train.steps=6", "train.groups_per_step=2", f"sampling.group_size={N}", "train.checkpoint_every=1",
            "broker.max_policy_lag=1000", "broker.credits_per_actor=64", "train.lr=0.01"]  # fmt: skip


def feed(endpoint: str, groups: range) -> None:
    """Deterministic samples, sent like an actor would (all generated at version 0)."""
    client = Client(endpoint, "feeder")
    rng = np.random.default_rng(0)
    all_samples = []
    for g in range(GROUPS):
        for i in range(N):
            completion = rng.integers(0, 2000, size=5).astype(np.int32)
            all_samples.append(make_sample(
                prompt_ids=rng.integers(0, 2000, size=4).astype(np.int32), completion_ids=completion,
                behavior_logprobs=-rng.random(5).astype(np.float32) * 8, reward=float(completion[0] % 2),
                group_id=f"g{g}", group_size=N, index=i, actor_id="feeder", seq=g * N + i,
            ))  # fmt: skip
    chosen = [s for s in all_samples if int(s.group_id[1:]) in groups]
    kind, body, _ = client.request(m.SAMPLES, {"actor_id": "feeder"}, samples=chosen)
    assert kind == m.ACK and len(body["acked"]) == len(chosen)
    client.close()


def run(run_dir, endpoints, interrupt: bool, *extra: str):
    run_dir.mkdir()
    settings = [*SETTINGS, *extra]
    broker = start_role("broker", run_dir, endpoints, *settings)
    processes = [broker]
    try:
        if not interrupt:
            feed(endpoints["broker"], range(GROUPS))
            processes.append(learner := start_role("learner", run_dir, endpoints, *settings))
            assert learner.wait(timeout=300) == 0
        else:
            feed(endpoints["broker"], range(GROUPS // 2))
            processes.append(learner := start_role("learner", run_dir, endpoints, *settings))
            wait_for(lambda: (run_dir / "checkpoints" / "step_000003").exists(), 300, "the third checkpoint")
            time.sleep(1)  # the learner now waits for batch 4, which does not exist yet
            learner.send_signal(signal.SIGKILL)
            learner.wait()
            feed(endpoints["broker"], range(GROUPS // 2, GROUPS))
            processes.append(resumed := start_role("learner", run_dir, endpoints, *settings, "--resume"))
            assert resumed.wait(timeout=300) == 0, (run_dir / "learner.log").read_text()[-3000:]
        assert broker.wait(timeout=60) == 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


@pytest.mark.parametrize("ranks", [1, 2])
def test_resumed_learner_matches_an_uninterrupted_run(tmp_path, endpoints, ranks):
    extra = [f"learner.world_size={ranks}", f"learner.master_port={29300 + ranks}"]
    straight, straight_weights = run(tmp_path / "straight", endpoints, False, *extra)
    resumed, resumed_weights = run(tmp_path / "resumed", endpoints, True, *extra)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in straight]
    assert [r["time"] for r in resumed] == sorted(r["time"] for r in resumed), "time starts again at 0 after a resume"
    assert steps_done(tmp_path / "resumed") == STEPS
    for name, tensor in straight_weights.items():
        assert np.array_equal(tensor, resumed_weights[name]), name
    stats = json.loads((tmp_path / "resumed" / "broker_stats.json").read_text())
    assert stats["served"] == stats["consumed"] == GROUPS * N and stats["consumed_batches"] == STEPS  # each once
    # The killed learner was waiting (long poll) for batch 4; if the second feed completed that wait before the
    # broker noticed the learner was gone, batch 4 went to the dead learner and the resumed one got it again.
    assert stats["batches_resent"] <= 1

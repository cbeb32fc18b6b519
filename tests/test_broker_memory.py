"""A stalled learner: the actor's credits run out, it blocks, and the broker's memory stays within its budget."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from protocol import messages as m
from protocol.sample import Sample
from protocol.transport import Client, free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
BUDGET_MB = 8
PROMPT, COMPLETION = 2048, 7168  # 4 P + 8 C = 64 KB of arrays per sample


def big_sample(seq: int) -> Sample:
    return Sample(prompt_ids=np.ones(PROMPT, np.int32), completion_ids=np.ones(COMPLETION, np.int32),
                  behavior_logprobs=np.full(COMPLETION, -1.0, np.float32), reward=0.0, group_id=f"g{seq // 4}",
                  group_size=4, index=seq % 4, version_start=0, version_end=0, actor_id="a0", incarnation="i0", seq=seq)  # fmt: skip


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_stalled_learner_blocks_actors_and_broker_memory_stays_flat(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    broker = subprocess.Popen([
        sys.executable, str(ROOT / "launch.py"), "--role", "broker", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={tmp_path}", f"endpoints.broker={endpoint}", "sampling.group_size=4", "train.groups_per_step=1",
        "broker.credits_per_actor=100000", f"broker.memory_budget_mb={BUDGET_MB}", "run.log_level=ERROR",
    ], stdout=subprocess.DEVNULL)  # fmt: skip
    actor = Client(endpoint, "actor")
    body = {"actor_id": "a0", "incarnation": "i0"}
    try:
        credits = actor.request(m.HELLO, body, timeout_s=30)[1]["credits"]
        seq, blocked_at = 0, None
        while blocked_at is None:  # a well-behaved actor: sends only what its credits allow
            batch = [big_sample(seq + i) for i in range(min(credits, 16))]
            reply = actor.request(m.SAMPLES, body, samples=batch)[1]
            assert reply["acked"] == [s.seq for s in batch]
            seq, credits = seq + len(batch), reply["credits"]
            if credits == 0:
                blocked_at = rss_mb(broker.pid)
        assert BUDGET_MB * 2**20 * 0.9 <= seq * 64 * 1024 <= BUDGET_MB * 2**20
        deadline = time.monotonic() + 4.0
        refused = 0
        while time.monotonic() < deadline:  # now a greedy one ignores the credits and keeps pushing 1 MB messages
            reply = actor.request(m.SAMPLES, body, samples=[big_sample(seq + i) for i in range(16)])[1]
            assert reply["acked"] == [] and reply["credits"] == 0
            refused += len(reply["refused"])
        stats = actor.request(m.STATS)[1]
        grown = rss_mb(broker.pid) - blocked_at
    finally:
        actor.close()
        broker.kill()
        broker.wait()
    assert refused > 16 * 10 and stats["refused_no_credit"] == refused
    assert stats["buffered"] == seq and stats["buffered_bytes"] <= BUDGET_MB * 2**20
    assert grown < 8, f"broker RSS grew {grown:.1f} MB while the learner stalled"

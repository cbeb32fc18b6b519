"""kill -9 a real broker process many times while a real client streams samples and another consumes them.

The producer resends whatever was not acknowledged (to whichever broker is up); the
consumer acknowledges each batch in its next request, like the learner. At the end,
every sample the broker acknowledged has reached the consumer exactly once, with the
content it was sent with, and nothing else has.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from protocol import messages as m
from protocol.sample import Sample
from protocol.transport import Client, free_port
from protocol.wire import samples_from
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
GROUP = 4
KILLS = 12


def start_broker(run_dir: Path, endpoint: str) -> subprocess.Popen:
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", "broker", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoint}", f"sampling.group_size={GROUP}", "train.groups_per_step=2",
        "broker.credits_per_actor=256", "broker.max_policy_lag=1000", "broker.fsync_interval_ms=2",
        "broker.segment_mb=0.05",  # small segments: rolls and deletions happen between the kills too
    ]  # fmt: skip
    log = (run_dir / "broker.log").open("ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def listening(run_dir: Path) -> int:
    return (run_dir / "broker.log").read_text().count("broker listening")


def wait_until_listening(run_dir: Path, count: int) -> None:
    """Until `count` brokers have opened their socket (startup is slow on a loaded machine)."""
    deadline = time.monotonic() + 60
    while listening(run_dir) < count:
        assert time.monotonic() < deadline, "the broker did not come up"
        time.sleep(0.05)


def make(seq: int) -> Sample:
    """Sample `seq`, whose content is a function of seq, so the consumer can tell an invented or altered one."""
    return Sample(
        prompt_ids=np.array([1, 2, seq % 1000], dtype=np.int32), completion_ids=np.arange(seq % 7 + 1, dtype=np.int32) + seq % 500,
        behavior_logprobs=np.full(seq % 7 + 1, -0.5, dtype=np.float32), reward=float(seq), group_id=f"g{seq // GROUP}",
        group_size=GROUP, index=seq % GROUP, version_start=0, version_end=0, actor_id="a0", incarnation="inc", seq=seq,
    )  # fmt: skip


class Producer(threading.Thread):
    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoint, "producer")
        self.next_seq, self.credits = 0, GROUP
        self.unacked: dict[int, float] = {}
        self.acked: set[int] = set()
        self.stop_new = threading.Event()  # after it, only resend until everything is acknowledged
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and not (self.stop_new.is_set() and not self.unacked):
            now = time.monotonic()
            batch = [s for s, sent in self.unacked.items() if now - sent > 1.0][:32]
            room = self.credits - len(self.unacked)
            while len(batch) < 32 and room > 0 and not (self.stop_new.is_set() and self.next_seq % GROUP == 0):
                batch.append(self.next_seq)
                self.next_seq, room = self.next_seq + 1, room - 1
            self.unacked.update({s: now for s in batch})
            try:
                kind = m.SAMPLES if batch else m.PING
                body = {"actor_id": "a0", "incarnation": "inc"}
                _, reply, _ = self.client.request(kind, body, samples=[make(s) for s in batch], timeout_s=1.0)
            except TimeoutError:
                continue
            for seq in reply.get("acked", []):
                self.unacked.pop(seq, None)
                self.acked.add(seq)
            assert reply.get("rejected", []) == []
            self.credits = reply["credits"]
            if not batch:
                time.sleep(0.01)
        self.done.set()


class Consumer(threading.Thread):
    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoint, "consumer")
        self.received: list[int] = []
        self.batches: list[int] = []
        self.altered: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            try:
                kind, body, arrays = self.client.request(m.GET_BATCH, {"groups": 2, "policy_version": 0, "ack_batch": last}, timeout_s=1.0)
            except TimeoutError:
                continue
            if kind != m.BATCH:
                time.sleep(0.01)
                continue
            last = body["batch_id"]
            self.batches.append(last)
            for sample in samples_from(body, arrays, None):
                self.received.append(sample.seq)
                if not isinstance(sample, Sample):
                    self.altered.append(sample.seq)
                    continue
                expected = make(sample.seq)
                if sample.reward != expected.reward or not np.array_equal(sample.completion_ids, expected.completion_ids):
                    self.altered.append(sample.seq)


def test_acknowledged_samples_reach_the_consumer_exactly_once_across_kill_9(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    rng = random.Random(1234)
    broker = start_broker(tmp_path, endpoint)
    producer, consumer = Producer(endpoint), Consumer(endpoint)
    producer.start()
    consumer.start()
    try:
        started_before = 0  # "broker listening" lines before the current broker was started
        for kill in range(KILLS):
            if kill % 4 != 3:  # mostly mid-stream; every fourth kill while the new broker still starts up
                wait_until_listening(tmp_path, started_before + 1)
                time.sleep(rng.uniform(0.2, 1.5))
            broker.send_signal(signal.SIGKILL)
            broker.wait()
            started_before = listening(tmp_path)
            broker = start_broker(tmp_path, endpoint)
        time.sleep(1.0)
        producer.stop_new.set()
        deadline = time.monotonic() + 60
        while (not producer.done.is_set() or len(consumer.received) < producer.next_seq) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # anything extra (a duplicate) would arrive now
    finally:
        producer.done.set()
        consumer.stop.set()
        producer.join(5)
        consumer.join(5)
        broker.kill()
        broker.wait()
    log = (tmp_path / "broker.log").read_text()
    total = producer.next_seq
    replays = [int(n) for n in re.findall(r"replayed (\d+) samples", log)]
    assert len(replays) > KILLS * 3 // 4 and sum(n > 0 for n in replays) >= KILLS // 2, log[-3000:]  # killed mid-stream
    assert total > 1000 and producer.acked == set(range(total)), f"{total - len(producer.acked)} samples never acknowledged"
    twice = [seq for seq, n in Counter(consumer.received).items() if n > 1]
    assert twice == [], f"delivered more than once: {twice[:20]}"
    assert sorted(consumer.received) == list(range(total)), "a sample was lost or invented"
    assert consumer.altered == []
    assert consumer.batches == sorted(set(consumer.batches))  # batch ids only grow, never repeat

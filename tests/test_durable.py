"""A broker restarted on its write-ahead log (real sockets): nothing acknowledged is lost, nothing consumed comes back."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from broker.server import Broker
from protocol import messages as m
from protocol.config import load_config
from protocol.transport import Client, free_port
from protocol.wire import per_sample_columns
from tests.test_broker import GROUP, VOCAB, get_batch, group_samples, sample, send


class Running:
    """A broker served from a thread; `restart` stops it (without a clean log close) and starts another."""

    def __init__(self, tmp_path, *overrides: str) -> None:
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.config = load_config(None, [
            f"run.dir={tmp_path}", f"endpoints.broker={self.endpoint}", f"sampling.group_size={GROUP}",
            "broker.credits_per_actor=64", "broker.max_policy_lag=1", "train.groups_per_step=1", *overrides,
        ])  # fmt: skip
        self.start()

    def start(self, vocab: int = VOCAB) -> None:
        self.server = Broker(self.config, vocab)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def restart(self, vocab: int = VOCAB) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.start(vocab)

    def client(self, name: str) -> Client:
        return Client(self.endpoint, name)

    def stats(self) -> dict:
        return self.client("probe").request(m.STATS)[1]


@pytest.fixture
def running(tmp_path):
    brokers = []

    def make(*overrides: str) -> Running:
        brokers.append(Running(tmp_path, *overrides))
        return brokers[-1]

    yield make
    for b in brokers:
        b.stop_event.set()
        b.thread.join(5)


def keys(body: dict) -> list[tuple[str, int]]:
    columns = per_sample_columns(body["samples"], len(body["samples"]["seq"]))
    return list(zip(columns["group_id"], columns["seq"], strict=True))


def test_restart_replays_unconsumed_samples_and_the_inflight_batch_exactly_once(running):
    broker = running()
    actor, learner = broker.client("actor"), broker.client("learner")
    send(actor, group_samples(0, 0) + group_samples(1, 4) + group_samples(2, 8))
    _, first, _ = get_batch(learner, 1, 0)
    _, second, _ = get_batch(learner, 1, 0, ack=first["batch_id"])  # batch 1 consumed; batch 2 in flight
    broker.restart()
    learner = broker.client("learner2")
    _, again, _ = get_batch(learner, 1, 0)  # not acknowledged: the same batch, same id
    assert again["batch_id"] == second["batch_id"] and keys(again) == keys(second)
    _, third, _ = get_batch(learner, 1, 0, ack=again["batch_id"])
    assert keys(third) == [("a0-g2", s) for s in range(8, 12)]
    assert get_batch(learner, 1, 0, ack=third["batch_id"])[0] == m.NOT_READY
    stats = broker.stats()
    assert stats["replayed"] == 8 and stats["consumed"] == 8 and stats["inflight_batch"] is None


def test_logged_groups_of_another_size_than_the_restarted_runs_are_not_replayed(running, caplog):
    """A group of another size would stop the learner's step, so the broker refuses one on the wire; replay after
    `sampling.group_size` changed must not bring one back either (found by a review)."""
    broker = running()
    send(broker.client("actor"), group_samples(0, 0))
    broker.stop_event.set()
    broker.thread.join(5)
    broker.config = broker.config.model_copy(update={"sampling": broker.config.sampling.model_copy(update={"group_size": 2 * GROUP})})
    broker.start()
    assert broker.stats()["replayed"] == 0 and "4 logged samples fail the run's checks (bad_sample: group_size is not the run's 8): not replayed" in caplog.text


def test_resends_after_a_restart_are_duplicates_even_once_consumed(running):
    broker = running()
    actor, learner = broker.client("actor"), broker.client("learner")
    send(actor, group_samples(0, 0) + group_samples(1, 4))
    _, first, _ = get_batch(learner, 1, 0)
    get_batch(learner, 1, 0, ack=first["batch_id"])
    broker.restart()
    body = send(broker.client("actor2"), group_samples(0, 0) + group_samples(1, 4) + group_samples(2, 8))
    assert body["acked"] == list(range(12))  # the actor may forget all of them
    stats = broker.stats()
    assert stats["duplicates"] == 8 and stats["accepted"] == 4  # only g2 is new (g1 came back as the in-flight batch)
    learner = broker.client("learner2")
    _, batch, _ = get_batch(learner, 1, 0, ack=first["batch_id"] + 1)  # acknowledges the replayed in-flight g1
    assert keys(batch) == [("a0-g2", s) for s in range(8, 12)]


def test_an_ack_is_sent_only_after_fsync(running):
    broker = running()
    send(broker.client("actor"), group_samples(0, 0))
    stats = broker.stats()
    assert stats["fsyncs"] >= 1 and stats["log_bytes_written"] > 0 and stats["durable"] is True


def test_the_broker_keeps_answering_while_a_faked_slow_fsync_runs_and_acks_only_what_it_covers(running, monkeypatch):
    """A slow disk (faked: no slow device can be made here) holds the first fsync, yet a PING is answered and
    a second message taken; each ACK comes once a sync that covers its samples has ended."""
    broker = running()
    stats_before = broker.stats()["fsyncs"]
    release, real_fdatasync = threading.Event(), os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (release.wait(10), real_fdatasync(fd)))
    actor = broker.client("actor")
    body = {"actor_id": "a0", "incarnation": "i0"}
    first = actor.post(m.SAMPLES, body, samples=group_samples(0, 0))
    time.sleep(0.3)  # the broker has taken it and its fsync hangs
    started = time.monotonic()
    assert broker.client("other").request(m.PING, {"actor_id": "a1", "incarnation": "i1"}, timeout_s=2)[0] == m.STATUS
    assert time.monotonic() - started < 1.0
    second = actor.post(m.SAMPLES, body, samples=group_samples(1, 4))
    bad = [sample(100, 9, 0, completion_ids=np.array([1, VOCAB + 1], dtype=np.int32))]  # rejected: nothing to make durable
    _, rejected, _ = broker.client("bad").request(m.SAMPLES, {"actor_id": "a0", "incarnation": "i2"}, samples=bad, timeout_s=1)
    assert rejected["acked"] == [] and rejected["rejected"] == [[100, "token_out_of_vocab"]]
    assert actor.collect(wait_s=0.3) == [], "no ACK before its fsync"
    release.set()
    replies = []
    deadline = time.monotonic() + 5
    while len(replies) < 2 and time.monotonic() < deadline:
        replies += actor.collect(wait_s=0.5)
    assert [(r[0], r[1]["rid"], r[1]["acked"]) for r in replies] == [(m.ACK, first, [0, 1, 2, 3]), (m.ACK, second, [4, 5, 6, 7])]
    assert broker.stats()["fsyncs"] - stats_before == 2  # the second message could not join the running sync


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the broker thread dies on purpose
def test_a_sync_failing_as_the_broker_stops_acknowledges_nothing_and_releases_the_log(running, monkeypatch):
    broker = running()
    release, real_fdatasync = threading.Event(), os.fdatasync

    def failing_disk(fd):
        release.wait(10)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_disk)
    actor = broker.client("actor")
    actor.post(m.SAMPLES, {"actor_id": "a0", "incarnation": "i0"}, samples=group_samples(0, 0))
    time.sleep(0.3)  # taken, its sync held
    broker.stop_event.set()
    time.sleep(0.3)  # the loop has ended: the broker waits for that sync while it stops
    release.set()
    broker.thread.join(5)
    assert not broker.thread.is_alive() and actor.collect(wait_s=0.5) == []
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    stopped = broker.server  # still referenced: its lock must be released by closing, not by garbage collection
    broker.start()  # the unacknowledged samples may or may not be in the log
    assert stopped.log.wal.lock.closed
    assert broker.stats()["replayed"] in (0, 4)


def test_stale_and_expired_samples_are_not_replayed(running):
    broker = running("broker.actor_ttl_s=0.5")
    actor, learner = broker.client("actor"), broker.client("learner")
    send(actor, group_samples(0, 0, version=0))
    send(actor, group_samples(1, 4, version=2)[:2])  # a partial group
    assert get_batch(learner, 1, 2)[0] == m.NOT_READY  # version 2: g0 is stale (lag 2 > 1)
    time.sleep(2.0)  # the actor goes silent: its partial group expires
    stats = broker.stats()
    assert stats["dropped_stale"] == 4 and stats["expired"] == 2 and stats["expired_groups"] == 1
    broker.restart()
    stats = broker.stats()
    assert stats["replayed"] == 0 and stats["buffered"] == 0 and stats["partial_groups"] == 0


def test_a_stale_sample_sent_with_fresh_ones_stays_dropped_after_a_restart(running):
    """Found by a review: the whole message was logged, stale sample and all, and the version that made it stale
    (heard from a learner's request that got no batch) is not logged: a restart buffered it again."""
    broker = running()
    assert get_batch(broker.client("learner"), 1, 10)[0] == m.NOT_READY  # the broker is at version 10 now
    body = send(broker.client("actor"), [*group_samples(0, 0, version=10)[:2], sample(2, 1, 0, version=7)])
    assert body["acked"] == [0, 1, 2] and broker.stats()["dropped_stale"] == 1
    broker.restart()
    stats = broker.stats()
    assert stats["replayed"] == 2 and stats["buffered"] == 2


def test_an_actors_watermark_closes_the_gap_a_rejected_sample_leaves_after_a_restart(running):
    """Rejected samples are not logged, so a restart rebuilt their numbers as a gap the actor never fills: every
    later sample then went to the window's overflow set, sorted whenever it reached MAX_ABOVE."""
    broker = running()
    actor = broker.client("actor")
    bad = sample(1, 0, 1)
    bad.completion_ids = np.array([VOCAB + 1], dtype=np.int32)
    bad.behavior_logprobs = np.array([-1.0], dtype=np.float32)
    body = send(actor, [sample(0, 0, 0), bad, sample(2, 0, 2)])
    assert body["acked"] == [0, 2] and body["rejected"] == [[1, "token_out_of_vocab"]]
    broker.restart()
    window = broker.server.buffer.seen[("a0", "i0")]
    assert (window.below, window.above) == (1, {2})  # the gap: seq 1 is in no record
    status = {"actor_id": "a0", "incarnation": "i0", "settled_below": 3}
    assert actor.request(m.PING, status)[0] == m.STATUS
    assert (window.below, window.above) == (3, set())
    for ignored in (1, "9", 2.5e9):  # an older watermark, and what is no int, change nothing
        assert actor.request(m.PING, {**status, "settled_below": ignored})[0] == m.STATUS
    assert (window.below, window.above) == (3, set())


def test_fully_consumed_segments_are_deleted(running):
    broker = running("broker.segment_mb=0.001")  # ~1 KB segments: a new one after nearly every message
    actor, learner = broker.client("actor"), broker.client("learner")
    ack = None
    for g in range(6):
        send(actor, group_samples(g, 4 * g))
        _, batch, _ = get_batch(learner, 1, 0, ack=ack)
        ack = batch["batch_id"]
    get_batch(learner, 1, 0, ack=ack)
    send(actor, group_samples(6, 24))  # one more commit rolls the segment and collects
    stats = broker.stats()
    assert stats["log_segments_deleted"] >= 3 and stats["log_segments"] <= 2
    assert stats["log_bytes"] < stats["log_bytes_written"] / 3
    broker.restart()
    assert broker.stats()["replayed"] == 4  # only g6


def test_samples_refused_for_credit_are_not_replayed_and_are_taken_when_resent(running):
    """The refused half of a message was never acknowledged: after a restart it is neither buffered nor a duplicate."""
    broker = running(f"broker.credits_per_actor={GROUP}")
    body = send(broker.client("actor"), group_samples(0, 0) + group_samples(1, GROUP))
    assert body["acked"] == list(range(GROUP)) and body["refused"] == list(range(GROUP, 2 * GROUP))
    broker.restart()
    assert broker.stats()["buffered"] == GROUP  # was 2 x GROUP, over the actor's credit
    learner = broker.client("learner")
    _, batch, _ = get_batch(learner, 1, 0)
    body = send(broker.client("actor2"), group_samples(1, GROUP))
    assert body["acked"] == list(range(GROUP, 2 * GROUP)) and broker.stats()["duplicates"] == 0
    _, second, _ = get_batch(learner, 1, 0, ack=batch["batch_id"])
    assert keys(second) == [("a0-g1", s) for s in range(GROUP, 2 * GROUP)]


def test_an_inflight_batch_replay_cannot_rebuild_is_ended_and_never_comes_back(running):
    """Restarted with a smaller vocabulary, one sample of the in-flight batch no longer decodes: the batch is not
    served, its other samples are not either (the learner may have trained on them), and its records do not keep
    the log from being collected."""
    broker = running("broker.segment_mb=0.001")
    high = sample(3, 0, 3, completion_ids=np.array([4, 60], dtype=np.int32))  # out of a vocabulary of 50
    send(broker.client("actor"), group_samples(0, 0)[:3] + [high])
    get_batch(broker.client("learner"), 1, 0)  # batch 1 in flight
    broker.restart(vocab=50)
    learner, actor = broker.client("learner2"), broker.client("actor2")
    assert get_batch(learner, 1, 0)[0] == m.NOT_READY and broker.stats()["buffered"] == 0
    ack = None
    for g in range(1, 5):  # more traffic: the segments the ended batch was in get deleted
        send(actor, group_samples(g, 4 * g))
        _, batch, _ = get_batch(learner, 1, 0, ack=ack)
        ack = batch["batch_id"]
    get_batch(learner, 1, 0, ack=ack)
    send(actor, group_samples(5, 20))
    assert broker.stats()["log_segments_deleted"] >= 2
    broker.restart()  # the full vocabulary again: batch 1's samples all decode, and stay ended
    stats = broker.stats()
    assert stats["inflight_batch"] is None and stats["buffered"] == GROUP  # only g5


def test_durable_off_writes_no_log(running, tmp_path):
    broker = running("broker.durable=false")
    send(broker.client("actor"), group_samples(0, 0))
    assert not (tmp_path / "wal").exists() and broker.stats()["durable"] is False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the broker thread dies on purpose
@pytest.mark.parametrize("failure", ["disk_full", "unpackable"])
def test_a_log_that_cannot_take_a_record_stops_the_broker_before_it_acknowledges(running, monkeypatch, failure):
    """Fault injection (the only way to get ENOSPC here): the write fails, no ACK is sent, the broker stops.
    `unpackable`, found by a review: any other error between admitting samples and logging them cost one request,
    leaving them buffered but not logged; the actor's resend was then acknowledged as a duplicate, and a crash lost it."""
    import errno

    import broker.wal

    broker_ = running()
    send(broker_.client("actor"), group_samples(0, 0))

    def fail(*_):
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise ValueError("'I' format requires 0 <= number <= 4294967295")  # what a record over 4 GiB gave

    if failure == "disk_full":
        monkeypatch.setattr(broker.wal.os, "writev", fail)
    else:
        monkeypatch.setattr(broker_.server.log, "samples", fail)
    with pytest.raises(TimeoutError):
        broker_.client("actor2").request(m.SAMPLES, {"actor_id": "a0", "incarnation": "i0"}, samples=group_samples(1, 4), timeout_s=2.0)
    broker_.thread.join(5)
    assert not broker_.thread.is_alive()
    monkeypatch.undo()
    broker_.start()  # restarted on a healthy disk: the acknowledged group is there, the refused one is not
    stats = broker_.stats()
    assert stats["replayed"] == 4 and stats["ready_groups"] == 1


def test_a_log_written_under_wire_schema_1_is_refused_by_name(running, tmp_path):
    """Its samples records cannot be decoded any more: the broker refuses to start rather than lose them."""
    import msgpack

    from broker.durable import LogSchemaError
    from broker.wal import WriteAheadLog
    from tests.helpers import v1_message

    broker = running()
    send(broker.client("actor"), group_samples(0, 0))
    broker.stop_event.set()
    broker.thread.join(5)
    wal = WriteAheadLog(tmp_path / "wal")
    wal.start_segment(msgpack.packb({"windows": [], "next_batch_id": 1, "policy_version": 0}))
    sample = group_samples(1, 4)[0]
    wal.append_frames(v1_message(sample), [sample.key])
    wal.close()
    with pytest.raises(LogSchemaError, match="schema version 1, expected 3") as info:
        Broker(broker.config, VOCAB)
    assert str(tmp_path / "wal") in str(info.value)
    (tmp_path / "wal").rename(tmp_path / "wal-v1")  # moved away: the broker starts empty
    fresh = Broker(broker.config, VOCAB)
    assert fresh.stats()["replayed"] == 0
    fresh.close()

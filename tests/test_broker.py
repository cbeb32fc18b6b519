"""The broker over real ZeroMQ sockets: acks, dedupe, grouping, staleness, credits, batches, bad input."""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from broker.server import FORGET_AFTER_S, Broker
from protocol import messages as m
from protocol.config import load_config
from protocol.errors import PeerRefused
from protocol.sample import Sample
from protocol.transport import Client, tcp
from protocol.wire import decode, encode
from tests.helpers import make_sample, wait_for

VOCAB = 100
GROUP = 4


def sample(seq: int, group: int, index: int, version: int = 0, actor: str = "a0", **extra) -> Sample:
    return make_sample(reward=float(index), group_id=f"{actor}-g{group}", group_size=GROUP, index=index,
                       version_start=version, version_end=version, actor_id=actor, seq=seq, **extra)  # fmt: skip


def group_samples(group: int, first_seq: int, version: int = 0, actor: str = "a0") -> list[Sample]:
    return [sample(first_seq + i, group, i, version, actor) for i in range(GROUP)]


@pytest.fixture
def broker(endpoints, tmp_path):
    config = load_config(None, [
        f"run.dir={tmp_path}", f"endpoints.broker={endpoints['broker']}", f"sampling.group_size={GROUP}",
        "broker.credits_per_actor=12", "broker.max_policy_lag=1", "train.groups_per_step=2",
    ])  # fmt: skip
    server = Broker(config, VOCAB, stats_path=tmp_path / "broker_stats.json")  # written every second, as launch.py has it
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    yield server, endpoints["broker"]
    stop.set()
    thread.join(5)


def send(client: Client, samples: list[Sample], actor: str = "a0") -> dict:
    kind, body, _ = client.request(m.SAMPLES, {"actor_id": actor, "incarnation": "i0"}, samples=samples)
    assert kind == m.ACK
    return body


def get_batch(client: Client, groups: int, version: int, ack=None, wait_ms: int = 0):
    return client.request(m.GET_BATCH, {"groups": groups, "policy_version": version, "ack_batch": ack, "wait_ms": wait_ms}, timeout_s=30)


def raw_dealer(endpoint: str) -> zmq.Socket:
    """A bare DEALER, to send frames no Client would."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(tcp(endpoint))
    return raw


def test_acks_dedupes_and_credits(broker):
    server, endpoint = broker
    actor = Client(endpoint, "actor")
    body = send(actor, group_samples(0, 0))
    assert body["acked"] == [0, 1, 2, 3] and body["rejected"] == []
    assert body["credits"] == 12 - 4
    again = send(actor, group_samples(0, 0))  # a resend after a lost ack
    assert again["acked"] == [0, 1, 2, 3]  # acknowledged again, so the actor forgets them
    stats = actor.request(m.STATS)[1]
    assert stats["received"] == 8 and stats["accepted"] == 4 and stats["duplicates"] == 4
    assert stats["ready_groups"] == 1 and stats["buffered"] == 4


def test_serves_complete_groups_fifo_and_resends_unacked_batch(broker):
    _, endpoint = broker
    actor, learner = Client(endpoint, "actor"), Client(endpoint, "learner")
    send(actor, group_samples(0, 0)[:3])  # a partial group is never served
    assert get_batch(learner, 1, 0)[0] == m.NOT_READY
    send(actor, group_samples(0, 0)[3:] + group_samples(1, 4))
    kind, body, arrays = get_batch(learner, 1, 0)
    assert kind == m.BATCH and body["samples"]["group_id"] == ["a0-g0"]  # one group: its id sent once
    assert body["samples"]["index"] == [0, 1, 2, 3]
    first = body["batch_id"]
    kind, again, _ = get_batch(learner, 1, 0)  # no ack: the learner restarted, same batch again
    assert again["batch_id"] == first and again["stats"]["batches_resent"] == 1
    kind, nxt, _ = get_batch(learner, 1, 0, ack=first)
    assert kind == m.BATCH and nxt["batch_id"] == first + 1
    assert nxt["samples"]["group_id"] == ["a0-g1"]
    assert nxt["stats"]["served"] == 8


def test_stale_groups_are_dropped_and_counted(broker):
    _, endpoint = broker
    actor, learner = Client(endpoint, "actor"), Client(endpoint, "learner")
    send(actor, group_samples(0, 0, version=0))
    assert get_batch(learner, 2, version=2)[0] == m.NOT_READY  # lag 2 > max 1: evicted
    body = send(actor, group_samples(1, 4, version=0))  # arrives already stale
    assert body["acked"] == [4, 5, 6, 7] and body["policy_version"] == 2
    send(actor, group_samples(2, 8, version=1))  # lag 1: kept
    stats = actor.request(m.STATS)[1]
    assert stats["dropped_stale"] == 8 and stats["dropped_stale_groups"] == 1
    assert stats["ready_groups"] == 1
    assert stats["accepted"] == stats["served"] + stats["dropped_stale"] + stats["buffered"]


def test_credits_run_out_and_come_back_when_served(broker):
    _, endpoint = broker
    actor, learner = Client(endpoint, "actor"), Client(endpoint, "learner")
    body = send(actor, group_samples(0, 0) + group_samples(1, 4) + group_samples(2, 8))
    assert body["credits"] == 0
    kind, batch, _ = get_batch(learner, 2, 0)
    assert kind == m.BATCH
    assert actor.request(m.PING, {"actor_id": "a0"})[1]["credits"] == 8


def test_bad_samples_are_nacked_by_reason_and_good_ones_kept(broker):
    _, endpoint = broker
    actor = Client(endpoint, "actor")
    bad_vocab = sample(1, 0, 1, completion_ids=np.array([4, VOCAB], dtype=np.int32))
    nan_logprob = sample(2, 0, 2, behavior_logprobs=np.array([np.nan, -1.0], dtype=np.float32))
    body = send(actor, [sample(0, 0, 0), bad_vocab, nan_logprob])
    assert body["acked"] == [0]
    assert body["rejected"] == [[1, "token_out_of_vocab"], [2, "bad_logprobs"]]
    stats = actor.request(m.STATS)[1]
    assert stats["rejected_by_reason"] == {"token_out_of_vocab": 1, "bad_logprobs": 1}


def test_a_group_of_another_size_than_the_runs_is_rejected(broker):
    """Found by a helper's hunt: a group completed at its own claimed size, so a wire-valid group of 2 was served
    beside groups of 4 and the learner's step raised on the ragged rewards (and again after every resume)."""
    _, endpoint = broker
    client = Client(endpoint, "a0")
    small = [sample(i, 0, i) for i in range(2)]
    for s in small:
        s.group_size = 2
    body = send(client, [*small, *group_samples(1, 2)])
    assert body["acked"] == [2, 3, 4, 5] and body["rejected"] == [[0, "bad_sample"], [1, "bad_sample"]]
    learner = Client(endpoint, "learner")
    kind, batch, _ = get_batch(learner, 1, 0)
    assert kind == m.BATCH and set(batch["samples"]["group_size"]) == {GROUP}
    assert client.request(m.STATS)[1]["rejected_by_reason"] == {"bad_sample": 2}


def test_malformed_messages_get_an_error_and_the_broker_keeps_serving(broker):
    _, endpoint = broker
    raw = raw_dealer(endpoint)
    flipped = [bytes(f) for f in encode(m.SAMPLES, {"rid": 3}, [np.arange(4, dtype="<i4")])]
    flipped[1] = b"\xff" + flipped[1][1:]
    cases = [([b"\xc1garbage"], None), (encode("no_such_type", {"rid": 1}), 1), ([encode(m.PING, {"rid": 2})[0], b"extra"], 2), (flipped, 3)]
    for frames, rid in cases:
        raw.send_multipart(frames)
        assert raw.poll(5000)
        reply = raw.recv_multipart()
        kind, body, _ = decode(reply)
        assert kind == m.ERROR and body["rid"] == rid  # named whenever the header could be read: the sender's request ends now
    raw.close()
    stats = Client(endpoint, "probe").request(m.STATS)[1]
    assert stats["rejected_by_reason"] == {"bad_header": 1, "unknown_type": 1, "frame_count": 1, "checksum": 1}


def test_a_header_over_the_limit_is_refused_unread_and_good_samples_still_go_in(broker):
    """Five million empty maps (5 MB of msgpack, some 300 MB as Python objects) in a samples header."""
    server, endpoint = broker
    raw = raw_dealer(endpoint)
    header = {"v": 3, "type": m.SAMPLES, "body": {"rid": 1, "samples": {"metadata": [{}] * 5_000_000}}, "arrays": []}
    raw.send_multipart([msgpack.packb(header)])
    assert raw.poll(5000)
    kind, body, _ = decode(raw.recv_multipart())
    assert kind == m.ERROR and body["reason"] == "header_too_large"
    raw.close()
    client = Client(endpoint, "a0")
    assert send(client, group_samples(0, 0))["acked"] == list(range(GROUP))
    assert client.request(m.STATS)[1]["rejected_by_reason"] == {"header_too_large": 1}


def test_a_message_over_the_size_limit_is_refused_by_name_to_its_sender(endpoints, tmp_path):
    """Found by a helper's hunt: the refusal named no request, so the sender waited out its timeout and could not
    tell "too large" from "broker down"."""
    config = load_config(None, [f"run.dir={tmp_path}", f"endpoints.broker={endpoints['broker']}", f"sampling.group_size={GROUP}",
                                "broker.max_message_bytes=200000", "broker.durable=false"])  # fmt: skip
    server, stop = Broker(config, VOCAB), threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    client = Client(endpoints["broker"], "actor")
    try:
        big = sample(0, 0, 0, completion_ids=np.ones(30_000, np.int32), behavior_logprobs=np.zeros(30_000, np.float32))
        started = time.monotonic()
        with pytest.raises(PeerRefused, match="too_large"):
            client.request(m.SAMPLES, {"actor_id": "a0", "incarnation": "i0"}, samples=[big], timeout_s=30)
        assert time.monotonic() - started < 5
    finally:
        client.close()
        stop.set()
        thread.join(5)


def test_an_injected_decoder_bug_costs_one_message_not_the_broker(broker, monkeypatch):
    """Whatever `decode` raises (here an injected RuntimeError standing in for a bug), the sender gets an error
    and the broker keeps serving; found when a numpy ValueError on an odd shape escaped and stopped it."""
    import broker.server as server_module

    real_decode = server_module.decode

    def buggy_decode(frames, *args):
        if bytes(frames[0]) == b"boom":
            raise RuntimeError("injected decoder bug")
        return real_decode(frames, *args)

    monkeypatch.setattr(server_module, "decode", buggy_decode)
    _, endpoint = broker
    raw = raw_dealer(endpoint)
    raw.send_multipart([b"boom"])
    assert raw.poll(5000)
    kind, body, _ = decode(raw.recv_multipart())
    raw.close()
    assert (kind, body["reason"]) == (m.ERROR, "internal_error") and "injected decoder bug" in body["detail"]
    assert send(Client(endpoint, "actor"), [sample(0, 0, 0)])["acked"] == [0]
    assert Client(endpoint, "probe").request(m.STATS)[1]["rejected_by_reason"] == {"internal_error": 1}


def test_a_flood_of_bad_messages_is_counted_in_full_and_logged_in_a_few_lines(broker, caplog):
    _, endpoint = broker
    raw = raw_dealer(endpoint)
    started, sent = time.monotonic(), 0
    with caplog.at_level(logging.WARNING, logger="broker"):
        while time.monotonic() - started < 2.5:  # a flood lasting 2.5 s
            raw.send_multipart([b"\xc1garbage"])
            assert raw.poll(5000)
            raw.recv_multipart()
            sent += 1
    raw.close()
    assert Client(endpoint, "probe").request(m.STATS)[1]["rejected_by_reason"] == {"bad_header": sent}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected:")]
    assert 2 <= len(lines) <= 4 and sent > 100  # at most one a second
    assert all(line.startswith("rejected: bad_header: header is not msgpack") for line in lines)
    more = [int(line.split("(and ")[1].split()[0]) for line in lines[1:]]  # each later line says how many it stands for
    assert min(more) > 0 and len(lines) + sum(more) <= sent


def test_a_group_left_incomplete_by_a_rejected_sample_expires_and_gives_its_credit_back(endpoints, tmp_path):
    """Its actor stays alive (pinging), so only the group's own age can free the credit its three good samples hold."""
    config = load_config(None, [
        f"run.dir={tmp_path}", f"endpoints.broker={endpoints['broker']}", f"sampling.group_size={GROUP}",
        f"broker.credits_per_actor={GROUP}", "broker.actor_ttl_s=1", "train.groups_per_step=1",
    ])  # fmt: skip
    server, stop = Broker(config, VOCAB), threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        client = Client(endpoints["broker"], "a0")
        bad = sample(3, 0, 3, behavior_logprobs=np.array([0.5, -1.0], dtype=np.float32))  # a positive log-prob
        body = send(client, group_samples(0, 0)[:3] + [bad])
        assert body["acked"] == [0, 1, 2] and body["rejected"] == [[3, "bad_logprobs"]] and body["credits"] == 1
        window = server.buffer.seen[("a0", "i0")]
        assert (window.below, window.above) == (GROUP, set())  # the rejected seq leaves no gap: it is never resent
        for _ in range(30):  # alive all along: not the silent-actor expiry
            credits = client.request(m.PING, {"actor_id": "a0", "incarnation": "i0"})[1]["credits"]
            if credits == GROUP:
                break
            time.sleep(0.2)
        stats = client.request(m.STATS)[1]
        assert credits == GROUP and stats["expired"] == 3 and stats["partial_groups"] == 0
    finally:
        stop.set()
        thread.join(5)


def test_sample_from_another_actor_id_is_rejected(broker):
    _, endpoint = broker
    body = send(Client(endpoint, "actor"), [sample(0, 0, 0, actor="someone-else")], actor="a0")
    assert body["acked"] == [] and body["rejected"] == [[0, "bad_sample"]]


def test_a_sample_for_an_index_its_group_already_holds_is_rejected_and_the_group_completes_as_sent(broker):
    """Found by a helper's hunt: groups were assembled by id alone, so another sender's sample (or a sender reusing
    an id) joined a partial group: index 0 twice, two prompts, and the real last sample left to expire."""
    _, endpoint = broker
    honest, hostile = Client(endpoint, "honest"), Client(endpoint, "hostile")
    assert send(honest, group_samples(0, 0)[:3])["acked"] == [0, 1, 2]
    intruder = sample(0, 0, 0, actor="evil")
    intruder.group_id = "a0-g0"
    body = send(hostile, [intruder], actor="evil")
    assert body["acked"] == [] and body["rejected"] == [[0, "bad_sample"]]
    assert send(honest, group_samples(0, 0)[3:])["acked"] == [3]
    kind, body, _ = get_batch(Client(endpoint, "learner"), 1, 0)
    assert kind == m.BATCH and body["samples"]["actor_id"] == ["a0"] and body["samples"]["index"] == [0, 1, 2, 3]
    stats = honest.request(m.STATS)[1]
    assert stats["rejected_by_reason"] == {"bad_sample": 1} and stats["accepted"] == GROUP


@pytest.mark.parametrize("counters", [{"x": b"\x00"}, {b"x": 1}, {"deep": [[[1]]]}, {f"c{i}": 1 for i in range(257)}, [1]])
def test_counters_the_stats_could_not_hold_are_refused_and_the_broker_keeps_serving(broker, counters):
    """Found by a helper's hunt: an actor's counters went into the stats unchecked, and bytes (or nesting too deep
    for JSON) stopped the broker when it next wrote them, within a second."""
    server, endpoint = broker
    client = Client(endpoint, "actor")
    with pytest.raises(PeerRefused, match="bad_request: counters must map"):
        client.request(m.PING, {"actor_id": "a0", "counters": counters})
    time.sleep(1.5)  # the broker writes its stats every second
    assert client.request(m.PING, {"actor_id": "a0", "counters": {"groups_sent": 3}})[0] == m.STATUS
    assert server.stats()["actor_counters"] == {"a0": {"groups_sent": 3}}


def test_actors_silent_for_long_leave_the_stats(broker):
    """Per-actor maps were never pruned, and they ride along in every batch to the learner: ids that come
    and go (elastic actors, restarts, made-up ids) grew them for good."""
    server, endpoint = broker
    client = Client(endpoint, "actor")
    for actor in ("a0", "gone"):
        client.request(m.PING, {"actor_id": actor, "counters": {"groups_sent": 1}, "gen_tokens_per_s": 5.0})
    send(client, group_samples(0, 0, actor="gone"), actor="gone")
    assert get_batch(Client(endpoint, "learner"), 1, 0)[0] == m.BATCH
    assert server.buffer.held["gone"] == 0 and "gone" in server.buffer.held  # served: nothing held, still counted over
    server.actor_seen["gone"] -= FORGET_AFTER_S + 1
    wait_for(lambda: "gone" not in server.stats()["actor_counters"], 5, "the silent actor to be dropped")
    assert server.stats()["actor_counters"] == {"a0": {"groups_sent": 1}}
    assert "gone" not in server.actor_seen and "gone" not in server.actor_rates
    assert "gone" not in server.buffer.held and "gone" not in server.buffer.held_bytes
    client.request(m.PING, {"actor_id": "gone", "counters": {"groups_sent": 2}})  # back again: known again
    assert server.stats()["actor_counters"]["gone"] == {"groups_sent": 2}


def test_a_restarted_actors_old_dedupe_window_is_freed_and_a_live_ones_kept(broker):
    """Every incarnation kept its window for good: a slow leak over actor restarts, in memory and in each log
    snapshot. Only an incarnation superseded by a newer one of its actor id, and silent for long, is let go."""
    server, endpoint = broker
    client = Client(endpoint, "actor")
    for group, (actor, incarnation) in enumerate((("a0", "old"), ("a0", "new"), ("lone", "i0"))):
        body = {"actor_id": actor, "incarnation": incarnation}
        assert client.request(m.SAMPLES, body, samples=[sample(0, group, 0, actor=actor, incarnation=incarnation)])[1]["acked"] == [0]
    assert {("a0", "old"), ("a0", "new"), ("lone", "i0")} <= set(server.buffer.seen)
    for owner in (("a0", "old"), ("lone", "i0")):  # both silent for long; only the first was superseded
        server.window_seen[owner] -= FORGET_AFTER_S + 1
    wait_for(lambda: ("a0", "old") not in server.buffer.seen, 5, "the superseded window to be freed")
    assert ("a0", "new") in server.buffer.seen and ("lone", "i0") in server.buffer.seen
    assert ("a0", "old") not in server.window_seen


def test_finish_tells_actors_to_stop(broker):
    _, endpoint = broker
    actor, learner = Client(endpoint, "actor"), Client(endpoint, "learner")
    assert actor.request(m.HELLO, {"actor_id": "a0"})[1]["stop"] is False
    learner.request(m.FINISH)
    assert actor.request(m.PING, {"actor_id": "a0"})[1]["stop"] is True


def test_a_waiting_get_batch_is_answered_as_soon_as_its_batch_completes(broker):
    _, endpoint = broker
    actor, learner = Client(endpoint, "actor"), Client(endpoint, "learner")
    started = time.monotonic()
    assert get_batch(learner, 1, 0, wait_ms=300)[0] == m.NOT_READY  # nothing came: answered when the wait is over
    assert 0.25 < time.monotonic() - started < 3
    threading.Timer(0.3, lambda: send(Client(endpoint, "late-actor"), group_samples(0, 0))).start()
    started = time.monotonic()
    kind, body, _ = get_batch(learner, 1, 0, wait_ms=20_000)
    assert kind == m.BATCH and body["samples"]["seq"] == [0, 1, 2, 3]
    assert time.monotonic() - started < 5  # woken by the group, not by the 20 s wait
    with pytest.raises(PeerRefused, match="wait_ms") as refused:
        get_batch(learner, 1, 0, wait_ms=-1)
    assert refused.value.reason == "bad_request"
    assert actor.request(m.STATS)[1]["served"] == 4


def test_a_group_that_completes_a_waiting_batch_shares_its_fsync(broker):
    server, endpoint = broker
    learner, actor = Client(endpoint, "learner"), Client(endpoint, "actor")
    before = actor.request(m.STATS)[1]["fsyncs"]
    waiting: list = []
    thread = threading.Thread(target=lambda: waiting.append(get_batch(learner, 1, 0, wait_ms=20_000)))
    thread.start()
    wait_for(lambda: server.parked is not None, 10, "the learner's request to wait in the broker")
    assert send(actor, group_samples(0, 0))["acked"] == [0, 1, 2, 3]
    thread.join(10)
    kind, body, _ = waiting[0]
    assert kind == m.BATCH and body["samples"]["seq"] == [0, 1, 2, 3]
    assert actor.request(m.STATS)[1]["fsyncs"] - before == 1  # the batch's fsync made the samples durable too


MMAPPED_BLOCKS = """
import ctypes, sys
from protocol.memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblks
message = bytearray(1 << 20)  # what libzmq mallocs for a 1 MB message
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_the_broker_takes_large_message_buffers_from_the_heap():
    """glibc mmaps a fresh 1 MB block (and unmaps it when freed, so the next one faults in again); the broker reuses the heap."""
    mapped = {mode: subprocess.run([sys.executable, "-c", MMAPPED_BLOCKS, mode], capture_output=True, text=True, check=True).stdout.strip()
              for mode in ("default", "keep")}  # fmt: skip
    assert mapped == {"default": "1", "keep": "0"}

"""learner/main.py: BatchSource against a real ROUTER socket that plays the broker (refusals are retried, then fatal),
and the policy version a learner starts at."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.server import Broker
from learner import main as learner_main
from learner.main import BatchSource, broker_version, rising_version
from protocol import messages as m
from protocol.config import load_config
from protocol.errors import RoleFailed
from protocol.transport import Client, send_frames, send_reply
from protocol.wire import encode_samples
from tests.helpers import make_sample, router_in_thread


@contextmanager
def refusing_broker(refusals: int) -> Iterator[tuple[Client, list[dict]]]:
    """A learner's client to a ROUTER that answers GET_BATCH with ERROR `refusals` times, then with a batch
    of one group of two samples; also yields the requests it got."""
    requests: list[dict] = []

    def answer(router, identity: bytes, _kind: str, body: dict) -> None:
        requests.append(body)
        if len(requests) <= refusals:
            send_reply(router, identity, body["rid"], m.ERROR, {"reason": "internal_error", "detail": "injected"})
        else:
            group = [make_sample(group_id="g", group_size=2, index=i, seq=i) for i in range(2)]
            send_frames(router, identity, encode_samples(m.BATCH, group, {"rid": body["rid"], "batch_id": 7, "stats": {}}))

    with router_in_thread(answer) as endpoint:
        client = Client(endpoint, "learner-test")
        try:
            yield client, requests
        finally:
            client.close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(learner_main, "REFUSED_PAUSE_S", 0.01)


def test_refused_batch_requests_are_counted_and_asked_again(quick_retries):
    with refusing_broker(refusals=learner_main.MAX_REFUSALS - 1) as (client, requests):
        source = BatchSource(client, groups=1, last_batch=3)
        groups, _ = source.next(version=0, stop=threading.Event())
    assert [[s.index for s in g] for g in groups] == [[0, 1]]
    assert source.refusals == learner_main.MAX_REFUSALS - 1 and source.last_batch == 7
    assert len(requests) == source.refusals + 1
    assert {r["ack_batch"] for r in requests} == {3}  # the unacknowledged batch, every time


def test_a_request_refused_again_and_again_stops_the_learner_with_the_reason(quick_retries):
    with refusing_broker(refusals=10**6) as (client, requests):
        with pytest.raises(RoleFailed, match=f"refused {learner_main.MAX_REFUSALS} batch requests in a row.*internal_error: injected"):
            BatchSource(client, groups=1).next(version=0, stop=threading.Event())
    assert len(requests) == learner_main.MAX_REFUSALS


def test_stopping_ends_the_pause_after_a_refusal(monkeypatch):
    monkeypatch.setattr(learner_main, "REFUSED_PAUSE_S", 60.0)
    stop = threading.Event()
    with refusing_broker(refusals=10**6) as (client, requests):
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        assert BatchSource(client, groups=1).next(version=0, stop=stop) is None
        assert time.monotonic() - started < 10
    assert len(requests) == 1


@pytest.mark.parametrize(
    ("restored", "heard", "start"),
    [
        (0, 0, 0),  # a fresh run
        (4, 4, 4),  # resumed from the step the broker last heard of: the same weights, the same number
        (6, 4, 6),  # the broker restarted without its log: it takes the higher version
        (2, 4, 6),  # an older checkpoint: past 4 and 5 (published, perhaps fetched, then discarded)
        (0, 9, 11),  # no checkpoint at all against a broker that heard of 9
    ],
)
def test_the_starting_version_never_reuses_a_number_that_may_name_discarded_weights(restored, heard, start):
    assert rising_version(restored, heard) == start


def test_a_broker_restarted_without_its_log_still_tells_the_version_its_actors_hold(endpoints, tmp_path):
    """A review: such a broker says version 0, while its actors hold weights of version 7 from before; a learner
    resuming from an older checkpoint must still start past 7 (they fetch only newer weights)."""
    config = load_config(None, [f"run.dir={tmp_path}", f"endpoints.broker={endpoints['broker']}", "broker.durable=false"])
    server, stop = Broker(config, 100), threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    actor, learner = Client(endpoints["broker"], "actor"), Client(endpoints["broker"], "learner")
    try:
        assert broker_version(learner, threading.Event()) == 0
        actor.request(m.PING, {"actor_id": "a0", "counters": {"version": 7, "groups_sent": 3}})
        assert broker_version(learner, threading.Event()) == 7 and rising_version(3, 7) == 9
    finally:
        stop.set()
        thread.join(5)
        actor.close()
        learner.close()

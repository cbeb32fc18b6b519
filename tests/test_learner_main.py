"""learner/main.py's BatchSource against a real ROUTER socket that plays the broker: refusals are retried, then fatal."""

from __future__ import annotations

import threading
import time

import pytest

from learner import main as learner_main
from learner.main import BatchSource
from protocol import messages as m
from protocol.errors import RoleFailed
from protocol.transport import Client, bind_router, free_port, send_frames, send_reply
from protocol.wire import decode, encode_samples
from tests.helpers import make_sample


class RefusingBroker:
    """Answers GET_BATCH with ERROR `refusals` times, then with a batch of one group of two samples."""

    def __init__(self, refusals: int) -> None:
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.router = bind_router(self.endpoint, 1 << 24)
        self.refusals = refusals
        self.requests: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            identity, *frames = self.router.recv_multipart()
            _, body, _ = decode(frames)
            self.requests.append(body)
            if len(self.requests) <= self.refusals:
                send_reply(self.router, identity, body["rid"], m.ERROR, {"reason": "internal_error", "detail": "injected"})
            else:
                group = [make_sample(group_id="g", group_size=2, index=i, seq=i) for i in range(2)]
                send_frames(self.router, identity, encode_samples(m.BATCH, group, {"rid": body["rid"], "batch_id": 7, "stats": {}}))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close(linger=0)


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(learner_main, "REFUSED_PAUSE_S", 0.01)


def test_refused_batch_requests_are_counted_and_asked_again(quick_retries):
    broker = RefusingBroker(refusals=learner_main.MAX_REFUSALS - 1)
    client = Client(broker.endpoint, "learner-test")
    try:
        source = BatchSource(client, groups=1, last_batch=3)
        groups, _ = source.next(version=0, stop=threading.Event())
    finally:
        client.close()
        broker.close()
    assert [[s.index for s in g] for g in groups] == [[0, 1]]
    assert source.refusals == learner_main.MAX_REFUSALS - 1 and source.last_batch == 7
    assert len(broker.requests) == source.refusals + 1
    assert {r["ack_batch"] for r in broker.requests} == {3}  # the unacknowledged batch, every time


def test_a_request_refused_again_and_again_stops_the_learner_with_the_reason(quick_retries):
    broker = RefusingBroker(refusals=10**6)
    client = Client(broker.endpoint, "learner-test")
    try:
        with pytest.raises(RoleFailed, match=f"refused {learner_main.MAX_REFUSALS} batch requests in a row.*internal_error: injected"):
            BatchSource(client, groups=1).next(version=0, stop=threading.Event())
    finally:
        client.close()
        broker.close()
    assert len(broker.requests) == learner_main.MAX_REFUSALS


def test_stopping_ends_the_pause_after_a_refusal(monkeypatch):
    monkeypatch.setattr(learner_main, "REFUSED_PAUSE_S", 60.0)
    broker = RefusingBroker(refusals=10**6)
    client, stop = Client(broker.endpoint, "learner-test"), threading.Event()
    try:
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        assert BatchSource(client, groups=1).next(version=0, stop=stop) is None
        assert time.monotonic() - started < 10
    finally:
        client.close()
        broker.close()
    assert len(broker.requests) == 1

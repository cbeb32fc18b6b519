"""protocol/transport.py: picking endpoints, and posting requests whose replies are collected later (real sockets)."""

from __future__ import annotations

import socket
import time

import pytest

from protocol import messages as m
from protocol.messages import ERROR
from protocol.transport import Client, free_ports, send_reply
from tests.helpers import router_in_thread


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    held = []
    try:
        for port in ports:  # every one can be bound, all at once
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def echo_server():
    """A real ROUTER that answers each request in order, after the `delay_s` it asks for,
    with ERROR when it asks for one."""

    def echo(router, identity: bytes, kind: str, body: dict) -> None:
        time.sleep(body.get("delay_s", 0))
        send_reply(router, identity, body["rid"], ERROR if body.get("fail") else kind, {"echo": body.get("n")})

    with router_in_thread(echo) as endpoint:
        yield endpoint


def collect_all(client: Client, count: int) -> list:
    replies, deadline = [], time.monotonic() + 5
    while len(replies) < count and time.monotonic() < deadline:
        replies += client.collect(wait_s=0.5)
    return replies


def test_posted_requests_are_answered_in_order_without_waiting(echo_server):
    client = Client(echo_server, "poster")
    try:
        started = time.monotonic()
        rids = [client.post(m.PING, {"n": i, "delay_s": 0.2}) for i in range(3)]
        assert time.monotonic() - started < 0.2  # posting did not wait for any reply
        assert set(client.posted) == set(rids)
        replies = collect_all(client, 3)
        assert [body["echo"] for _, body, _ in replies] == [0, 1, 2]
        assert client.posted == {} and client.collect() == []
    finally:
        client.close()


def test_a_request_keeps_the_replies_to_posted_ones_for_collect(echo_server):
    """The actor PINGs while its SAMPLES are unanswered: their acknowledgements must not be dropped."""
    client = Client(echo_server, "poster")
    try:
        client.post(m.SAMPLES, {"n": "posted", "delay_s": 0.2})
        failing = client.post(m.SAMPLES, {"n": "refused", "fail": True})
        assert client.request(m.PING, {"n": "ping"})[1]["echo"] == "ping"
        kinds_and_echoes = [(kind, body["echo"]) for kind, body, _ in client.collect()]
        assert kinds_and_echoes == [(m.SAMPLES, "posted"), (ERROR, "refused")]  # an ERROR reply is collected, not raised
        assert failing not in client.posted
    finally:
        client.close()


def test_a_forgotten_request_s_late_reply_is_discarded(echo_server):
    client = Client(echo_server, "poster")
    try:
        late = client.post(m.PING, {"n": "late", "delay_s": 0.3})
        client.forget(late)
        client.post(m.PING, {"n": "kept"})
        assert [body["echo"] for _, body, _ in collect_all(client, 1)] == ["kept"]  # the late one came first, unkept
        assert client.posted == {} and client.collect(wait_s=0.2) == []  # nothing posted: nothing to wait for
    finally:
        client.close()

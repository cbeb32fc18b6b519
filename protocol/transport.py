"""ZeroMQ request/reply over DEALER -> ROUTER, with request ids and timeouts.

A DEALER never blocks forever: a request that gets no reply in time raises
`TimeoutError`, and a late reply to an earlier request is recognised by its id and
discarded. That is what lets a client survive a restarted peer: it asks again.
A client may also `post` requests without waiting and `collect` their replies later
(an actor keeps stepping its engine while the broker makes its samples durable).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from protocol.errors import PeerRefused
from protocol.messages import ERROR, tcp
from protocol.sample import Sample
from protocol.wire import decode, encode, encode_samples

Reply = tuple[str, dict[str, Any], list[np.ndarray]]


class Client:
    """A DEALER that waits for each `request`'s reply, and keeps the replies to `post`ed requests for `collect`."""

    def __init__(self, endpoint: str, identity: str, max_bytes: int = 1 << 31, curve_dir: Path | None = None) -> None:
        """`curve_dir`: connect with CURVE, using the client and server keys there (protocol/curve.py)."""
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)  # a restarted peer is found again quickly,
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # with exponential backoff while it stays away
        self.socket.setsockopt_string(zmq.IDENTITY, identity)
        if curve_dir is not None:
            from protocol.curve import arm_client

            arm_client(self.socket, curve_dir)
        self.socket.connect(tcp(endpoint))
        self._ids = itertools.count()
        self.posted: dict[int, float] = {}  # request id -> when it was posted, until its reply is collected or forgotten
        self._arrived: list[Reply] = []  # replies to posted requests, in arrival order

    def request(
        self,
        kind: str,
        body: dict[str, Any] | None = None,
        arrays: list[np.ndarray] = (),
        samples: list[Sample] = (),
        timeout_s: float = 10.0,
    ) -> Reply:
        """Send one request and wait for its reply; raise TimeoutError, or PeerRefused on an ERROR reply."""
        rid = self._send(kind, body, arrays, samples, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            reply = self._receive()
            if reply is not None and reply[1].get("rid") == rid:
                if reply[0] == ERROR:
                    raise PeerRefused(self.endpoint, str(reply[1].get("reason")), str(reply[1].get("detail")))
                return reply
        raise TimeoutError(f"no reply from {self.endpoint} within {timeout_s:.1f} s")

    def post(self, kind: str, body: dict[str, Any] | None = None, samples: list[Sample] = (), timeout_s: float = 10.0) -> int:
        """Send a request without waiting for its reply (`collect` returns it); raise TimeoutError if it cannot be sent."""
        rid = self._send(kind, body, (), samples, timeout_s)
        self.posted[rid] = time.monotonic()
        return rid

    def collect(self, wait_s: float = 0.0) -> list[Reply]:
        """The replies to posted requests that arrived so far, ERROR replies included, in order; if there are
        none yet, wait up to `wait_s` for one (not at all when nothing is posted)."""
        if not self.posted:
            return self.arrived()
        deadline = time.monotonic() + wait_s
        while self.socket.poll(0 if self._arrived else max(0, int((deadline - time.monotonic()) * 1000))):
            self._receive()
        return self.arrived()

    def arrived(self) -> list[Reply]:
        """The replies to posted requests already taken off the socket (while a `request` waited), in order."""
        arrived, self._arrived = self._arrived, []
        return arrived

    def forget(self, rid: int) -> None:
        """Stop expecting a reply to a posted request (it timed out); a late one is discarded."""
        self.posted.pop(rid, None)

    def _send(self, kind: str, body: dict[str, Any] | None, arrays: list[np.ndarray], samples: list[Sample], timeout_s: float) -> int:
        rid = next(self._ids)
        body = {**(body or {}), "rid": rid}
        frames = encode_samples(kind, samples, body) if samples else encode(kind, body, arrays)
        self.socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # no peer (e.g. refused by CURVE): sending would block
        try:
            self.socket.send_multipart(frames, copy=False)
        except zmq.Again:
            raise TimeoutError(f"cannot send to {self.endpoint}: no connection within {timeout_s:.1f} s") from None
        return rid

    def _receive(self) -> Reply | None:
        """Take one reply off the socket; one to a posted request is kept for `collect` (and None returned)."""
        reply = decode(self.socket.recv_multipart(copy=False), self.max_bytes)
        rid = reply[1].get("rid")
        if type(rid) is not int or self.posted.pop(rid, None) is None:
            return reply
        self._arrived.append(reply)
        return None

    def close(self) -> None:
        self.socket.close(linger=0)


def send_reply(socket: zmq.Socket, identity: bytes, rid: Any, kind: str, body: dict[str, Any] | None = None, arrays: list[np.ndarray] = ()) -> bool:
    """Reply on a ROUTER; False if the peer is gone (the message is dropped, never blocks)."""
    return send_frames(socket, identity, encode(kind, {**(body or {}), "rid": rid}, arrays))


def send_frames(socket: zmq.Socket, identity: bytes, frames: list) -> bool:
    try:
        socket.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
        return True
    except (zmq.Again, zmq.ZMQError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests and benchmarks that start their own endpoints)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports. Asked one at a time, the kernel may hand out a port it just handed
    out (it was closed again), so two endpoints of one test could collide; all are held until all are picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def bind_router(endpoint: str, max_bytes: int, arm: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
    """A ROUTER bound to `endpoint`; `arm` configures it before the bind (e.g. CURVE)."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if arm is not None:
        arm(socket)
    socket.bind(tcp(endpoint))
    return socket

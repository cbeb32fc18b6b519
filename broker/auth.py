"""The broker's side of CURVE: server keys, a ZAP allow-list, and a count of refused clients.

Every connection must complete a CURVE handshake with the broker's key, and then the
ZAP handler (a thread answering libzmq on inproc://zeromq.zap.01) admits it only if
the client's public key is in `keys_dir/allowed/*.key`. A client with no key fails
the handshake (mechanism mismatch), one with another key is denied by ZAP; both show
up as failed handshakes on the socket monitor, which is what `auth_refused` counts.
A refused client never gets a connection, so it can neither push nor pull.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("broker.auth")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class Guard:
    """Arms a ROUTER (before it binds) as a CURVE server with an allow-list; `poll` counts refused handshakes."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = Path(keys_dir)
        self.allowed = {zmq.utils.z85.decode(zmq.auth.load_certificate(p)[0]) for p in (self.keys_dir / "allowed").glob("*.key")}
        self.refused = 0
        self.stop = threading.Event()
        self.monitor: zmq.Socket | None = None

    def arm(self, socket: zmq.Socket) -> None:
        public, secret = zmq.auth.load_certificate(self.keys_dir / "server.key_secret")
        self.zap = socket.context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.thread = threading.Thread(target=self._answer, name="zap", daemon=True)
        self.thread.start()
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
        socket.zap_domain = b"streamrl"
        self.monitor = socket.get_monitor_socket(REFUSALS)
        log.info("CURVE on: %d allowed client keys in %s", len(self.allowed), self.keys_dir / "allowed")

    def poll(self) -> None:
        """Count the refusals reported since the last call."""
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.refused += 1
            log.warning("refused a client at %s (event %s)", event.get("endpoint"), event.get("event"))

    def close(self) -> None:
        self.stop.set()
        if self.monitor is not None:
            self.thread.join(2)
            self.monitor.close(linger=0)

    def _answer(self) -> None:
        while not self.stop.is_set():
            if not self.zap.poll(100):
                continue
            version, request_id, _domain, _address, _identity, mechanism, *credentials = self.zap.recv_multipart()
            ok = mechanism == b"CURVE" and bool(credentials) and credentials[0] in self.allowed
            status = [b"200", b"OK"] if ok else [b"400", b"client key not allowed"]
            self.zap.send_multipart([version, request_id, *status, b"", b""])
        self.zap.close(linger=0)

"""protocol/transport.py helpers that tests and benchmarks rely on to pick their endpoints."""

from __future__ import annotations

import socket

from protocol.transport import free_ports


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

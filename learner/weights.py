"""Serving new weights over the CPU channel: a ROUTER thread answers actors' GET_WEIGHTS.

The learner packs the state dict once per version; the server thread replies with
the latest packed blob to whoever asks with an older version, so a slow or
late-joining actor always catches up to the newest weights in one transfer.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
import zmq

from protocol import messages as m
from protocol.transport import bind_router, send_reply
from protocol.weights import WeightSender, pack_state_dict
from protocol.wire import decode

log = logging.getLogger("learner.weights")


class TcpWeightServer(WeightSender):
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._latest: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weight-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        packed = pack_state_dict(state_dict)
        with self._lock:
            self._latest = (version, packed)

    def _serve(self) -> None:
        socket = bind_router(self.endpoint, 1 << 20)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if socket.poll(100):
                    frames = socket.recv_multipart(copy=False)
                    self._answer(socket, frames[0].bytes, frames[1:])
        finally:
            socket.close(linger=0)

    def _answer(self, socket: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            kind, body, _ = decode(frames, 1 << 20)
        except ValueError as err:
            log.warning("bad weight request: %s", err)
            return
        with self._lock:
            latest = self._latest
        have = body.get("have")
        if kind != m.GET_WEIGHTS or not isinstance(have, int):
            send_reply(socket, identity, body.get("rid"), m.ERROR, {"reason": "bad_request", "detail": "expected get_weights with have"})
        elif latest is None or latest[0] <= have:
            send_reply(socket, identity, body.get("rid"), m.NO_UPDATE)
        else:
            send_reply(socket, identity, body.get("rid"), m.WEIGHTS, {"version": latest[0], "format": "safetensors"}, [latest[1]])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

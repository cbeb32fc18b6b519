"""Receiving new weights over the CPU channel (TCP request/reply to the learner)."""

from __future__ import annotations

import torch

from protocol import messages as m
from protocol.transport import Client
from protocol.weights import WeightReceiver, unpack_state_dict


class TcpWeightReceiver(WeightReceiver):
    def __init__(self, endpoint: str, identity: str, timeout_s: float = 60.0) -> None:
        self.client = Client(endpoint, identity)
        self.timeout_s = timeout_s

    def fetch(self, have: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        kind, body, arrays = self.client.request(m.GET_WEIGHTS, {"have": have}, timeout_s=self.timeout_s)
        if kind != m.WEIGHTS:
            return None
        return int(body["version"]), unpack_state_dict(arrays[0])

    def close(self) -> None:
        self.client.close()

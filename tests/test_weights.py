"""The CPU weight channel: bit-exact over a real TCP socket, tied weights sent once, newest version wins."""

from __future__ import annotations

import torch

from actors.weights import TcpWeightReceiver
from learner.weights import TcpWeightServer
from protocol.weights import pack_state_dict, unpack_state_dict


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(50, 8, generator=gen)
    return {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": torch.randn(8, generator=gen),
        "lm_head.weight": embed,  # tied: the same storage
        "model.half": torch.randn(3, 4, generator=gen).bfloat16(),
    }


def test_pack_round_trip_is_bit_exact_and_sends_tied_tensors_once():
    original = state(0)
    restored = unpack_state_dict(pack_state_dict(original))
    assert set(restored) == {"model.embed_tokens.weight", "model.norm.weight", "model.half"}
    for name, tensor in restored.items():
        assert tensor.dtype == original[name].dtype
        assert torch.equal(tensor, original[name])


def test_tcp_channel_serves_the_newest_version_bit_exact(endpoints):
    server = TcpWeightServer(endpoints["weights"])
    receiver = TcpWeightReceiver(endpoints["weights"], "actor-test")
    try:
        assert receiver.fetch(have=0) is None  # nothing published yet
        server.publish(1, state(1))
        server.publish(2, state(2))  # an actor that was away catches up in one transfer
        version, weights = receiver.fetch(have=0)
        assert version == 2
        for name, tensor in weights.items():
            assert torch.equal(tensor, state(2)[name])
        assert receiver.fetch(have=2) is None
    finally:
        receiver.close()
        server.close()

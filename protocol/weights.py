"""The weight data plane: how a state dict travels from the learner to the actors.

Weights go as one safetensors blob (names, dtypes and shapes in its own header, no
pickle) inside a WEIGHTS message, whose CRC covers every byte. The sender and
receiver base classes are the seam where the GPU transports (NCCL buckets, CUDA
IPC) plug in later; the CPU channel here is a ZeroMQ request/reply over TCP.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load, save


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied ones (e.g. lm_head sharing the embedding) once under their first name.

    Loaders that tie them (vLLM, HF `from_pretrained`) rebuild the alias themselves.
    """
    unique, seen = {}, set()
    for name, tensor in state_dict.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor.detach().contiguous().cpu()
    return unique


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """Serialise to a uint8 array that can be sent as one raw frame."""
    blob = save(unique_tensors(state_dict))
    return np.frombuffer(blob, dtype=np.uint8)


def unpack_state_dict(array: np.ndarray) -> dict[str, torch.Tensor]:
    return load(array.tobytes())


class WeightSender:
    """Learner side: make `state_dict` at `version` available to every actor."""

    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WeightReceiver:
    """Actor side: fetch weights newer than `have`, or None if there are none yet."""

    def fetch(self, have: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

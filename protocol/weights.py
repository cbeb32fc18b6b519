"""The weight data plane: how a state dict travels from the learner to the actors.

Every transport moves the same thing: a `protocol.buckets.Manifest` and the flat
buckets it describes (names, dtypes, shapes and a checksum per bucket, no pickle).
The learner picks the transport (`learner.weight_transport`): `tcp` streams
buckets over ZeroMQ, `shm` hands same-host actors a shared-memory segment, `nccl`
broadcasts GPU buckets, `cuda_ipc` shares them on one GPU. Receivers apply a
version only when every bucket arrived and verified; otherwise `fetch` raises
`WeightTransferError`, the actor keeps its old weights, and asks again later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from protocol.errors import WeightTransferError

Progress = Callable[[int, int], None]  # (buckets verified so far, buckets in the version)
NCCL_REPLY_TIMEOUT_S = 600.0  # an nccl actor's wait for the learner's answer (given once every actor asked)


def unique_tensors(state_dict: dict[str, torch.Tensor], device: str | None = "cpu") -> dict[str, torch.Tensor]:
    """Contiguous tensors (moved to `device` unless None), tied ones (e.g. lm_head sharing the embedding) once under their first name.

    Loaders that tie them (vLLM, HF `from_pretrained`) rebuild the alias themselves.
    """
    unique, seen = {}, set()
    for name, tensor in state_dict.items():
        if tensor.numel() and tensor.data_ptr() in seen:  # empty tensors all have data_ptr 0 and tie nothing
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().contiguous()
        unique[name] = tensor.to(device) if device else tensor
    return unique


Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def allocate(specs: Specs) -> dict[str, torch.Tensor]:
    """Fresh CPU tensors of the dtypes and shapes in `specs`."""
    return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in specs.items()}


class WeightSender:
    """Learner side: make `state_dict` at `version` available to every actor.

    With `wait=False` a sender may keep reading the tensors after `publish` returns, until
    `settle()`; senders that do not are done when `publish` returns.
    """

    def stage(self, specs: Specs) -> dict[str, torch.Tensor]:
        """Tensors for the caller to fill with the next version's weights and then `publish`.

        A learner that gathers sharded weights one tensor at a time writes each straight
        here; a sender that can hands out views of its own send buffers (host memory for
        the CPU channels, the device for the GPU ones), so no other copy of the whole model
        is made. This default allocates CPU tensors.
        """
        return allocate(specs)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], wait: bool = True) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Return once the tensors given to the last `publish` may change."""

    def close(self) -> None:
        pass


class WeightReceiver:
    """Actor side: fetch weights newer than `have`, or None if there are none yet.

    Returned tensors may view the transport's buffers (reused by the next fetch, or, for
    `shm`, the learner's segment): use or copy them, then `release()`, before fetching
    again; never write to them (a segment is mapped read-only: a write kills the process).
    Failures raise `WeightTransferError` and are counted by reason in `failures`.
    """

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def fetch(self, have: int, progress: Progress | None = None) -> tuple[int, dict[str, torch.Tensor]] | None:
        try:
            return self._fetch(have, progress)
        except WeightTransferError as err:
            self.failures[err.reason] += 1
            raise

    def _fetch(self, have: int, progress: Progress | None) -> tuple[int, dict[str, torch.Tensor]] | None:
        raise NotImplementedError

    def release(self) -> None:
        """The last fetch's tensors are no longer read: the sender may reuse what they view."""

    def close(self) -> None:
        pass


def resolve_transport(transport: str, endpoint: str) -> str:
    """What `learner.weight_transport` means here; the learner and every actor resolve it the same way.

    `auto` takes `shm` when the weight endpoint is a loopback address (so every actor
    runs on the learner's host) and `tcp` otherwise; the GPU transports are never
    guessed: they must be named, and need CUDA.
    """
    if transport == "auto":
        host = endpoint.rpartition(":")[0]
        return "shm" if host in ("localhost", "::1", "[::1]") or host.startswith("127.") else "tcp"
    if transport in ("nccl", "cuda_ipc") and not torch.cuda.is_available():
        raise WeightTransferError("no_cuda", f"learner.weight_transport={transport} needs CUDA, and none is available")
    return transport

"""GPU weight receivers (cuda_ipc verified on an H100; nccl across GPUs still unverified: docs/gpu.md).

Same control plane as `WeightClient`; only where the buckets come from differs.
Buckets land in this actor's own GPU memory and are checked with `sum64` on the
device (every bucket in one pass, `protocol.sum64`) before the state dict is returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from actors.weights import WeightClient
from protocol import messages as m
from protocol.buckets import Assembler, bucket_views
from protocol.errors import WeightTransferError
from protocol.gpu import broadcast_buckets, close_ipc, device_tensor, open_ipc
from protocol.sum64 import sum64_buckets
from protocol.weights import NCCL_REPLY_TIMEOUT_S, Progress
from protocol.wire import encode


def _add_all(assembler: Assembler, flat: torch.Tensor, sums: list[int], progress: Progress | None) -> None:
    assembler.add_all(bucket_views(flat, assembler.manifest), sums)
    if progress:
        progress(len(sums), len(sums))


class CudaIpcWeightClient(WeightClient):
    def __init__(self, endpoint: str, identity: str, timeout_s: float = 60.0, curve_dir: Path | None = None) -> None:
        super().__init__(endpoint, identity, timeout_s, shm=False, curve_dir=curve_dir)
        self._mapped: dict[bytes, tuple[int, torch.Tensor]] = {}  # the learner's buffers, mapped once each

    def _receive(self, assembler: Assembler, body: dict[str, Any], rid: int, progress: Progress | None) -> None:
        if body.get("mode") != "cuda_ipc":
            raise WeightTransferError("refused", f"expected cuda_ipc weights, got mode {body.get('mode')!r}")
        shared = self._map(body)
        own = torch.empty(assembler.manifest.total_bytes, dtype=torch.uint8, device="cuda")
        if shared.numel() < own.numel():
            raise WeightTransferError("size", f"the learner's buffer holds {shared.numel()} bytes, the manifest needs {own.numel()}")
        sums = sum64_buckets(shared, assembler.manifest.bucket_sizes, copy_to=own)  # the bytes checked are the bytes kept
        _add_all(assembler, own, sums, progress)

    def _map(self, body: dict[str, Any]) -> torch.Tensor:
        handle, capacity = body.get("handle"), body.get("capacity")
        if not isinstance(handle, bytes) or not isinstance(capacity, int):
            raise WeightTransferError("bad_manifest", "cuda_ipc reply without a handle and capacity")
        if handle not in self._mapped:
            if len(self._mapped) >= 4:  # the learner outgrew its buffers: let go of the oldest mapping
                close_ipc(self._mapped.pop(next(iter(self._mapped)))[0])
            try:
                ptr = open_ipc(handle)
            except Exception as exc:  # cupy's CUDARuntimeError: a stale or foreign handle
                raise WeightTransferError("refused", f"cannot map the learner's buffer: {exc}") from None
            self._mapped[handle] = (ptr, device_tensor(ptr, capacity))
        return self._mapped[handle][1]

    def close(self) -> None:
        for ptr, _ in self._mapped.values():
            close_ipc(ptr)
        self._mapped.clear()
        super().close()


class NcclWeightClient(WeightClient):
    def __init__(self, endpoint: str, identity: str, timeout_s: float = NCCL_REPLY_TIMEOUT_S, curve_dir: Path | None = None) -> None:
        super().__init__(endpoint, identity, timeout_s, shm=False, curve_dir=curve_dir)
        self.comm = self._join()

    def _join(self) -> Any:
        """Ask the learner for the NCCL unique id and our rank, then join (blocks until every rank has)."""
        import cupy
        from cupy.cuda import nccl

        rid = next(self._ids)
        self._send(encode(m.GET_WEIGHTS, {"rid": rid, "have": -1, "nccl_join": True}))
        _, body, _ = self._next_header(rid)
        self._drain()
        cupy.cuda.Device(torch.cuda.current_device()).use()
        return nccl.NcclCommunicator(int(body["world"]), tuple(body["uid"]), int(body["rank"]))

    def _receive(self, assembler: Assembler, body: dict[str, Any], rid: int, progress: Progress | None) -> None:
        if body.get("mode") != "nccl":
            raise WeightTransferError("refused", f"expected nccl weights, got mode {body.get('mode')!r}")
        own = torch.empty(assembler.manifest.total_bytes, dtype=torch.uint8, device="cuda")
        broadcast_buckets(self.comm, bucket_views(own, assembler.manifest))
        _add_all(assembler, own, sum64_buckets(own, assembler.manifest.bucket_sizes), progress)

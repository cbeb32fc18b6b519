"""GPU pieces both ends of the GPU weight transports share (UNVERIFIED: written without a GPU)."""

from __future__ import annotations

from typing import Any

import torch


def broadcast_buckets(comm: Any, buckets: list[torch.Tensor]) -> None:
    """NCCL broadcast from rank 0 of each bucket in order: rank 0 sends, the others receive in place."""
    from cupy.cuda import nccl

    stream = torch.cuda.current_stream().cuda_stream
    for bucket in buckets:
        comm.broadcast(bucket.data_ptr(), bucket.data_ptr(), bucket.numel(), nccl.NCCL_UINT8, 0, stream)
    torch.cuda.current_stream().synchronize()


def ipc_fields(tensor: torch.Tensor) -> list[Any]:
    """What another process needs to open `tensor`'s CUDA storage (msgpack-able; the owner must keep it alive)."""
    return list(tensor.untyped_storage()._share_cuda_())


def open_ipc(fields: list[Any]) -> torch.Tensor:
    """The uint8 tensor behind a CUDA IPC handle (`UntypedStorage._share_cuda_()` fields, sent as msgpack)."""
    device, handle, size, offset, ref_handle, ref_offset, event, event_sync = fields
    storage = torch.UntypedStorage._new_shared_cuda(device, handle, size, offset, ref_handle, ref_offset, event, event_sync)
    return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage, 0, (size,), (1,))

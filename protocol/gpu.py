"""GPU pieces both ends of the GPU weight transports share (run on an H100: docs/gpu.md)."""

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


class IpcBuffer:
    """Device memory of our own (`cudaMalloc`, outside torch's and cupy's pools, so its IPC handle
    covers exactly this buffer) that other processes on the GPU can map; freed by `free`."""

    def __init__(self, nbytes: int) -> None:
        from cupy.cuda import runtime

        self.nbytes = nbytes
        self.ptr = runtime.malloc(max(nbytes, 1))
        self.handle = bytes(runtime.ipcGetMemHandle(self.ptr))
        self.tensor = device_tensor(self.ptr, nbytes)
        self.tensor.zero_()  # the padding between tensors is sent, never written: no stale device memory

    def free(self) -> None:
        from cupy.cuda import runtime

        runtime.free(self.ptr)


def device_tensor(ptr: int, nbytes: int) -> torch.Tensor:
    """A uint8 torch view of raw device memory, no copy (the memory must outlive the view)."""
    import cupy

    memory = cupy.cuda.UnownedMemory(ptr, max(nbytes, 1), None)
    array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    return torch.as_tensor(array, device="cuda")


def open_ipc(handle: bytes) -> int:
    """Map another process's `IpcBuffer` into ours; the pointer stays valid until `close_ipc`."""
    from cupy.cuda import runtime

    return runtime.ipcOpenMemHandle(handle, runtime.cudaIpcMemLazyEnablePeerAccess)


def close_ipc(ptr: int) -> None:
    from cupy.cuda import runtime

    runtime.ipcCloseMemHandle(ptr)

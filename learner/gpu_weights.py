"""GPU weight senders (cuda_ipc verified on an H100; nccl across GPUs still unverified: docs/gpu.md).

Both stage the bucketed layout of `protocol.buckets` on the learner's GPU with
`sum64` checksums (all buckets in one pass on the device, `protocol.sum64`) and answer GET_WEIGHTS on the same
ROUTER as the CPU channels, so the control plane is unchanged. A sharded learner gathers
each parameter straight into the device buckets (`GpuWeightServer.stage`):

- `cuda_ipc` (learner and actor on one GPU): the reply carries the CUDA IPC handle
  of one of two device buffers the learner writes in turn; the actor maps it once,
  copies each version out and verifies it.
- `nccl` (actor GPUs): actors join a cupy NCCL communicator (the learner is rank 0;
  the unique id and ranks are handed out on this endpoint). When every actor has
  asked for the newest version, rank 0 answers them all and broadcasts the buckets
  one by one on the communicator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import zmq

from learner.weights import Published, WeightServer
from protocol import messages as m
from protocol.buckets import bucket_views, fill_buckets, plan, unpack
from protocol.gpu import IpcBuffer, broadcast_buckets
from protocol.sum64 import sum64_buckets
from protocol.transport import send_reply
from protocol.weights import NCCL_REPLY_TIMEOUT_S, Specs, unique_tensors
from protocol.wire import decode

log = logging.getLogger("learner.gpu_weights")


def stage_on_gpu(
    version: int, state_dict: dict[str, torch.Tensor], bucket_bytes: int, allocate: Callable[[int], torch.Tensor] | None = None
) -> Published:
    """Copy the weights into GPU buckets with device checksums; `allocate(nbytes)` gives the flat buffer."""
    tensors = unique_tensors(state_dict, device=None)  # copied into the buckets from wherever they are
    manifest = plan(tensors, bucket_bytes, version, checksum="sum64")
    flat = allocate(manifest.total_bytes) if allocate else torch.zeros(manifest.total_bytes, dtype=torch.uint8, device="cuda")
    buckets = bucket_views(flat, manifest)
    fill_buckets(tensors, manifest.tensors, buckets)
    manifest.checksums = sum64_buckets(flat, manifest.bucket_sizes)  # reading the sums back waits for the copies
    return Published(manifest, flat, buckets)


class GpuWeightServer(WeightServer):
    """The CPU channels' serving loop with each version in device buckets carrying `sum64` checksums.

    `stage` hands out views of the buckets the next version will be served from, so a
    sharded learner gathers each parameter straight into them on the device: the main
    rank holds no CPU copy of the model (except while a checkpoint is written), and
    nothing is copied again at `publish`.
    """

    def stage(self, specs: Specs) -> dict[str, torch.Tensor]:
        """Views of the device buckets the next version goes into, laid out as `publish` would."""
        self._return_staged()
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape) in specs.items()}
        manifest = plan(meta, self.bucket_bytes, version=-1, checksum="sum64")  # publish sets the version
        flat = self._device_flat(manifest.total_bytes)
        published = Published(manifest, flat, bucket_views(flat, manifest))
        views = unpack(manifest, published.buckets)
        self._staged = (published, views)
        return dict(views)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], wait: bool = True) -> None:
        """Serve `version` from now on (staged and checksummed on the device before this returns)."""
        published = self._version(version, state_dict)
        published.reply = self._reply_body(published)
        with self._lock:
            self._latest = published

    def _reply_body(self, published: Published) -> dict[str, Any]:
        """What a WEIGHTS reply tells the actor besides the manifest: the mode, and where the buckets are."""
        raise NotImplementedError

    def _version(self, version: int, state_dict: dict[str, torch.Tensor]) -> Published:
        """`version` in device buckets with their checksums: the staged ones if `state_dict` is exactly their views, else a copy."""
        tensors = unique_tensors(state_dict, device=None)
        published = self._take_staged(tensors)
        if published is None:
            return stage_on_gpu(version, tensors, self.bucket_bytes, self._device_flat)
        published.manifest.version = version
        published.manifest.checksums = sum64_buckets(published.flat, published.manifest.bucket_sizes)
        return published

    def _device_flat(self, nbytes: int) -> torch.Tensor:
        """The flat device buffer the next version is written into."""
        return torch.zeros(nbytes, dtype=torch.uint8, device="cuda")  # the padding between tensors is sent, never written

    def _return_staged(self) -> None:
        self._staged = None  # device buffers are not kept as a CPU channel's spare


class CudaIpcWeightServer(GpuWeightServer):
    """Two `IpcBuffer`s written in turn, like the CPU channels' spare: a reader maps each once and
    keeps it mapped. A reader still copying when its buffer is rewritten two versions later gets a
    checksum failure and keeps its old weights, never a mix."""

    def __init__(self, endpoint: str, bucket_bytes: int, curve_dir: Path | None = None) -> None:
        self._buffers: list[IpcBuffer] = []
        self._retired: list[IpcBuffer] = []  # outgrown, but a reader may still have them mapped
        self._turn = 0  # the buffer the next version goes into
        super().__init__(endpoint, bucket_bytes, curve_dir=curve_dir)

    def _reply_body(self, published: Published) -> dict[str, Any]:
        """The handle of the buffer `published` was written into; the next version goes into the other."""
        buffer = self._buffers[self._turn]
        self._turn = 1 - self._turn
        return {"mode": "cuda_ipc", "handle": buffer.handle, "capacity": buffer.nbytes}

    def _device_flat(self, nbytes: int) -> torch.Tensor:
        """The buffer whose turn it is (staged and published versions alike: `publish` moves the turn on)."""
        return self._buffer(self._turn, nbytes).tensor[:nbytes]

    def _buffer(self, index: int, nbytes: int) -> IpcBuffer:
        if index < len(self._buffers) and self._buffers[index].nbytes >= nbytes:
            return self._buffers[index]
        fresh = IpcBuffer(nbytes)
        if index < len(self._buffers):
            self._retired.append(self._buffers[index])
            self._buffers[index] = fresh
        else:
            self._buffers.append(fresh)
        return fresh

    def close(self) -> None:
        super().close()
        torch.cuda.synchronize()
        for buffer in self._buffers + self._retired:
            buffer.free()
        self._buffers, self._retired = [], []


class Waiter(NamedTuple):
    rid: int
    version: int  # the version it asked about
    gives_up: float  # monotonic time (with a margin) at which it stops waiting for the answer


def still_waiting(waiting: dict[bytes, Waiter], now: float) -> dict[bytes, Waiter]:
    """The actors still waiting for their answer. One that gave up and went on generating is not counted:
    answered later, it would discard the answer as a leftover, and the broadcast it was counted in, which
    needs every rank, would hold the learner and every other actor for good (found by a helper's hunt)."""
    return {peer: w for peer, w in waiting.items() if now < w.gives_up}


class NcclWeightServer(GpuWeightServer):
    def __init__(self, endpoint: str, bucket_bytes: int, actors: int, curve_dir: Path | None = None) -> None:
        from cupy.cuda import nccl

        self.world = actors + 1
        self.uid = list(nccl.get_unique_id())
        self.ranks: dict[bytes, int] = {}
        self.waiting: dict[bytes, Waiter] = {}
        self.comm = None
        threading.Thread(target=self._connect, name="nccl-init", daemon=True).start()
        super().__init__(endpoint, bucket_bytes, curve_dir=curve_dir)

    def _connect(self) -> None:
        import cupy
        from cupy.cuda import nccl

        cupy.cuda.Device(torch.cuda.current_device()).use()
        self.comm = nccl.NcclCommunicator(self.world, tuple(self.uid), 0)  # blocks until every actor joined
        log.info("NCCL weight group of %d ranks is up", self.world)

    def _reply_body(self, published: Published) -> dict[str, Any]:
        return {"mode": "nccl"}

    def _answer(self, socket: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            kind, body, _ = decode(frames, 1 << 20)
        except ValueError:  # the base class logs it
            kind, body = None, {}
        if kind == m.GET_WEIGHTS and body.get("nccl_join"):
            rank = self.ranks.setdefault(identity, len(self.ranks) + 1)
            send_reply(socket, identity, body.get("rid"), m.WEIGHTS, {"mode": "nccl_join", "uid": self.uid, "rank": rank, "world": self.world})
        else:
            super()._answer(socket, identity, frames)

    def _reply(self, socket: zmq.Socket, identity: bytes, rid: int, body: dict[str, Any], latest: Published) -> None:
        """Hold the answer until every actor asked for this version, then broadcast to all at once."""
        version, now = latest.manifest.version, time.monotonic()
        wait = body.get("wait_s")
        wait = wait if type(wait) in (int, float) and 0 < wait < 1e6 else NCCL_REPLY_TIMEOUT_S  # an older actor's: its default
        self.waiting[identity] = Waiter(rid, version, now + 0.9 * wait)
        self.waiting = still_waiting(self.waiting, now)
        if self.comm is None or sum(w.version == version for w in self.waiting.values()) < self.world - 1:
            return
        for peer, (peer_rid, _, _) in self.waiting.items():
            send_reply(socket, peer, peer_rid, m.WEIGHTS, {"manifest": latest.manifest.to_wire(), "mode": "nccl"})
        self.waiting.clear()
        broadcast_buckets(self.comm, latest.buckets)


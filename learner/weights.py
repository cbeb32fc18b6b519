"""Serving new weights on the CPU channels: a ROUTER thread answers actors' GET_WEIGHTS.

`publish` lays the state dict out into checksummed buckets once per version, in
process memory (`tcp`) or in a shared-memory segment (`shm`); a packer thread does it,
so the version is served while it is packed. A learner that gathers sharded weights
asks for `stage` first and writes each tensor straight into those buckets; the packer
then only computes their checksums. An actor that asks with an older version
gets the manifest, then either the name of the segment (same host, `shm`, once every
bucket is packed) or the buckets streamed as one ZeroMQ message each, with its
checksum, as soon as it is packed (everything else).
Only the newest version is served, so a slow or late-joining actor catches up in one
transfer. Fresh memory costs ~10x a warm copy here (a new 2 GB segment: about 0.9 s
of the kernel zeroing pages), so `publish` writes into the memory of the version
before: two segments (`shm`) or two buffers (`tcp`) are used in turn. A stream of
version v-1 still in flight when v+1 is written carries torn bytes, which the reader's
checksums reject, and it asks again. `shm` readers verify a segment in place and load
from it under a lease (protocol/shm.py); a segment still leased is not written again
but given up (its readers keep their mapping), and the version goes to a fresh one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from protocol import messages as m
from protocol.buckets import Manifest, as_bytes, bucket_views, checksum, pack_bucket, plan, unpack
from protocol.config import RunConfig
from protocol.curve import Guard, curve_keys_dir
from protocol.errors import RoleFailed, WeightTransferError
from protocol.shm import Segment, host_id, remove_orphans
from protocol.transport import bind_router, send_frames, send_reply
from protocol.weights import Specs, WeightSender, resolve_transport, unique_tensors
from protocol.wire import decode, encode

log = logging.getLogger("learner.weights")


@dataclass
class Published:
    manifest: Manifest
    flat: torch.Tensor
    buckets: list[torch.Tensor]
    segment: Segment | None = None
    reply: dict[str, Any] = field(default_factory=dict)  # GPU transports: mode and where the buckets are
    sums: list[int] = field(default_factory=list)  # checksums of the buckets packed so far, in order
    failed: bool = False  # packing raised: the version will never be complete
    progress: threading.Condition = field(default_factory=threading.Condition)

    def packed(self, count: int, timeout: float = 60.0) -> bool:
        """Wait until the first `count` buckets are packed; False if packing failed or took too long."""
        with self.progress:
            self.progress.wait_for(lambda: len(self.sums) >= count or self.failed, timeout)
            return len(self.sums) >= count


class WeightServer(WeightSender):
    def __init__(self, endpoint: str, bucket_bytes: int = 16 << 20, shm: bool = False, curve_dir: Path | None = None) -> None:
        """`curve_dir`: admit only CURVE clients whose key is allowed there (protocol/curve.py), as the broker does."""
        self.endpoint = endpoint
        self.guard = Guard(curve_dir) if curve_dir is not None else None
        self.bucket_bytes = bucket_bytes
        self.shm = shm
        if shm and (freed := remove_orphans()):
            log.warning("removed %.0f MiB of weight segments from /dev/shm left by a killed learner", freed / 2**20)
        self.host = host_id()
        self.served = {"shm": 0, "stream": 0}
        self._latest: Published | None = None
        self._staged: tuple[Published, dict[str, torch.Tensor]] | None = None  # handed out by `stage`, not yet published
        self._spare: torch.Tensor | Segment | None = None  # where the next version will be written
        self._packer: threading.Thread | None = None
        self._pack_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._bind_error: Exception | None = None
        self._thread = threading.Thread(target=self._serve, name="weight-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._bind_error is not None:  # else actors would ask whoever holds the port
            self._stop.set()  # a bind that comes after all must not serve
            raise RoleFailed(f"the weight server cannot listen on {endpoint}: {self._bind_error or 'timed out'}")

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], wait: bool = True) -> None:
        """Serve `version` from now on. A thread packs its buckets; a stream sends each one as soon as it is
        packed, a shm reply waits for all. With `wait=False` this returns at once: the caller must
        not change the tensors before `settle()` returns (the learner settles before its next step)."""
        self.settle()
        tensors = unique_tensors(state_dict)
        published = self._take_staged(tensors)
        if published is not None:
            tensors = None  # already in place: the packer only computes checksums
        else:
            published = self._lay_out(plan(tensors, self.bucket_bytes, version))
        published.manifest.version = version
        with self._lock:
            old, self._latest = self._latest, published
        if old:
            self._spare = old.segment or old.flat
        self._packer = threading.Thread(target=self._pack, args=(published, tensors), name="weight-packer", daemon=True)
        self._packer.start()
        if wait:
            self.settle()

    def stage(self, specs: Specs) -> dict[str, torch.Tensor]:
        """Views of the buffer the next version will be served from, laid out as `publish` would."""
        self.settle()
        self._return_staged()
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape) in specs.items()}
        published = self._lay_out(plan(meta, self.bucket_bytes, version=-1))  # publish sets the version
        views = unpack(published.manifest, published.buckets)
        self._staged = (published, views)
        return dict(views)

    def _lay_out(self, manifest: Manifest) -> Published:
        """A version laid out as `manifest` says, in the spare buffer when it is big enough."""
        flat, segment = self._staging(manifest.total_bytes)
        return Published(manifest, flat, bucket_views(flat, manifest), segment)

    def _take_staged(self, tensors: dict[str, torch.Tensor]) -> Published | None:
        """The staged version if `tensors` are exactly its views (else its buffer goes back to be reused)."""
        if self._staged is None:
            return None
        published, views = self._staged
        if views.keys() == tensors.keys() and all(tensors[name].data_ptr() == view.data_ptr() for name, view in views.items()):
            self._staged = None
            return published
        start, end = published.flat.data_ptr(), published.flat.data_ptr() + published.flat.numel()
        if any(start <= tensor.data_ptr() < end for tensor in tensors.values()):  # packing would copy it onto itself
            raise ValueError("publish got some of the tensors `stage` handed out, but not exactly them")
        self._return_staged()
        return None

    def _return_staged(self) -> None:
        if self._staged is not None:
            published, _ = self._staged
            self._staged, self._spare = None, published.segment or published.flat

    def settle(self) -> None:
        """Wait until the last published version is packed (the tensors it came from may change after)."""
        if self._packer is not None:
            self._packer.join()
            self._packer = None
        error, self._pack_error = self._pack_error, None
        if error is not None:
            raise error

    def _pack(self, published: Published, tensors: dict[str, torch.Tensor] | None) -> None:
        """Copy `tensors` into the buckets and checksum each (None: they were written there already)."""
        try:
            manifest = published.manifest
            if not published.buckets:
                self._written(published)
            for entries, bucket in zip(manifest.by_bucket(), published.buckets):
                total = checksum(manifest.checksum, bucket) if tensors is None else pack_bucket(tensors, entries, bucket, manifest.checksum)
                with published.progress:
                    published.sums.append(total)
                    if len(published.sums) == len(published.buckets):
                        self._written(published)
                    published.progress.notify_all()
        except BaseException as err:  # re-raised by settle() in the learner's thread
            self._pack_error = err
            with published.progress:
                published.failed = True
                published.progress.notify_all()

    @staticmethod
    def _written(published: Published) -> None:
        """Every bucket is packed (call with `published.progress` held, before readers hear of it)."""
        published.manifest.checksums = list(published.sums)  # shm replies carry them all
        if published.segment is not None:
            published.segment.unclaim()  # readers may lease it now

    def _staging(self, nbytes: int) -> tuple[torch.Tensor, Segment | None]:
        """Where the next version is written: the spare if it is big enough (and no reader leases it), else fresh memory."""
        spare, self._spare = self._spare, None
        if isinstance(spare, Segment):
            if spare.size >= nbytes:
                if self._claimed(spare):
                    return as_bytes(spare.map)[:nbytes], spare
                if self.shm:  # not a system without the lock: a reader holds it
                    log.info("an actor still loads from the spare weight segment: this version goes to a fresh one")
            spare.unlink()  # a reader still loading from it keeps its mapping
        elif spare is not None and spare.numel() >= nbytes and not self.shm:  # shm: a version streamed once tries a segment again
            return spare[:nbytes], None
        if self.shm:
            try:
                segment = Segment(nbytes)
            except OSError as err:  # a small /dev/shm (Docker's 64 MB): this version goes to actors as streams
                log.warning("no shared-memory segment of %d bytes (%s): version streamed instead", nbytes, err)
            else:
                if self._claimed(segment):  # nobody else knows its name yet: only a system without the lock says no
                    return as_bytes(segment.map)[:nbytes], segment
        return torch.zeros(nbytes, dtype=torch.uint8), None  # zeros: the padding between tensors is sent, never written

    def _claimed(self, segment: Segment) -> bool:
        """`segment.claim()`; where the system has no OFD locks, the segment goes and so does shm, for good."""
        try:
            return segment.claim()
        except WeightTransferError as err:
            log.warning("%s: weights go to every actor as streams from now on", err.detail)
            self.shm = False
            segment.unlink()
            return False

    def _serve(self) -> None:
        try:
            socket = bind_router(self.endpoint, 1 << 20, self._arm)
        except Exception as err:  # e.g. the port is taken (a learner still running): `__init__` raises it
            self._bind_error = err
            return
        finally:
            self._ready.set()
        try:
            while not self._stop.is_set():
                if socket.poll(100):
                    frames = socket.recv_multipart(copy=False)
                    self._answer(socket, frames[0].bytes, frames[1:])
                if self.guard is not None:
                    self.guard.poll()
        finally:
            if self.guard is not None:
                self.guard.close()
            socket.close(linger=0)

    def _arm(self, socket: zmq.Socket) -> None:
        """Before the bind, so that no peer connects with a bounded queue: a stream of buckets must never be dropped
        at the high-water mark."""
        socket.setsockopt(zmq.SNDHWM, 0)
        if self.guard is not None:
            self.guard.arm(socket)

    def _answer(self, socket: zmq.Socket, identity: bytes, frames: list) -> None:
        try:
            kind, body, _ = decode(frames, 1 << 20)
        except ValueError as err:
            log.warning("bad weight request: %s", err)
            return
        with self._lock:
            latest = self._latest
        rid, have = body.get("rid"), body.get("have")
        if kind != m.GET_WEIGHTS or not isinstance(have, int):
            send_reply(socket, identity, rid, m.ERROR, {"reason": "bad_request", "detail": "expected get_weights with have"})
        elif latest is None or latest.manifest.version <= have:
            send_reply(socket, identity, rid, m.NO_UPDATE)
        else:
            self._reply(socket, identity, rid, body, latest)

    def _reply(self, socket: zmq.Socket, identity: bytes, rid: int, body: dict[str, Any], latest: Published) -> None:
        """Tell an actor that asked with an older version where the newest one is."""
        if latest.reply:
            send_reply(socket, identity, rid, m.WEIGHTS, {"manifest": latest.manifest.to_wire(), **latest.reply})
        elif latest.segment and body.get("shm") and body.get("host") == self.host:
            if not latest.packed(len(latest.buckets)):  # the reader verifies the whole segment at once
                self._unpacked(socket, identity, rid, latest, 0)
                return
            self.served["shm"] += 1
            send_reply(socket, identity, rid, m.WEIGHTS, {"manifest": latest.manifest.to_wire(), "mode": "shm", "segment": latest.segment.name})
        else:
            self.served["stream"] += 1
            self._stream(socket, identity, rid, latest)

    def _stream(self, socket: zmq.Socket, identity: bytes, rid: int, latest: Published) -> None:
        """The manifest, then one message per bucket with its checksum, each as soon as it is packed
        (zero-copy; ZeroMQ's I/O thread does the sending)."""
        manifest = {**latest.manifest.to_wire(), "checksums": []}  # each bucket brings its own
        if not send_reply(socket, identity, rid, m.WEIGHTS, {"manifest": manifest, "mode": "stream"}):
            return
        for index, bucket in enumerate(latest.buckets):
            if not latest.packed(index + 1):
                self._unpacked(socket, identity, rid, latest, index)
                return
            header = encode(m.BUCKET, {"rid": rid, "index": index, "checksum": latest.sums[index]})
            if not send_frames(socket, identity, [*header, memoryview(bucket.numpy())]):
                log.warning("weight stream to %r broke at bucket %d", identity, index)
                return

    @staticmethod
    def _unpacked(socket: zmq.Socket, identity: bytes, rid: int, latest: Published, index: int) -> None:
        """Bucket `index` of the version asked for will not be packed (packing raised, or took over a minute): say so,
        rather than leave the actor waiting for it until its own timeout."""
        why = "packing it failed" if latest.failed else "it was not packed in time"
        log.warning("version %d not served to %r from bucket %d on: %s", latest.manifest.version, identity, index, why)
        send_reply(socket, identity, rid, m.ERROR, {"reason": "unpacked", "detail": f"version {latest.manifest.version}: {why}"})

    def close(self) -> None:
        if self._packer is not None:
            self._packer.join()
        self._stop.set()
        self._thread.join(timeout=5)
        self._return_staged()
        with self._lock:
            latest, self._latest = self._latest, None
        for published in (latest.segment if latest else None, self._spare):
            if isinstance(published, Segment):
                published.unlink()


def make_weight_sender(config: RunConfig) -> WeightSender:
    """The sender for `learner.weight_transport` (resolved as in `protocol.weights.resolve_transport`), logged."""
    transport = resolve_transport(config.learner.weight_transport, config.endpoints.weights)
    log.info("weight transport: %s (learner.weight_transport=%s)", transport, config.learner.weight_transport)
    bucket_bytes, curve_dir = config.learner.weight_bucket_mb << 20, curve_keys_dir(config)
    if transport in ("tcp", "shm"):
        return WeightServer(config.endpoints.weights, bucket_bytes, shm=transport == "shm", curve_dir=curve_dir)
    from learner.gpu_weights import CudaIpcWeightServer, NcclWeightServer

    if transport == "cuda_ipc":
        return CudaIpcWeightServer(config.endpoints.weights, bucket_bytes, curve_dir)
    return NcclWeightServer(config.endpoints.weights, bucket_bytes, actors=config.learner.nccl_actors, curve_dir=curve_dir)

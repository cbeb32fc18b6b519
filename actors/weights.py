"""Receiving new weights on the CPU channels (`tcp` stream or same-host `shm`) from the learner's weight server.

One request names the version we hold, our host and whether we can map shared
memory; the reply carries the manifest and tells us where the buckets are. A stream's
buckets land in a buffer of ours kept across versions and are checked there; a
segment's are checked where they lie, under a lease that keeps the learner from
rewriting it, and the state dict views them without a copy. A transfer that stalls, is
cut off or fails a check raises `WeightTransferError`; the caller keeps its old weights
and asks again later. The state dict a fetch returns is valid until `release()` or the
next fetch.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch
import zmq

from protocol import messages as m
from protocol.buckets import Assembler, Manifest, as_bytes, bucket_views
from protocol.config import RunConfig
from protocol.curve import arm_client, curve_keys_dir
from protocol.errors import ProtocolError, WeightTransferError
from protocol.shm import Mapping, host_id, shm_available
from protocol.weights import Progress, WeightReceiver, resolve_transport
from protocol.wire import decode, encode

log = logging.getLogger("actor.weights")
SHM_TRIES = 3  # the learner's segments this actor failed to open in a row before it asks for streams instead
CONNECT_TIMEOUT_S = 10.0  # no connection to the learner's weight server this long: the request fails


class WeightClient(WeightReceiver):
    def __init__(self, endpoint: str, identity: str, timeout_s: float = 60.0, shm: bool = True, curve_dir: Path | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:  # fmt: skip
        """`curve_dir`: connect with CURVE, using the client and server keys there (protocol/curve.py).

        A request is sent only over a connection (ZMQ_IMMEDIATE), so a learner that is gone fails
        it within `connect_timeout_s`, while a live one busy packing a large model is waited for up
        to `timeout_s` (an in-flight actor otherwise waited the whole `timeout_s` on every try)."""
        super().__init__()
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.shm = shm and shm_available()
        self.host = host_id()
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt_string(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDTIMEO, int(self.connect_timeout_s * 1000))
        if curve_dir is not None:
            arm_client(self.socket, curve_dir)
        self.socket.connect(m.tcp(endpoint))
        self._ids = itertools.count()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._mapped: dict[str, Mapping] = {}  # the learner's segments (it reuses two), mapped once each
        self._leased: Mapping | None = None  # the segment the last fetch's state dict views
        self._unopened = 0  # segments in a row that could not be opened

    def _fetch(self, have: int, progress: Progress | None) -> tuple[int, dict[str, torch.Tensor]] | None:
        self.release()
        rid = next(self._ids)
        # wait_s: how long we wait for the answer (an NCCL learner must not count us in a broadcast after that)
        self._send(encode(m.GET_WEIGHTS, {"rid": rid, "have": have, "host": self.host, "shm": self.shm, "wait_s": self.timeout_s}))
        kind, body, _ = self._next_header(rid)
        self._drain()
        if kind == m.NO_UPDATE:
            return None
        if kind != m.WEIGHTS:
            raise self._refusal(kind, body)
        assembler = Assembler(Manifest.from_wire(body.get("manifest")))
        try:
            self._receive(assembler, body, rid, progress)
            return assembler.manifest.version, assembler.state_dict()
        except BaseException:
            self.release()
            raise

    def _refusal(self, kind: str, body: dict[str, Any]) -> WeightTransferError:
        return WeightTransferError("refused", f"{self.endpoint} answered {kind}: {body.get('reason')} {body.get('detail', '')}")

    def _send(self, frames: list) -> None:
        """Send a request; with no connection (e.g. refused by CURVE) a send would block, so it times out instead."""
        try:
            self.socket.send_multipart(frames)
        except zmq.Again:
            raise WeightTransferError("timeout", f"cannot send to {self.endpoint}: no connection within {self.connect_timeout_s:.1f} s") from None

    def _receive(self, assembler: Assembler, body: dict[str, Any], rid: int, progress: Progress | None) -> None:
        """Fill `assembler` from where the reply says the buckets are (GPU transports override this)."""
        if body.get("mode") == "shm":
            self._from_segment(assembler, str(body.get("segment")), progress)
        else:
            self._from_stream(assembler, rid, progress)

    def _from_stream(self, assembler: Assembler, rid: int, progress: Progress | None) -> None:
        """Each bucket is received straight into its place in a buffer kept across versions.

        Fresh memory costs ~10x a warm copy here, so the buffer is reused: the state dict
        a fetch returns is valid until the next fetch.
        """
        manifest, total = assembler.manifest, len(assembler.manifest.bucket_sizes)
        slots = self._slots(manifest)
        while not assembler.complete:
            try:
                index, expected = self._next_bucket(rid, slots)
            except WeightTransferError as err:
                if err.reason != "timeout":
                    raise
                raise WeightTransferError("incomplete", f"{len(assembler.buckets)} of {total} buckets, then silence: {err.detail}") from None
            assembler.add(index, slots[index], expected)
            if progress:
                progress(len(assembler.buckets), total)

    def _next_bucket(self, rid: int, slots: list[torch.Tensor]) -> tuple[int, Any]:
        """Receive the next bucket of request `rid` into its slot; returns its index and the checksum that came with it."""
        kind, body, more = self._next_header(rid)
        index = body.get("index")
        if kind == m.ERROR:  # the learner will not send the rest (e.g. packing the version failed)
            self._drain()
            raise self._refusal(kind, body)
        if kind != m.BUCKET or not more or not isinstance(index, int) or not 0 <= index < len(slots):
            self._drain()
            raise WeightTransferError("bad_bucket", f"expected a bucket message, got {kind} with index {index!r}")
        received = self.socket.recv_into(memoryview(slots[index].numpy())) if slots[index].numel() else self.socket.recv_into(bytearray())
        if received != slots[index].numel() or self.socket.getsockopt(zmq.RCVMORE):
            self._drain()
            raise WeightTransferError("size", f"bucket {index}: {received} bytes, manifest says {slots[index].numel()}")
        return index, body.get("checksum")

    def _next_header(self, rid: int) -> tuple[str, dict[str, Any], bool]:
        """The first frame of the next message of request `rid` (others are skipped), and whether frames follow."""
        while self.socket.poll(int(self.timeout_s * 1000)):
            frame = self.socket.recv(copy=False)
            more = bool(self.socket.getsockopt(zmq.RCVMORE))
            try:
                kind, body, _ = decode([frame], 1 << 24)
            except ProtocolError as err:
                self._drain()
                raise WeightTransferError("bad_header", str(err)) from None
            if body.get("rid") == rid:
                return kind, body, more
            self._drain()  # a leftover of an abandoned transfer
        raise WeightTransferError("timeout", f"no reply from {self.endpoint} within {self.timeout_s:.1f} s")

    def _drain(self) -> None:
        """Discard the rest of the current message."""
        while self.socket.getsockopt(zmq.RCVMORE):
            self.socket.recv_into(bytearray())

    def _slots(self, manifest: Manifest) -> list[torch.Tensor]:
        """Per-bucket views of our buffer. Fresh memory costs ~10x a warm copy here, so it is kept across versions."""
        if self._buffer.numel() < manifest.total_bytes:
            try:
                self._buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
            except (RuntimeError, MemoryError) as err:  # a manifest no host could hold must not take the actor down
                raise WeightTransferError("bad_manifest", f"cannot hold {manifest.total_bytes} bytes of weights: {err}") from None
        return bucket_views(self._buffer[: manifest.total_bytes], manifest)

    def _from_segment(self, assembler: Assembler, name: str, progress: Progress | None) -> None:
        """Lease the learner's segment and verify each bucket where it lies: the state dict views the segment.

        The learner writes only into segments no reader leases, so what was verified stays as it
        is until `release()`. A segment it rewrote with a newer version before our lease fails its
        checksums; one it is writing now cannot be leased (`superseded`).
        """
        manifest = assembler.manifest
        mapping = self._map(name, manifest.total_bytes)
        try:
            leased = mapping.lease()
        except WeightTransferError as err:  # no OFD locks here: streams after a few tries
            self._give_up_on_shm(err)
            raise
        if not leased:
            raise WeightTransferError("superseded", f"segment {name} is being rewritten with a newer version")
        self._leased, self._unopened = mapping, 0
        for index, bucket in enumerate(bucket_views(as_bytes(mapping.map)[: manifest.total_bytes], manifest)):
            assembler.add(index, bucket)
            if progress:
                progress(index + 1, len(manifest.bucket_sizes))

    def release(self) -> None:
        """Let the learner rewrite the segment the last fetch's state dict views (use or copy it first).

        Segments the learner gave up (while we or another actor leased them) are forgotten now, so
        that their memory goes once the state dict does, rather than when a third segment pushes
        them out."""
        leased, self._leased = self._leased, None
        if leased is not None:
            leased.release()
        for name in [name for name, mapping in self._mapped.items() if mapping.unlinked]:
            self._forget(name)

    def _map(self, name: str, size: int) -> Mapping:
        mapping = self._mapped.get(name)
        if mapping is None or len(mapping.map) < size:
            try:
                mapping = Mapping(name, size)
            except WeightTransferError as err:
                self._give_up_on_shm(err)
                raise
            self._forget(name)
            if len(self._mapped) >= 2:  # the learner replaced a segment (it grew, or restarted): drop the oldest
                self._forget(next(iter(self._mapped)))
            self._mapped[name] = mapping
        return mapping

    def _forget(self, name: str) -> None:
        mapping = self._mapped.pop(name, None)
        if mapping is not None:
            mapping.close()

    def _give_up_on_shm(self, err: WeightTransferError) -> None:
        """Same host, but not the same /dev/shm (a container with its own): after a few misses in a row, streams.

        One miss can be a segment superseded between the reply and the open; several in a row are not.
        """
        if err.reason != "shm_unavailable":
            return
        self._unopened += 1
        if self._unopened >= SHM_TRIES:
            self.shm = False
            for mapped in list(self._mapped):
                self._forget(mapped)
            log.warning("%s: %d of the learner's shared-memory segments in a row could not be opened (%s); asking for "
                        "tcp streams from now on", self.endpoint, SHM_TRIES, err.detail)  # fmt: skip

    def close(self) -> None:
        self.release()
        for name in list(self._mapped):
            self._forget(name)
        self.socket.close(linger=0)


def make_weight_receiver(config: RunConfig, identity: str) -> WeightReceiver:
    """The receiver matching the learner's sender (both resolve `learner.weight_transport` the same way)."""
    transport, curve_dir = resolve_transport(config.learner.weight_transport, config.endpoints.weights), curve_keys_dir(config)
    if transport in ("tcp", "shm"):
        return WeightClient(config.endpoints.weights, identity, shm=transport == "shm", curve_dir=curve_dir)
    from actors.gpu_weights import CudaIpcWeightClient, NcclWeightClient

    cls = CudaIpcWeightClient if transport == "cuda_ipc" else NcclWeightClient
    return cls(config.endpoints.weights, identity, curve_dir=curve_dir)

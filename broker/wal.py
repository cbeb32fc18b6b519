"""The broker's write-ahead log: segmented, length-prefixed, checksummed, written in order.

A record is `[u32 length][u32 checksum][u8 type][payload]`, the checksum covering type
and payload: the low 32 bits of its xxh3-64 seeded with the segment's number, marked by a
lower-case type letter with the top bit set (xxh3 runs at about 47 GB/s here against
zlib's CRC-32 at 4, which cost 5% of the broker's time at 8 KB samples). Older records
are still read: a plain lower-case letter is an unseeded xxh3 (written from the third to the
fourth session of 2026-11-27), an upper-case one a CRC-32 (before). Each segment is written
front to back, one record after the other, and `sync` (fdatasync) makes everything written
so far durable, so what survives a crash is always a prefix of what was written.
`start_sync` runs that fdatasync on a thread of its own instead, so the broker keeps
taking messages while the disk works; `durable_bytes` says how much of the log (counted
in `bytes_written`) a finished sync covers, and `wakeup_fd` turns readable when one
finishes. On
open, the tail of the last segment is checked record by record: a torn or corrupt
record ends the log there and the file is truncated, never a crash. Then every segment
and the directory are fsynced before anything is replayed: a broker killed with appends
not yet synced finds them in the page cache, and would otherwise acknowledge resends of
them (duplicates) on the strength of syncs that only cover its new segment. A corrupt
record inside an older segment (only a power loss could do that) ends what is read of
that segment, loudly (`log_corrupt_bytes`). A record that checks out but whose type
is unknown (a newer streamrl wrote it) refuses the log by name (`LogFormatError`)
instead of being cut as torn.

The log knows which sample keys are still live (accepted but not yet consumed,
dropped or expired) and in which segment each was written. Segments are deleted
oldest first once nothing in them is live, so a consumed record is never deleted
while the samples it retires are still on disk. Each new segment starts (after its
marker, below) with a snapshot record (written by the caller) so that deleting old
segments loses no dedupe state.

Recycling: a segment that is no longer needed is renamed `spare-NNNNNNNN.wal` (its own
number) if there is no spare yet and it begins with the marker, and, cut to one segment's size, renamed again to be the next new
segment, which then overwrites blocks the file system has already allocated. An
fdatasync after appending to a file must also commit the file's new size through the
journal; after overwriting it need not, which made fsyncs 35-45% faster here (0.75
against 1.2 ms for 512 KB). The recycled file's old records stay behind the new ones
until overwritten; their checksums were seeded with another segment's number, so they
fail as a torn tail would, and once a segment's records are seeded, an unseeded one ends
it too. A spare is only used for a higher segment number (seeds never repeat) and is only
cut once it is no longer a segment. A segment rolls only after reaching that size, so
only the active segment can hold old bytes, and closing the log cuts them off.

Every segment begins with a marker record (`V`, unseeded xxh3): a streamrl from before
seeding verifies it, does not know its type and refuses the log (`LogFormatError`),
where it would otherwise take the seeded records for a torn tail and cut them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from protocol.errors import RoleFailed
from protocol.files import fsync_path
from protocol.sample import Key

log = logging.getLogger("broker.wal")
HEADER = struct.Struct("<IIB")  # payload length, checksum over type + payload, type
FRAME_LEN = struct.Struct("<I")
SAMPLES, SERVED, CONSUMED, RETIRED, SNAPSHOT = b"S", b"B", b"C", b"R", b"W"  # what readers see
MARKER, MARKER_PAYLOAD = b"V", b"seeded checksums"  # first record of a segment; never yielded by `records`
CRC32_TYPES = {SAMPLES[0], SERVED[0], CONSUMED[0], RETIRED[0], SNAPSHOT[0]}  # as written before xxh3
XXH3_TYPES = {kind + 32 for kind in CRC32_TYPES | {MARKER[0]}}  # lower case, unseeded (until 2026-11-27, fifth session; the marker still)
SEEDED = 128  # type bit: the xxh3 is seeded with the segment number, so a recycled file's old records fail it
SEEDED_TYPES = {kind + 32 + SEEDED for kind in CRC32_TYPES}  # what is written now


class LogFormatError(RoleFailed):
    """The log holds an intact record of a type this version does not know: it is refused, never cut."""


class LogWriteError(RuntimeError):
    """Writing or syncing the log failed (disk full, I/O error). Fatal: the broker must stop, not
    acknowledge anything more, and replay what is durable when restarted (see fsyncgate)."""


class WriteAheadLog:
    """Appends records to `dir/wal-NNNNNNNN.log` segments; `sync` makes them durable."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = _lock(self.dir / "LOCK")
        self.segment_bytes = segment_bytes
        self.segments = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("wal-*.log"))
        try:
            self.truncated_bytes = self._repair_tail()
            self._sync_existing()
        except BaseException:  # a refused log (LogFormatError) or a failing disk: nobody holds it now
            self.lock.close()
            raise
        self.corrupt: dict[int, int] = {}  # older segment -> bytes after its first bad record (reported once)
        self.sizes = {s: self._path(s).stat().st_size for s in self.segments}
        self.live: dict[Key, int] = {}  # live sample key -> segment it was written in
        self.live_per_segment: dict[int, int] = {s: 0 for s in self.segments}
        self.file = None
        self.active = -1
        self.bytes_written = 0  # appended since open, over all segments
        self.durable_bytes = 0  # how much of that a finished sync covers
        self.running: tuple[Future, int] | None = None  # the sync on the sync thread, and how far it covers
        self.sync_thread = ThreadPoolExecutor(1, thread_name_prefix="wal-sync")
        self.wakeup_fd, self._wake = os.pipe()  # a byte arrives when a sync on the thread ends
        os.set_blocking(self.wakeup_fd, False)
        self.syncs = 0
        self.sync_seconds: deque[float] = deque(maxlen=4096)
        self.sync_quantiles = (0, 0.0, 0.0)  # (syncs counted when computed, p50 ms, p99 ms)
        self.segments_deleted = 0
        self.segments_recycled = 0
        self.recycled_active = False  # the active segment overwrites a retired file: old bytes may follow the new
        self.failed: OSError | None = None

    # --- reading (before the first append) ---

    def records(self) -> Iterator[tuple[int, bytes, memoryview]]:
        """Every intact record on disk, oldest first, as (segment, type, payload)."""
        for segment in self.segments:
            data = self._path(segment).read_bytes()
            read = 0
            for kind, payload, end in _parse(data, segment):
                read = end
                if kind != MARKER:
                    yield segment, kind, payload
            if read < len(data) and segment not in self.corrupt:  # an older segment (the last one's tail was cut on open)
                self.corrupt[segment] = len(data) - read
                log.error("write-ahead log %s: a corrupt record at byte %d; the %d bytes from there on are not replayed",
                          self._path(segment).name, read, len(data) - read)  # fmt: skip

    def track(self, keys: list[Key], segment: int) -> None:
        """Mark `keys` live in `segment` (used while replaying)."""
        for key in keys:
            self.live[key] = segment
        self.live_per_segment[segment] = self.live_per_segment.get(segment, 0) + len(keys)

    # --- writing ---

    def start_segment(self, snapshot: bytes) -> None:
        """Close the active segment (durably) and open a new one that begins with the marker, then `snapshot`."""
        if self.file is not None:
            self.sync()
            self.file.close()
        self.active = (self.segments[-1] + 1) if self.segments else 0
        self.segments.append(self.active)
        self.live_per_segment[self.active] = 0
        self.sizes[self.active] = 0
        path, spare = self._path(self.active), self._io(self._take_spare, self.active)
        self.recycled_active = spare is not None
        if spare is not None:
            self._io(os.rename, spare, path)
            self.segments_recycled += 1
        self.file = self._io(open, path, "r+b" if spare is not None else "wb", 0)  # unbuffered, written from byte 0
        self._io(fsync_path, self.dir)  # a failing disk here is a LogWriteError like any other
        self._write(MARKER[0] + 32, [MARKER_PAYLOAD])
        self.append(SNAPSHOT, [snapshot])
        self.sync()  # before any older segment is deleted: the snapshot carries their dedupe state

    def append(self, kind: bytes, frames: list, keys: list[Key] = ()) -> None:
        """Append one record whose payload is `frames` concatenated; `keys` become live in it."""
        self._write(kind[0] + 32 + SEEDED, frames, keys)

    def _write(self, marked: int, frames: list, keys: list[Key] = ()) -> None:
        size = sum(memoryview(f).nbytes for f in frames)
        header = HEADER.pack(size, _record_checksum(marked, frames, self.active), marked)
        written = self._io(os.writev, self.file.fileno(), [header, *frames])
        if written != HEADER.size + size:  # a full disk may take part of it: records after a torn one are never read back
            raise self._failure(OSError(errno.ENOSPC, f"wrote {written} of a {HEADER.size + size}-byte record"))
        self.bytes_written += HEADER.size + size
        self.sizes[self.active] += HEADER.size + size
        if keys:
            self.track(list(keys), self.active)

    def append_frames(self, frames: list, keys: list[Key]) -> None:
        """A samples record: the message frames exactly as received, each length-prefixed."""
        parts = []
        for frame in frames:
            parts += [FRAME_LEN.pack(memoryview(frame).nbytes), frame]
        self.append(SAMPLES, parts, keys)

    @property
    def dirty(self) -> bool:
        """Whether some of what was appended is not durable yet."""
        return self.bytes_written > self.durable_bytes

    def sync(self) -> None:
        """Make everything appended so far durable (one fdatasync, timed), waiting for a running sync first."""
        self.finish_sync(wait=True)
        if not self.dirty:
            return
        covers = self.bytes_written
        self._synced(covers, self._io(_timed_fdatasync, self.file.fileno()))

    def start_sync(self) -> None:
        """Begin making everything appended so far durable on the sync thread; nothing to do while one runs.

        fdatasync releases the GIL, so the caller keeps appending meanwhile; what it appends
        after this call waits for the next sync.
        """
        if self.running is not None or not self.dirty:
            return
        future = self._io(self.sync_thread.submit, _timed_fdatasync, self.file.fileno())  # refused once the log failed
        future.add_done_callback(lambda _: os.write(self._wake, b"."))
        self.running = (future, self.bytes_written)

    def finish_sync(self, wait: bool = False) -> None:
        """Account for the sync on the thread once it has ended (`wait`: wait for it); LogWriteError if it failed."""
        try:
            os.read(self.wakeup_fd, 4096)  # always empty the pipe: a poll on it must not stay readable
        except BlockingIOError:
            pass
        if self.running is None or not (wait or self.running[0].done()):
            return
        future, covers = self.running
        self.running = None
        self._synced(covers, self._io(future.result))  # the fdatasync's OSError, if it failed

    def _synced(self, covers: int, seconds: float) -> None:
        self.sync_seconds.append(seconds)
        self.syncs += 1
        self.durable_bytes = max(self.durable_bytes, covers)

    def retire(self, keys: list[Key]) -> None:
        """Forget live keys (consumed, dropped or expired)."""
        for key in keys:
            segment = self.live.pop(key, None)
            if segment is not None:
                self.live_per_segment[segment] -= 1

    def collect(self) -> None:
        """Delete the oldest segments while they hold no live key (never the active one); keep one as the spare."""
        while len(self.segments) > 1 and self.segments[0] != self.active and self.live_per_segment.get(self.segments[0], 0) <= 0:
            segment = self.segments.pop(0)
            self.live_per_segment.pop(segment, None)
            self.sizes.pop(segment, None)
            self._io(self._retire_file, segment)
            self.segments_deleted += 1

    def _retire_file(self, segment: int) -> None:
        """Keep the segment's file as the spare, whole, if there is none and it begins with the marker (an
        older file's unseeded records would read as valid behind the new ones); else delete it."""
        path = self._path(segment)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
        except FileNotFoundError:
            return
        if any(self.dir.glob("spare-*.wal")) or len(head) < HEADER.size or head[-1] != MARKER[0] + 32:
            path.unlink(missing_ok=True)
            return
        os.rename(path, self.dir / f"spare-{segment:08d}.wal")  # cut only once renamed: a crash between leaves a whole segment

    def _take_spare(self, segment: int) -> Path | None:
        """A spare of a lower segment number, cut to one segment's size (a roll then overwrites all of it), or
        None; any other spare is deleted (one of a number at or above `segment`, left behind where the segments
        were moved away, would repeat seeds)."""
        taken = None
        for path in sorted(self.dir.glob("spare-*.wal")):
            number = path.stem.removeprefix("spare-")
            if taken is None and number.isdigit() and int(number) < segment:
                taken = path
            else:
                path.unlink(missing_ok=True)
        if taken is not None and taken.stat().st_size > self.segment_bytes:
            os.truncate(taken, self.segment_bytes)
        return taken

    @property
    def active_bytes(self) -> int:
        return self.sizes.get(self.active, 0)

    def stats(self) -> dict[str, float]:
        _, p50, p99 = self._fsync_quantiles()
        return {
            "log_bytes": sum(self.sizes.values()),
            "log_bytes_written": self.bytes_written,
            "log_segments": len(self.segments),
            "log_segments_deleted": self.segments_deleted,
            "log_segments_recycled": self.segments_recycled,
            "log_truncated_bytes": self.truncated_bytes,
            "log_corrupt_bytes": sum(self.corrupt.values()),
            "fsyncs": self.syncs,
            "fsync_ms_p50": p50,
            "fsync_ms_p99": p99,
        }

    def _fsync_quantiles(self) -> tuple[int, float, float]:
        """Recent fsyncs' p50 and p99 in ms, recomputed once a 64th of the window is new.

        Stats go out with every batch served, and np.percentile of 4096 timings took about
        0.6 ms here: computed every time, it cost the broker a tenth of its time at 8 KB
        (a partition takes a third of that, and 9 against 81 µs over 100 timings).
        """
        if self.syncs - self.sync_quantiles[0] >= max(1, len(self.sync_seconds) // 64):
            seconds = np.fromiter(self.sync_seconds, np.float64, len(self.sync_seconds))
            ranks = [round(q * (len(seconds) - 1)) for q in (0.5, 0.99)]  # nearest rank: a partition, not np.percentile's sort
            p50, p99 = np.partition(seconds, ranks)[ranks] * 1000
            self.sync_quantiles = (self.syncs, round(float(p50), 3), round(float(p99), 3))
        return self.sync_quantiles

    def close(self) -> None:
        """Sync (unless the log failed) and release everything, the lock last, even if that sync fails."""
        try:
            if self.file is not None and self.failed is None:
                self.sync()
                if self.recycled_active:  # the retired file's old bytes behind the new: cut, so a restart finds no torn tail
                    self._io(os.ftruncate, self.file.fileno(), self.sizes[self.active])
                    self._io(os.fsync, self.file.fileno())
        finally:
            if not self.lock.closed:
                self.sync_thread.shutdown()  # a sync still running ends before its file is closed
                os.close(self.wakeup_fd)
                os.close(self._wake)
            if self.file is not None:
                self.file.close()
                self.file = None
            self.lock.close()  # releases the lock (so does the process dying)

    def _io(self, call, *args):
        if self.failed is not None:
            raise LogWriteError(f"the write-ahead log failed earlier: {self.failed}")
        try:
            return call(*args)
        except OSError as err:
            raise self._failure(err) from err

    def _failure(self, err: OSError) -> LogWriteError:
        """Mark the log failed (nothing more is taken) and name the error."""
        self.failed = err
        return LogWriteError(f"write-ahead log in {self.dir}: {err}")

    def _path(self, segment: int) -> Path:
        return self.dir / f"wal-{segment:08d}.log"

    def _sync_existing(self) -> None:
        """Make what an earlier broker appended durable, synced or not, before it is replayed and built on."""
        for segment in self.segments:
            fsync_path(self._path(segment))
        fsync_path(self.dir)

    def _repair_tail(self) -> int:
        """Truncate a torn or corrupt record (and everything after it) in the last segment."""
        if not self.segments:
            return 0
        path = self._path(self.segments[-1])
        data = path.read_bytes()
        end = 0
        for _, _, record_end in _parse(data, self.segments[-1]):
            end = record_end
        if end < len(data):
            log.warning("write-ahead log %s: discarding a torn tail of %d bytes", path.name, len(data) - end)
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return len(data) - end


def _timed_fdatasync(fd: int) -> float:
    """fdatasync `fd`; the seconds it took (on the sync thread: the disk's time, not the loop's)."""
    started = time.perf_counter()
    os.fdatasync(fd)
    return time.perf_counter() - started


def split_frames(payload: memoryview) -> list[memoryview]:
    """The message frames of a samples record (the inverse of `append_frames`)."""
    frames, pos = [], 0
    while pos < payload.nbytes:
        (size,) = FRAME_LEN.unpack_from(payload, pos)
        frames.append(payload[pos + FRAME_LEN.size : pos + FRAME_LEN.size + size])
        pos += FRAME_LEN.size + size
    return frames


def _parse(data: bytes, segment: int) -> Iterator[tuple[bytes, memoryview, int]]:
    """Intact records of segment `segment` as (type, payload, end offset); stops at the first bad one,
    and at the first unseeded one after a seeded one (a recycled file's older records)."""
    view, pos, seeded = memoryview(data), 0, False
    while pos + HEADER.size <= len(data):
        size, checksum, kind = HEADER.unpack_from(view, pos)
        end = pos + HEADER.size + size
        if end > len(data) or (seeded and not kind & SEEDED):
            return
        payload = view[pos + HEADER.size : end]
        if _record_checksum(kind, [payload], segment) != checksum:
            return
        if kind not in SEEDED_TYPES and kind not in XXH3_TYPES and kind not in CRC32_TYPES:
            raise LogFormatError(f"write-ahead log record of unknown type {bytes([kind])!r} at byte {pos}: written by a newer "
                                 "streamrl? Drain the log with the version that wrote it, or move it away to start empty")  # fmt: skip
        seeded = bool(kind & SEEDED)
        yield bytes([kind & ~(32 | SEEDED)]), payload, end  # upper case whichever checksum it carries
        pos = end


def _record_checksum(kind: int, parts: list, segment: int) -> int:
    """Over the type byte and the payload (in parts): xxh3's low 32 bits for a lower-case type (seeded with
    the segment number if the type's top bit is set), else CRC-32."""
    if kind & (32 | SEEDED):  # lower case or seeded (any byte: an unknown type must check out before it is refused)
        digest = xxhash.xxh3_64(bytes([kind]), seed=segment if kind & SEEDED else 0)
        for part in parts:
            digest.update(part)
        return digest.intdigest() & 0xFFFFFFFF
    crc = zlib.crc32(bytes([kind]))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _lock(path: Path):
    """Hold an exclusive lock on the log directory: two brokers on one log would corrupt it."""
    handle = open(path, "a")  # noqa: SIM115 (held open for the lock's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"another broker is using the write-ahead log in {path.parent}") from None
    return handle

"""What the broker writes to its log, and how a restarted broker rebuilds itself from it.

Four facts are logged: a samples message with at least one newly accepted sample
(its frames as received if all its valid samples are new, else only the new ones), a batch served to the learner (its sample keys,
fsynced before the batch leaves), the learner's acknowledgement of that batch, and
samples retired without being served (stale, expired). Replay is the accepted
samples minus the retired and consumed ones; the served-but-unacknowledged batch
comes back as the in-flight batch with its old id, so the learner's next request
either acknowledges it or gets it again, and never gets it twice after consuming it.
Every sequence number seen, consumed or not, goes back into the dedupe windows, so
an actor that resends after the restart is told "already have it".

Samples records hold wire-format messages, so a log written under another wire schema
version (e.g. the per-sample layout of schema 1) cannot be replayed: the broker then
refuses to start with `LogSchemaError` (its reason `schema_version`) rather than drop
those samples. Drain such a log with the version that wrote it, or move it away.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from broker.buffer import ReplayBuffer, SeqWindow
from broker.wal import CONSUMED, RETIRED, SAMPLES, SERVED, SNAPSHOT, WriteAheadLog, split_frames
from protocol.errors import ProtocolError, RoleFailed
from protocol.sample import Key, Sample
from protocol.wire import decode, samples_from

log = logging.getLogger("broker.durable")
Batch = tuple[int, list[list[Sample]]]


class LogSchemaError(RoleFailed):
    """The write-ahead log holds samples messages of another wire schema version: replay is refused."""


def batch_key(batch_id: int) -> Key:
    """A served batch's record stays live (keeps its segment) until the learner acknowledges it."""
    return ("", "batch", batch_id)


class DurableLog:
    """Mirrors the broker's state changes into a WriteAheadLog and replays them on start."""

    def __init__(self, wal: WriteAheadLog, buffer: ReplayBuffer, vocab_size: int | None, group_size: int | None = None) -> None:
        """`group_size`: the run's; logged samples of groups of another size (the setting changed) are not replayed."""
        self.wal = wal
        self.buffer = buffer
        self.vocab_size = vocab_size
        self.group_size = group_size
        self.replayed = 0
        self.unservable: tuple[int, list[Key]] | None = None  # an in-flight batch replay could not rebuild, and its keys found

    # --- recording ---

    def samples(self, frames: list, keys: list[Key]) -> None:
        self.wal.append_frames(frames, keys)

    def served(self, batch_id: int, groups: list[list[Sample]], version: int) -> None:
        keys = [list(s.key) for g in groups for s in g]
        self.wal.append(SERVED, [_pack({"batch_id": batch_id, "version": version, "keys": keys})], [batch_key(batch_id)])
        self.wal.sync()  # the batch may only leave once a restarted broker would know it

    def consumed(self, batch_id: int, groups: list[list[Sample]]) -> None:
        self._end_batch(batch_id, [s.key for g in groups for s in g])
        self.wal.collect()

    def _end_batch(self, batch_id: int, keys: list[Key]) -> None:
        """Log that batch `batch_id` is done with: none of its samples comes back, whatever a restart finds."""
        self.wal.append(CONSUMED, [_pack({"batch_id": batch_id})])
        self.wal.retire([batch_key(batch_id), *keys])

    def retired(self, samples: list[Sample], why: str) -> None:
        keys = [s.key for s in samples]
        self.wal.append(RETIRED, [_pack({"why": why, "keys": [list(k) for k in keys]})])
        self.wal.retire(keys)
        self.wal.collect()

    def roll_if_full(self, next_batch_id: int) -> bool:
        """Start a new segment once the active one is full (syncing the log); whether it did."""
        if self.wal.active_bytes < self.wal.segment_bytes:
            return False
        self.start_segment(next_batch_id)
        return True

    def start_segment(self, next_batch_id: int) -> None:
        self.wal.start_segment(_pack(self._snapshot(next_batch_id)))
        if self.unservable is not None:  # found by the replay before this first segment
            self._end_batch(*self.unservable)
            self.unservable = None
            self.wal.sync()
        self.wal.collect()

    def _snapshot(self, next_batch_id: int) -> dict[str, Any]:
        windows = [[a, i, w.below, sorted(w.above)] for (a, i), w in self.buffer.seen.items()]
        return {"windows": windows, "next_batch_id": next_batch_id, "policy_version": self.buffer.policy_version}

    # --- replay ---

    def replay(self) -> tuple[Batch | None, int]:
        """Rebuild the buffer from the log; return (in-flight batch or None, next batch id)."""
        dead, inflight, next_batch_id, version = self._scan()
        self.buffer.set_policy_version(version)
        inflight_keys = {tuple(k): i for i, k in enumerate(inflight["keys"])} if inflight else {}
        inflight_samples: list[Sample | None] = [None] * len(inflight_keys)
        for segment, kind, payload in self.wal.records():
            if kind == SNAPSHOT:
                _merge_windows(self.buffer, _unpack(payload)["windows"])
            elif kind == SAMPLES:
                for sample in self._samples(payload):
                    where = self._restore(sample, dead, inflight_keys, inflight_samples)
                    if where != "skip":
                        self.wal.track([sample.key], segment)
                        self.replayed += 1
            elif kind == SERVED and inflight and _unpack(payload)["batch_id"] == inflight["batch_id"]:
                self.wal.track([batch_key(inflight["batch_id"])], segment)
        batch = _regroup(inflight, inflight_samples)
        if inflight is not None and batch is None:  # ended once a segment is open: kept, it would pin the log forever
            self.unservable = (inflight["batch_id"], [s.key for s in inflight_samples if s is not None])
        log.info("replayed %d samples from the log; in-flight batch %s", self.replayed, batch[0] if batch else None)
        return batch, next_batch_id

    def _scan(self) -> tuple[set[Key], dict[str, Any] | None, int, int]:
        """First pass: keys that are done, the unacknowledged batch, the next batch id, the policy version."""
        dead: set[Key] = set()
        batches: dict[int, dict[str, Any]] = {}
        next_batch_id, version = 1, 0
        for _, kind, payload in self.wal.records():
            if kind == SAMPLES:
                continue
            record = _unpack(payload)
            if kind == SNAPSHOT:
                next_batch_id = max(next_batch_id, record["next_batch_id"])
                version = max(version, record["policy_version"])
            elif kind == SERVED:
                batches[record["batch_id"]] = record
                next_batch_id = max(next_batch_id, record["batch_id"] + 1)
                version = max(version, record["version"])
            elif kind == CONSUMED:
                done = batches.pop(record["batch_id"], None)
                dead.update(tuple(k) for k in (done or {}).get("keys", []))
            elif kind == RETIRED:
                dead.update(tuple(k) for k in record["keys"])
        inflight = batches[max(batches)] if batches else None
        return dead, inflight, next_batch_id, version

    def _samples(self, payload: memoryview) -> list[Sample]:
        try:
            _, body, arrays = decode(split_frames(payload))
            actor = body.get("actor_id")
            items = samples_from(body, arrays, self.vocab_size, self.group_size)
            failed = [item for item in items if isinstance(item, ProtocolError)]
            if failed:  # the run's settings changed since (vocabulary, group size): serving them would stop the learner
                log.error("%d logged samples fail the run's checks (%s): not replayed", len(failed), failed[0])
            return [s for s in items if isinstance(s, Sample) and s.actor_id == actor]
        except ProtocolError as err:  # logged before, so it decoded then; a changed vocabulary could do this
            if err.reason == "schema_version":  # written by another version of streamrl: every sample would be lost
                raise LogSchemaError(
                    f"write-ahead log {self.wal.dir} holds samples in another wire schema ({err.detail}); drain it with "
                    "the streamrl version that wrote it, or move it away to start empty"
                ) from err
            log.error("a logged samples message no longer decodes: %s", err)
            return []

    def _restore(self, sample: Sample, dead: set[Key], inflight_keys: dict, inflight_samples: list) -> str:
        window = self.buffer.seen.setdefault((sample.actor_id, sample.incarnation), SeqWindow())
        if sample.key in dead or sample.key in inflight_keys:
            if not window.add(sample.seq):
                return "skip"
            if sample.key in dead:
                return "skip"
            inflight_samples[inflight_keys[sample.key]] = sample
            return "inflight"
        return "buffer" if self.buffer.add(sample) == "accepted" else "skip"


def _regroup(inflight: dict[str, Any] | None, samples: list[Sample | None]) -> Batch | None:
    if inflight is None:
        return None
    if any(s is None for s in samples):
        found = sum(s is not None for s in samples)
        log.error("in-flight batch %d lost %d of its %d samples in the log; none is served again (the learner may have "
                  "trained on it)", inflight["batch_id"], len(samples) - found, len(samples))  # fmt: skip
        return None
    groups: list[list[Sample]] = []
    for sample in samples:
        if groups and groups[-1][0].group_id == sample.group_id:
            groups[-1].append(sample)
        else:
            groups.append([sample])
    return inflight["batch_id"], groups


def _merge_windows(buffer: ReplayBuffer, windows: list) -> None:
    for actor, incarnation, below, above in windows:
        window = buffer.seen.setdefault((actor, incarnation), SeqWindow())
        window.merge(below, above)


def _pack(record: dict[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def _unpack(payload: memoryview) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)

"""The broker process: a ZeroMQ ROUTER in front of the replay buffer.

Actors send samples and get an ACK (or a NACK naming the reason) for every one,
plus their current credit: how many more samples they may have buffered here. The
learner asks for batches of complete groups; a served batch stays in flight until
the learner's next request acknowledges it, so a learner that restarts mid-step
gets the same batch again rather than losing it. A malformed message is answered
with an error and counted; it never stops the broker.

With `broker.durable` (the default) every accepted sample is written to a
write-ahead log and acknowledged only after an fsync; messages arriving together
share one fsync (group commit). The fsync runs on a thread of its own, so the broker
keeps taking messages while the disk works, and those wait for the next one. A
restarted broker replays the log (broker/durable.py).
"""

from __future__ import annotations

import logging
import socket as socket_module
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import orjson
import zmq

from broker.buffer import ReplayBuffer
from broker.durable import DurableLog
from broker.wal import LogWriteError, WriteAheadLog
from protocol import messages as m
from protocol.config import RunConfig
from protocol.curve import Guard
from protocol.errors import ProtocolError
from protocol.memory import keep_freed_memory
from protocol.sample import Key, Sample
from protocol.transport import bind_router, send_frames, send_reply
from protocol.wire import decode, encode_samples, samples_from

log = logging.getLogger("broker")
ACTOR_TTL_S = 30.0  # an actor silent this long no longer counts as live in the stats
FORGET_AFTER_S = 600.0  # an actor silent this long leaves the stats (they ride along in every batch to the learner)
COUNTERS = ("messages", "received", "acked", "refused_no_credit", "batches_resent", "consumed", "consumed_batches", "unreachable")
Owner = tuple[str, str]  # (actor id, incarnation)
PARKED = "parked"  # internal: a GET_BATCH with wait_ms waits for its batch instead of polling
MAX_WAIT_MS = 60_000
MAX_COUNTERS = 256  # an actor's counters kept in the stats (an actor reports about 30)
REJECT_LOG_S = 1.0  # at most one log line per second about rejected input


class Broker:
    def __init__(self, config: RunConfig, vocab_size: int | None, stats_path: Path | None = None) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.stats_path = stats_path
        self.buffer = ReplayBuffer(config.broker.max_policy_lag, self._retired)
        self.rejected: Counter[str] = Counter()
        self.reject_log_after, self.unlogged_rejects = 0.0, 0
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.actor_seen: dict[str, float] = {}  # actor -> monotonic time of its last message
        self.owner_seen: dict[Owner, float] = {}  # (actor, incarnation) -> its last message, for expiry
        self.window_seen: dict[Owner, float] = {}  # the same, kept until its dedupe window is freed
        self.learner_seen: float | None = None
        self.actor_rates: dict[str, float] = {}  # actor -> the generation tokens/s it last reported
        self.actor_counters: dict[str, dict] = {}  # actor -> the counters it last reported (failures, drops, ...)
        self.inflight: tuple[int, list[list[Sample]]] | None = None
        self.next_batch_id = 1
        self.finished_at: float | None = None
        self.stopped_actors: set[str] = set()
        self.pending: deque[tuple[bytes, Any, dict[str, Any], int]] = deque()  # ACKs waiting for a sync up to their log position
        self.pending_since: float | None = None  # when the first ACK that no sync covers yet arrived
        self.pending_samples = 0  # and how many samples those ACKs hold
        self.frames: list = []  # the frames of the message being handled (logged as they are)
        self.parked: tuple[bytes, Any, dict[str, Any], float] | None = None  # a learner's long poll
        self.guard = Guard(config.broker.curve.keys_dir) if config.broker.curve.enabled else None
        self.log: DurableLog | None = None
        if config.broker.durable:
            self._recover(config.broker.wal_dir or config.run.dir / "wal")

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until `stop` is set, or until the learner finished and every actor was told."""
        keep_freed_memory()
        socket = self._bind()
        log.info("broker listening on %s (vocab %s, durable %s)", self.config.endpoints.broker, self.vocab_size, self.log is not None)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        if self.log is not None:
            poller.register(self.log.wal.wakeup_fd, zmq.POLLIN)  # a sync ended: its ACKs can go
        last_tick = 0.0
        try:
            while not stop.is_set() and not self._done():
                if socket in dict(poller.poll(100)):
                    self._drain(socket)
                self._settle(socket)
                self._wake_parked(socket)  # before the next sync: serving a batch syncs, and the waiting ACKs go with it
                self._start_sync()
                if self.guard is not None:
                    self.guard.poll()
                if time.monotonic() - last_tick > 1.0:
                    self._expire_silent()
                    self._forget_departed()
                    self.write_stats()
                    last_tick = time.monotonic()
        except LogWriteError:
            log.critical("the write-ahead log failed; stopping without acknowledging what it did not take", exc_info=True)
            raise
        finally:
            failure = None
            try:
                try:
                    if self.log is None or self.log.wal.failed is None:
                        self._commit(socket)
                finally:
                    self.close()  # releases the log's lock whatever happened
            except LogWriteError as err:  # a last sync failed: nothing more was acknowledged
                failure = err
            self.write_stats()
            if self.guard is not None:
                self.guard.close()
            socket.close(linger=0)
            log.info("broker stopped: %s", orjson.dumps(self.stats()).decode())
            if failure is not None:
                raise failure

    def _bind(self) -> zmq.Socket:
        """Bind the ROUTER once the port is free: a predecessor's socket (closed asynchronously
        by ZeroMQ's I/O thread) may still hold it for a moment after a restart."""
        host, _, port = self.config.endpoints.broker.rpartition(":")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket_module.socket() as probe:
                probe.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, int(port)))
                    break
                except OSError:
                    time.sleep(0.1)
        return bind_router(self.config.endpoints.broker, self.config.broker.max_message_bytes, self.guard and self.guard.arm)

    def close(self) -> None:
        if self.log is not None:
            self.log.wal.close()

    def _drain(self, socket: zmq.Socket) -> None:
        """Handle the messages waiting now, until a group commit is due."""
        interval = self.config.broker.fsync_interval_ms / 1000
        while True:
            frames = socket.recv_multipart(copy=False)
            self.handle(socket, frames[0].bytes, frames[1:])
            if self.pending_since is None or self.pending_samples >= self.config.broker.fsync_every:
                return
            if time.monotonic() - self.pending_since >= interval or not socket.poll(0):
                return

    def _start_sync(self) -> None:
        """Group commit: one sync on the log's thread for every ACK waiting now (none while one runs)."""
        if self.pending and self.log.wal.running is None:
            self.log.wal.start_sync()
            self.pending_since, self.pending_samples = None, 0

    def _settle(self, socket: zmq.Socket) -> None:
        """Send the ACKs whose samples a finished sync made durable."""
        if self.log is None:
            return
        wal = self.log.wal
        wal.finish_sync()
        settled = False
        while self.pending and self.pending[0][3] <= wal.durable_bytes:
            identity, rid, reply, _ = self.pending.popleft()
            settled = True
            if not send_reply(socket, identity, rid, m.ACK, reply):
                self.counters["unreachable"] += 1
        if settled and self.log.roll_if_full(self.next_batch_id):
            self._settle(socket)  # the roll synced the log: every waiting ACK is durable now

    def _commit(self, socket: zmq.Socket) -> None:
        """Make every waiting sample durable now (one fsync, after the running one) and send their ACKs."""
        if self.pending:
            self.log.wal.sync()
            self.pending_since, self.pending_samples = None, 0
            self._settle(socket)

    def handle(self, socket: zmq.Socket, identity: bytes, frames: list) -> None:
        self.counters["messages"] += 1
        self.frames = frames
        try:
            kind, body, arrays = decode(frames, self.config.broker.max_message_bytes, self.config.broker.max_header_bytes)
        except Exception as err:  # a ProtocolError, or a bug in decoding: one message lost, never the broker
            if not isinstance(err, ProtocolError):
                log.exception("internal error decoding a message")
                err = ProtocolError("internal_error", repr(err))
            self._reject(err)
            send_reply(socket, identity, err.rid, m.ERROR, {"reason": err.reason, "detail": err.detail})
            return
        rid = body.get("rid")
        try:
            reply_kind, reply, reply_arrays = self._dispatch(kind, body, arrays)
        except ProtocolError as err:
            self._reject(err)
            reply_kind, reply, reply_arrays = m.ERROR, {"reason": err.reason, "detail": err.detail}, []
        except LogWriteError:
            raise  # durability is gone: stop before acknowledging anything more
        except Exception as err:  # a bug must cost one request, never the broker
            log.exception("internal error on a %s request", kind)
            self._reject(ProtocolError("internal_error", repr(err)))
            reply_kind, reply, reply_arrays = m.ERROR, {"reason": "internal_error", "detail": repr(err)}, []
        if reply_kind == m.ACK and reply["acked"] and self.log is not None and self.log.wal.dirty:  # refusals need no sync
            if self.pending_since is None:
                self.pending_since = time.monotonic()
            self.pending.append((identity, rid, reply, self.log.wal.bytes_written))
            self.pending_samples += len(reply["acked"])
        elif reply_kind == PARKED:
            if self.parked is not None:  # one waiting learner request at a time: the older one gets its answer now
                self._wake_parked(socket, force=True)
            self.parked = (identity, rid, body, time.monotonic() + body["wait_ms"] / 1000)
        else:
            self._send(socket, identity, rid, reply_kind, reply, reply_arrays)

    def _send(self, socket: zmq.Socket, identity: bytes, rid: Any, kind: str, reply: dict[str, Any], arrays: list) -> None:
        if kind == m.BATCH:
            self._commit(socket)  # serving fsynced the log: the waiting ACKs are durable too
            sent = send_frames(socket, identity, encode_samples(m.BATCH, arrays, {**reply, "rid": rid}))
        else:
            sent = send_reply(socket, identity, rid, kind, reply, arrays)
        if not sent:
            self.counters["unreachable"] += 1

    def _wake_parked(self, socket: zmq.Socket, force: bool = False) -> None:
        """Answer the waiting GET_BATCH once its batch is complete, or when its wait is over."""
        if self.parked is None:
            return
        identity, rid, body, deadline = self.parked
        if force or len(self.buffer.ready) >= body["groups"] or time.monotonic() >= deadline:
            self.parked = None
            self._send(socket, identity, rid, *self._serve_batch({**body, "wait_ms": 0}))

    def _dispatch(self, kind: str, body: dict[str, Any], arrays: list) -> tuple[str, dict[str, Any], list]:
        if kind == m.SAMPLES:
            return m.ACK, self._ingest(body, arrays), []
        if kind in (m.HELLO, m.PING):
            actor = self._note_actor(body)
            return m.STATUS, self._status(actor), []
        if kind == m.GET_BATCH:
            return self._serve_batch(body)
        if kind == m.FINISH:
            self._acknowledged(body.get("ack_batch"))
            self.finished_at = time.monotonic()
            log.info("learner finished; telling actors to stop")
            return m.STATUS, {"stop": True}, []
        if kind == m.STATS:
            return m.STATS, self.stats(), []
        raise ProtocolError("unknown_type", f"message type {kind!r} is not known")

    def _ingest(self, body: dict[str, Any], arrays: list) -> dict[str, Any]:
        """Ack valid samples (duplicates too, so the actor forgets them), NACK bad ones, refuse those over credit."""
        actor = self._note_actor(body)
        items = samples_from(body, arrays, self.vocab_size, self.config.sampling.group_size)
        self.counters["received"] += len(items)
        good, rejected, settled = [], [], []  # settled: the sender's own samples rejected for good
        for item in items:
            if type(item) is Sample and item.actor_id == actor:  # the common case first, and cheapest
                good.append(item)
            elif isinstance(item, ProtocolError):
                self._reject(item)
                rejected.append([item.seq, item.reason])
                settled.append(item.seq)
            else:
                self._reject(ProtocolError("bad_sample", "sample actor_id differs from the sender's"))
                rejected.append([item.seq, "bad_sample"])
        incarnation = body.get("incarnation")
        if settled and isinstance(incarnation, str):  # no gap left in the dedupe window: the actor never resends them
            self.buffer.mark_seen((actor, incarnation), [seq for seq in settled if type(seq) is int and seq >= 0])
        acked, refused, new, clashed = self.buffer.admit(
            good, self.config.broker.credits_per_actor, self._byte_budget(), self._memory_budget()
        )
        for seq in clashed:
            self._reject(ProtocolError("bad_sample", f"sample {seq}: its group already holds a sample of that index", seq))
            rejected.append([seq, "bad_sample"])
        if new and self.log is not None:
            # replay restores every sample a record holds: unless all of the sender's are new, only the new ones are
            # logged (refused ones were never acknowledged; stale ones would come back after a restart that lost the
            # version that made them stale)
            frames = self.frames if len(new) == len(good) else encode_samples(m.SAMPLES, _with_keys(good, set(new)), {"actor_id": actor})
            try:
                self.log.samples(frames, new)
            except LogWriteError:
                raise
            except Exception as err:  # the samples are in the buffer already: acknowledged on a resend, a crash would lose them
                raise LogWriteError(f"could not log {len(new)} accepted samples: {err!r}") from err
        self.counters["acked"] += len(acked)
        self.counters["refused_no_credit"] += len(refused)
        return {"acked": acked, "rejected": rejected, "refused": refused, **self._status(actor)}

    def _serve_batch(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], list]:
        groups_wanted, version, ack = body.get("groups"), body.get("policy_version"), body.get("ack_batch")
        wait_ms = body.get("wait_ms", 0)
        if not isinstance(groups_wanted, int) or groups_wanted < 1 or not isinstance(version, int):
            raise ProtocolError("bad_request", "get_batch needs groups (int >= 1) and policy_version (int)")
        if type(wait_ms) is not int or not 0 <= wait_ms <= MAX_WAIT_MS:
            raise ProtocolError("bad_request", f"get_batch wait_ms must be an int in [0, {MAX_WAIT_MS}]")
        self.learner_seen = time.monotonic()
        self._acknowledged(ack)
        if self.inflight is not None:
            self.counters["batches_resent"] += 1
            return m.BATCH, self._batch_body(self.inflight[0]), [s for g in self.inflight[1] for s in g]
        self.buffer.set_policy_version(version)
        groups = self.buffer.take(groups_wanted)
        if groups is None and wait_ms > 0:
            return PARKED, {}, []
        if groups is None:
            return m.NOT_READY, {"stats": self.stats()}, []
        self.inflight = (self.next_batch_id, groups)
        self.next_batch_id += 1
        if self.log is not None:
            self.log.served(self.inflight[0], groups, version)
        return m.BATCH, self._batch_body(self.inflight[0]), [s for g in groups for s in g]

    def _acknowledged(self, batch_id: Any) -> None:
        """The learner has trained on the in-flight batch: it is consumed, never served again."""
        if self.inflight is None or batch_id != self.inflight[0]:
            return
        groups = self.inflight[1]
        self.inflight = None
        self.counters["consumed"] += sum(len(g) for g in groups)
        self.counters["consumed_batches"] += 1
        if self.log is not None:
            self.log.consumed(batch_id, groups)

    def _batch_body(self, batch_id: int) -> dict[str, Any]:
        return {"batch_id": batch_id, "stats": self.stats()}

    def _status(self, actor: str) -> dict[str, Any]:
        stop = self.finished_at is not None
        if stop:
            self.stopped_actors.add(actor)
        return {"credits": self._credits(actor), "policy_version": self.buffer.policy_version, "stop": stop}

    def _credits(self, actor: str) -> int:
        return self.buffer.credits(actor, self.config.broker.credits_per_actor, self._byte_budget())

    def _memory_budget(self) -> int:
        """Sample bytes all actors together may have buffered here."""
        return int(self.config.broker.memory_budget_mb * (1 << 20))

    def _byte_budget(self) -> int:
        """Each actor's share of the memory budget."""
        return self._memory_budget() // self.config.actor.count

    def _note_actor(self, body: dict[str, Any]) -> str:
        actor = _actor_id(body)
        self.actor_seen[actor] = time.monotonic()
        incarnation = body.get("incarnation")
        if isinstance(incarnation, str):
            self.owner_seen[(actor, incarnation)] = self.window_seen[(actor, incarnation)] = self.actor_seen[actor]
            settled = body.get("settled_below")
            if type(settled) is int:  # optional; anything else is ignored, as other status fields are
                self.buffer.settle((actor, incarnation), settled)
        rate = body.get("gen_tokens_per_s")
        if isinstance(rate, (int, float)):
            self.actor_rates[actor] = float(rate)
        counters = body.get("counters")
        if counters is not None:
            self.actor_counters[actor] = _checked_counters(counters)
        return actor

    def _live_actors(self) -> set[str]:
        now = time.monotonic()
        return {a for a, seen in self.actor_seen.items() if now - seen < ACTOR_TTL_S}

    def _expire_silent(self) -> None:
        """Partial groups of an actor incarnation silent for broker.actor_ttl_s can never complete: drop them;
        so do groups still partial that long after their first sample (a sibling was rejected or lost)."""
        now, ttl = time.monotonic(), self.config.broker.actor_ttl_s
        for owner, seen in list(self.owner_seen.items()):
            if now - seen > ttl:
                del self.owner_seen[owner]
                if expired := self.buffer.expire(owner):
                    log.warning("actor %s (incarnation %s) silent for %.0f s: %d samples of partial groups expired", *owner, now - seen, expired)
        if expired := self.buffer.expire_incomplete(now - ttl):
            log.warning("%d samples of groups still incomplete %.0f s after their first sample expired", expired, ttl)

    def _forget_departed(self) -> None:
        """Drop what is kept per actor id for ids silent for `FORGET_AFTER_S`: elastic actors that left, restarted
        ones under new ids, made-up ids would otherwise grow it for good. Their last counters go to the log."""
        now = time.monotonic()
        for actor in [a for a, seen in self.actor_seen.items() if now - seen > FORGET_AFTER_S]:
            del self.actor_seen[actor]
            self.actor_rates.pop(actor, None)
            self.stopped_actors.discard(actor)
            counters = self.actor_counters.pop(actor, None)
            if not self.buffer.held[actor]:  # summed over for every message (the broker's whole memory budget)
                del self.buffer.held[actor], self.buffer.held_bytes[actor]
            log.info("actor %s silent for %.0f s: dropped from the stats; its last counters: %s", actor, FORGET_AFTER_S, counters)
        self._free_superseded_windows(now)

    def _free_superseded_windows(self, now: float) -> None:
        """Free the dedupe window of an actor incarnation silent for `FORGET_AFTER_S` once a newer incarnation of
        its actor id has been heard: that process is gone, and with it anything it could resend. Each restart of an
        actor left a window behind for good, in memory and in every log snapshot. A live incarnation keeps its
        window however long it is silent: forgetting it would let a resend whose ACK was lost in again."""
        for owner in self.buffer.seen:  # one made by a sample whose incarnation its message did not name, or replayed
            self.window_seen.setdefault(owner, now)
        newest: dict[str, float] = {}
        for (actor, _), seen in self.window_seen.items():
            newest[actor] = max(seen, newest.get(actor, seen))
        for owner, seen in list(self.window_seen.items()):
            if now - seen > FORGET_AFTER_S and seen < newest[owner[0]]:
                del self.window_seen[owner]
                if self.buffer.seen.pop(owner, None) is not None:
                    log.info("actor %s incarnation %s: superseded and silent for %.0f s, its dedupe window freed", *owner, now - seen)

    def _retired(self, samples: list[Sample], why: str) -> None:
        if self.log is not None:
            self.log.retired(samples, why)

    def _recover(self, wal_dir: Path) -> None:
        """Open (and repair) the log, rebuild the buffer from it, and start a fresh segment."""
        wal = WriteAheadLog(wal_dir, int(self.config.broker.segment_mb * (1 << 20)))
        self.log = DurableLog(wal, self.buffer, self.vocab_size, self.config.sampling.group_size)
        try:
            self.inflight, self.next_batch_id = self.log.replay()
            self.log.start_segment(self.next_batch_id)
        except BaseException:
            wal.close()  # unlock it: a refused log (LogSchemaError) stays as it is, for whoever drains it
            raise
        now = time.monotonic()
        for samples in self.buffer.partial.values():  # their actors get a full TTL to come back
            self.owner_seen.setdefault((samples[0].actor_id, samples[0].incarnation), now)

    def _reject(self, err: ProtocolError) -> None:
        """Count every rejection; log at most one line per REJECT_LOG_S, saying how many went unlogged, so a flood
        of bad input cannot flood the log (every count is in the stats)."""
        self.rejected[err.reason] += 1
        now = time.monotonic()
        if now < self.reject_log_after:
            self.unlogged_rejects += 1
            return
        more = f" (and {self.unlogged_rejects} more rejections since the last line, counted in the stats)" if self.unlogged_rejects else ""
        log.warning("rejected: %s%s", err, more)
        self.unlogged_rejects, self.reject_log_after = 0, now + REJECT_LOG_S

    def _done(self) -> bool:
        """After FINISH, exit once every live actor has been told to stop (or after a grace period)."""
        if self.finished_at is None:
            return False
        return self._live_actors() <= self.stopped_actors or time.monotonic() - self.finished_at > 15.0

    def stats(self) -> dict[str, Any]:
        live = self._live_actors()
        return {
            **self.buffer.stats(),
            **self.counters,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "buffered_bytes": sum(self.buffer.held_bytes.values()),
            "actors": len(live),
            "gen_tokens_per_s": sum(self.actor_rates.get(a, 0.0) for a in live),
            "actor_gen_tokens_per_s": {a: self.actor_rates.get(a, 0.0) for a in sorted(live)},
            "actor_counters": self.actor_counters,
            "learner_idle_s": round(time.monotonic() - self.learner_seen, 3) if self.learner_seen else None,
            "inflight_batch": self.inflight[0] if self.inflight else None,
            "auth_refused": self.guard.refused if self.guard else 0,
            "durable": self.log is not None,
            "replayed": self.log.replayed if self.log else 0,
            **(self.log.wal.stats() if self.log else {}),
        }

    def write_stats(self) -> None:
        if self.stats_path is not None:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(self.stats(), option=orjson.OPT_INDENT_2))
            tmp.replace(self.stats_path)


def _with_keys(samples: list[Sample], keys: set[Key]) -> list[Sample]:
    return [s for s in samples if s.key in keys]


def _checked_counters(counters: Any) -> dict[str, int | float]:
    """An actor's counters as the stats will hold them: a flat map of at most `MAX_COUNTERS` names to numbers.
    Anything else (bytes, nesting too deep for JSON) once stopped the broker when its stats were written."""
    if (
        not isinstance(counters, dict)
        or len(counters) > MAX_COUNTERS
        or not all(type(k) is str and len(k) <= 64 and type(v) in (int, float) for k, v in counters.items())
    ):
        raise ProtocolError("bad_request", f"counters must map at most {MAX_COUNTERS} names to numbers")
    return counters


def _actor_id(body: dict[str, Any]) -> str:
    actor = body.get("actor_id")
    if not isinstance(actor, str) or not actor:
        raise ProtocolError("bad_request", "request needs a non-empty actor_id")
    return actor

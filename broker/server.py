"""The broker process: a ZeroMQ ROUTER in front of the replay buffer.

Actors send samples and get an ACK (or a NACK naming the reason) for every one,
plus their current credit: how many more samples they may have buffered here. The
learner asks for batches of complete groups; a served batch stays in flight until
the learner's next request acknowledges it, so a learner that restarts mid-step
gets the same batch again rather than losing it. A malformed message is answered
with an error and counted; it never stops the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import zmq

from broker.buffer import ReplayBuffer
from protocol import messages as m
from protocol.config import RunConfig
from protocol.errors import ProtocolError
from protocol.sample import Sample
from protocol.transport import bind_router, send_frames, send_reply
from protocol.wire import decode, encode_samples, samples_from

log = logging.getLogger("broker")
ACTOR_TTL_S = 30.0
COUNTERS = ("messages", "received", "acked", "batches_resent", "unreachable")


class Broker:
    def __init__(self, config: RunConfig, vocab_size: int | None, stats_path: Path | None = None) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.stats_path = stats_path
        self.buffer = ReplayBuffer(config.broker.max_policy_lag)
        self.rejected: Counter[str] = Counter()
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.actor_seen: dict[str, float] = {}  # actor -> monotonic time of its last message
        self.actor_rates: dict[str, float] = {}  # actor -> the generation tokens/s it last reported
        self.actor_counters: dict[str, dict] = {}  # actor -> the counters it last reported (failures, drops, ...)
        self.inflight: tuple[int, list[list[Sample]]] | None = None
        self.next_batch_id = 1
        self.finished_at: float | None = None
        self.stopped_actors: set[str] = set()

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until `stop` is set, or until the learner finished and every actor was told."""
        socket = bind_router(self.config.endpoints.broker, self.config.broker.max_message_bytes)
        log.info("broker listening on %s (vocab %s)", self.config.endpoints.broker, self.vocab_size)
        last_flush = 0.0
        try:
            while not stop.is_set() and not self._done():
                if socket.poll(100):
                    frames = socket.recv_multipart(copy=False)
                    self.handle(socket, frames[0].bytes, frames[1:])
                if time.monotonic() - last_flush > 1.0:
                    self.write_stats()
                    last_flush = time.monotonic()
        finally:
            self.write_stats()
            socket.close(linger=0)
            log.info("broker stopped: %s", orjson.dumps(self.stats()).decode())

    def handle(self, socket: zmq.Socket, identity: bytes, frames: list) -> None:
        self.counters["messages"] += 1
        try:
            kind, body, arrays = decode(frames, self.config.broker.max_message_bytes)
        except ProtocolError as err:
            self._reject(err)
            send_reply(socket, identity, None, m.ERROR, {"reason": err.reason, "detail": err.detail})
            return
        rid = body.get("rid")
        try:
            reply_kind, reply, reply_arrays = self._dispatch(kind, body, arrays)
        except ProtocolError as err:
            self._reject(err)
            reply_kind, reply, reply_arrays = m.ERROR, {"reason": err.reason, "detail": err.detail}, []
        except Exception as err:  # a bug must cost one request, never the broker
            log.exception("internal error on a %s request", kind)
            self._reject(ProtocolError("internal_error", repr(err)))
            reply_kind, reply, reply_arrays = m.ERROR, {"reason": "internal_error", "detail": repr(err)}, []
        if reply_kind == m.BATCH:
            frames = encode_samples(m.BATCH, reply_arrays, {**reply, "rid": rid})
            if not send_frames(socket, identity, frames):
                self.counters["unreachable"] += 1
        elif not send_reply(socket, identity, rid, reply_kind, reply, reply_arrays):
            self.counters["unreachable"] += 1

    def _dispatch(self, kind: str, body: dict[str, Any], arrays: list) -> tuple[str, dict[str, Any], list]:
        if kind == m.SAMPLES:
            return m.ACK, self._ingest(body, arrays), []
        if kind in (m.HELLO, m.PING):
            actor = self._note_actor(body)
            return m.STATUS, self._status(actor), []
        if kind == m.GET_BATCH:
            return self._serve_batch(body)
        if kind == m.FINISH:
            self.finished_at = time.monotonic()
            log.info("learner finished; telling actors to stop")
            return m.STATUS, {"stop": True}, []
        if kind == m.STATS:
            return m.STATS, self.stats(), []
        raise ProtocolError("unknown_type", f"message type {kind!r} is not known")

    def _ingest(self, body: dict[str, Any], arrays: list) -> dict[str, Any]:
        actor = self._note_actor(body)
        acked, rejected = [], []
        for item in samples_from(body, arrays, self.vocab_size):
            self.counters["received"] += 1
            if isinstance(item, ProtocolError):
                self._reject(item)
                rejected.append([item.seq, item.reason])
                continue
            if item.actor_id != actor:
                self._reject(ProtocolError("bad_sample", "sample actor_id differs from the sender's"))
                rejected.append([item.seq, "bad_sample"])
                continue
            self.buffer.add(item)
            acked.append(item.seq)
        self.counters["acked"] += len(acked)
        return {"acked": acked, "rejected": rejected, **self._status(actor)}

    def _serve_batch(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], list]:
        groups_wanted, version, ack = body.get("groups"), body.get("policy_version"), body.get("ack_batch")
        if not isinstance(groups_wanted, int) or groups_wanted < 1 or not isinstance(version, int):
            raise ProtocolError("bad_request", "get_batch needs groups (int >= 1) and policy_version (int)")
        if self.inflight is not None and ack != self.inflight[0]:
            self.counters["batches_resent"] += 1
            return m.BATCH, self._batch_body(self.inflight[0]), [s for g in self.inflight[1] for s in g]
        self.inflight = None
        self.buffer.set_policy_version(version)
        groups = self.buffer.take(groups_wanted)
        if groups is None:
            return m.NOT_READY, {"stats": self.stats()}, []
        self.inflight = (self.next_batch_id, groups)
        self.next_batch_id += 1
        return m.BATCH, self._batch_body(self.inflight[0]), [s for g in groups for s in g]

    def _batch_body(self, batch_id: int) -> dict[str, Any]:
        return {"batch_id": batch_id, "stats": self.stats()}

    def _status(self, actor: str) -> dict[str, Any]:
        stop = self.finished_at is not None
        if stop:
            self.stopped_actors.add(actor)
        credits = self.buffer.credits(actor, self.config.broker.credits_per_actor)
        return {"credits": credits, "policy_version": self.buffer.policy_version, "stop": stop}

    def _note_actor(self, body: dict[str, Any]) -> str:
        actor = _actor_id(body)
        self.actor_seen[actor] = time.monotonic()
        rate = body.get("gen_tokens_per_s")
        if isinstance(rate, (int, float)):
            self.actor_rates[actor] = float(rate)
        if isinstance(body.get("counters"), dict):
            self.actor_counters[actor] = body["counters"]
        return actor

    def _live_actors(self) -> set[str]:
        now = time.monotonic()
        return {a for a, seen in self.actor_seen.items() if now - seen < ACTOR_TTL_S}

    def _reject(self, err: ProtocolError) -> None:
        self.rejected[err.reason] += 1
        log.warning("rejected: %s", err)

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
            "actors": len(live),
            "gen_tokens_per_s": sum(self.actor_rates.get(a, 0.0) for a in live),
            "actor_gen_tokens_per_s": {a: self.actor_rates.get(a, 0.0) for a in sorted(live)},
            "actor_counters": self.actor_counters,
        }

    def write_stats(self) -> None:
        if self.stats_path is not None:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(self.stats(), option=orjson.OPT_INDENT_2))
            tmp.replace(self.stats_path)


def _actor_id(body: dict[str, Any]) -> str:
    actor = body.get("actor_id")
    if not isinstance(actor, str) or not actor:
        raise ProtocolError("bad_request", "request needs a non-empty actor_id")
    return actor

"""The actor loop: admit prompts while credits allow, step the engine, send scored groups.

Each prompt becomes a group of `group_size` requests (plus `sampling.oversample`
spares: the first `group_size` to finish win, the rest are cancelled) stamped with
the policy version the engine holds. A group is scored and sent once complete; the
broker acknowledges each sample, and anything not acknowledged is sent again (the
broker drops duplicates by (actor id, incarnation, seq)). Up to `actor.messages_in_flight`
messages await their acknowledgement while the engine keeps stepping. A group whose generation
or scoring fails, or that became too stale to be trained on, is aborted and dropped,
never sent with a made-up reward (see actors/faults.py). When the broker reports a newer
policy version the actor stops admitting, lets running requests finish, fetches the
new weights and applies them before generating again; with `actor.weight_update:
in_flight` (PipelineRL) it applies them between engine steps instead, and each sample
records the versions it spanned (version_start..version_end). With `broker.max_policy_lag: 0`
the run is synchronous: each actor generates exactly its share of one learner step
per policy version, so generation and training strictly alternate.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from actors.engine import Completion, Engine
from actors.faults import FailureBudget, FaultyEngine, group_ordinal, injected_reward_fault
from actors.reward_guard import RewardFailed
from actors.tasks import Problem, Task
from protocol import messages as m
from protocol.config import BrokerSection, RunConfig
from protocol.curve import curve_keys_dir
from protocol.errors import PeerRefused, RoleFailed, WeightTransferError
from protocol.sample import Sample
from protocol.transport import Client
from protocol.weights import WeightReceiver
from protocol.wire import header_bytes

log = logging.getLogger("actor")
MESSAGE_SLACK = 16 << 10  # a samples message's header beyond its samples' metadata: the actor's status, field names
IDLE_POLL_S = 0.05
LONG_PROMPTS_IN_A_ROW = 100  # problems skipped for length with none started between: the config, not the data
HEARTBEAT_S = 2.0  # a busy actor pings this often: the broker, once the learner finished, waits 15 s for actors
FETCH_BACKOFF_S = (1.0, 30.0)  # after a failed weight fetch, wait this long before the next (doubling up to the second)
ACK_TIMEOUT_S = 10.0  # a broker reply later than this is given up on (what it would have acknowledged is resent)
ACTOR_COUNTERS = ("groups_started", "groups_sent", "samples_sent", "sample_messages", "broker_refusals", "dropped_groups",
                  "aborted_stale_groups", "oversample_cancelled", "rejected_samples", "skipped_long_prompts")  # fmt: skip


@dataclass
class OpenGroup:
    problem: Problem
    version_start: int
    running: dict[str, float]  # request id -> monotonic time it was submitted
    done: list[tuple[Completion, int]]  # each finished request, and the version the engine held when it finished


class RateMeter:
    """Generated tokens per second of engine time, over the last `window` engine steps."""

    def __init__(self, window: int = 200) -> None:
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))

    def rate(self) -> float:
        busy = sum(s for _, s in self.steps)
        return sum(t for t, _ in self.steps) / busy if busy > 0 else 0.0


class Actor:
    def __init__(self, config: RunConfig, index: int, engine: Engine, task: Task, weights: WeightReceiver, broker: Client) -> None:
        self.config = config
        self.actor_id = f"actor-{index}"
        self.incarnation = uuid.uuid4().hex[:8]
        self.engine, self.task, self.weights, self.broker = engine, task, weights, broker
        self.version = 0
        self.broker_version = 0
        self.credits = 0
        self.stop_requested = False
        self.groups: dict[str, OpenGroup] = {}
        self.unacked: dict[int, tuple[Sample, float]] = {}
        self.next_seq = 0  # the sequence number of the next sample sent
        self.group_ids = itertools.count()
        self.meter = RateMeter()
        self.weight_updates = 0
        self.started_at_version = 0
        self.quota = _sync_quota(config, index)
        self.long_prompts_in_a_row = 0
        self.failures = FailureBudget(config.actor.max_generation_failures, config.actor.failure_window_s)
        self.counters: Counter[str] = Counter({name: 0 for name in ACTOR_COUNTERS})
        self.in_flight = config.actor.weight_update == "in_flight"
        self.last_heard = 0.0
        self.ping_rid = -1  # the heartbeat's request, while it awaits its reply
        self.fetch_after, self.fetch_backoff = 0.0, FETCH_BACKOFF_S[0]  # failed fetches are retried later, not every turn

    def run(self, stop: threading.Event) -> None:
        self._call(m.HELLO, {})
        while not stop.is_set() and not self.stop_requested:
            if self.broker_version > self.version and (self.in_flight or not self.engine.busy) and time.monotonic() >= self.fetch_after:
                self._update_weights()
            self._admit()
            if self.engine.busy:
                self._step_engine()
                self._heartbeat()
            else:
                time.sleep(IDLE_POLL_S)
                self._call(m.PING, {})
            self._take_replies(self.broker.collect())
            self._abort_overdue()
            self._resend_overdue()
        self._wait_for_acks(0, timeout_s=1.0)  # what is still unacknowledged at the end is logged below
        log.info("%s stopping: %d unacked, %s (weight transfers failed: %s)", self.actor_id, len(self.unacked),
                 self.stats(), dict(self.weights.failures))  # fmt: skip

    def stats(self) -> dict[str, int]:
        """Every counter of this actor: generation failures by cause, drops, cancellations, what was sent."""
        return {**self.counters, **self.failures.counts, "groups_open": len(self.groups), "version": self.version,
                "weight_updates": self.weight_updates, "weight_failures": sum(self.weights.failures.values())}  # fmt: skip

    def _heartbeat(self) -> None:
        """While requests run, ping the broker: to hear of new versions (in flight) and of a stop, and to stay
        live there. Posted, not awaited (the loop takes the reply): a ping that waited blocked the engine for
        `ACK_TIMEOUT_S` at a time while the broker was down. At most one is out; one unanswered that long is
        given up."""
        now = time.monotonic()
        if now - self.last_heard <= (IDLE_POLL_S if self.in_flight else HEARTBEAT_S):
            return
        posted_at = self.broker.posted.get(self.ping_rid)
        if posted_at is not None and now - posted_at < ACK_TIMEOUT_S:
            return
        self.broker.forget(self.ping_rid)
        try:
            self.ping_rid = self.broker.post(m.PING, self._status_body())
        except TimeoutError as err:
            log.warning("%s: %s", self.actor_id, err)

    def _step_engine(self) -> None:
        started = time.perf_counter()
        try:
            finished = self.engine.step()
        except Exception as err:  # an engine error costs the groups in flight, never the actor
            log.error("%s: engine step failed, dropping %d groups in flight: %r", self.actor_id, len(self.groups), err)
            self.counters["dropped_groups"] += len(self.groups)
            self._give_back_quota([g.version_start for g in self.groups.values()])
            self._abort(list(self.groups))
            self.failures.record("engine_error", repr(err))
            return
        if not self.meter.steps:  # the first step prepares kernels (seconds on CPU): time limits start after it
            now = time.monotonic()
            for group in self.groups.values():
                group.running = dict.fromkeys(group.running, now)
        self.meter.add(sum(len(c.token_ids) for c in finished), time.perf_counter() - started)
        self._send([s for c in finished for s in self._finish(c)])  # one round trip for every group this step completed

    def _admit(self) -> None:
        """Start new groups while the broker has room for them and the weights are current.

        In-flight updates keep admitting while a newer version is on its way, but only after
        this actor has loaded one: a late-joining actor starts from the current weights.
        """
        n = self.config.sampling.group_size
        while (
            (self.broker_version <= self.version or (self.in_flight and self.weight_updates > 0))
            and len(self.groups) < self.config.actor.groups_in_flight
            and credit_room(self.credits, len(self.groups), len(self.unacked), n) >= n
            and (self.quota is None or self.started_at_version < self.quota)
        ):
            problem = self.task.next_problem()
            if len(problem.prompt_ids) >= self.config.model.max_model_len:  # vLLM would refuse it (no room to answer)
                self._skip_long_prompt(len(problem.prompt_ids))
                return  # back to the loop (pings, stop), one problem per turn
            self.long_prompts_in_a_row = 0
            self.started_at_version += 1
            group_id = f"{self.actor_id}-{self.incarnation}-{next(self.group_ids)}"
            now = time.monotonic()
            requests = [f"{group_id}/{i}" for i in range(n + self.config.sampling.oversample)]
            self.groups[group_id] = OpenGroup(problem, self.version, dict.fromkeys(requests, now), [])
            for request_id in requests:
                self.engine.submit(request_id, problem.prompt_ids)
            self.counters["groups_started"] += 1

    def _skip_long_prompt(self, tokens: int) -> None:
        """Skip a problem the model has no room to answer: counted and logged now and then, not a generation
        failure (a dataset may hold a few); only a long run of them, a too small model.max_model_len, stops the actor."""
        limit = self.config.model.max_model_len
        self.counters["skipped_long_prompts"] += 1
        self.long_prompts_in_a_row += 1
        if self.counters["skipped_long_prompts"] % 100 == 1:
            log.warning("%s: skipping a prompt of %d tokens, no room in model.max_model_len = %d (%d skipped so far)",
                        self.actor_id, tokens, limit, self.counters["skipped_long_prompts"])  # fmt: skip
        if self.long_prompts_in_a_row >= LONG_PROMPTS_IN_A_ROW:
            raise RoleFailed(f"{self.long_prompts_in_a_row} prompts in a row leave no room in model.max_model_len = {limit} "
                             f"(the last: {tokens} tokens); raise it or shorten the prompts")  # fmt: skip

    def _finish(self, c: Completion) -> list[Sample]:
        """File a finished request; when its group has group_size of them, cancel the spares and return its scored samples."""
        group_id = c.request_id.rpartition("/")[0]
        group = self.groups.get(group_id)
        if group is None or group.running.pop(c.request_id, None) is None:
            return []  # its group was dropped meanwhile
        group.done.append((c, self.version))
        if len(group.done) < self.config.sampling.group_size:
            return []
        if group.running:
            self.engine.abort(list(group.running))
            self.counters["oversample_cancelled"] += len(group.running)
        del self.groups[group_id]
        samples = self._score(group_id, group) or []
        if samples:
            self.counters["groups_sent"] += 1
            self.counters["samples_sent"] += len(samples)
        return samples

    def _score(self, group_id: str, group: OpenGroup) -> list[Sample] | None:
        """The group's samples with their rewards, or None (dropped, counted) if any reward could not be computed."""
        samples = []
        for index, (c, version_end) in enumerate(group.done):
            try:
                reward, correct = self.task.score(group.problem, c.token_ids)
                injected = injected_reward_fault(self.config.actor.inject_faults, group_ordinal(c.request_id))
                reward = reward if injected is None else injected
            except RewardFailed as err:  # raised, hung or crashed in the guarded child (counted there too)
                return self._fail(group_id, group, f"reward_{err.kind}", str(err))
            except Exception as err:  # a reward function run in-process may fail in any way
                return self._fail(group_id, group, "reward_error", repr(err))
            if not math.isfinite(reward):
                return self._fail(group_id, group, "reward_nan", f"reward {reward!r}")
            if index == 0 and group_id.endswith("0"):  # every tenth group: show what the model writes
                text = self.task.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                log.info("%s v%d sample: %r -> reward %.2f", self.actor_id, self.version, text, reward)
            samples.append(
                Sample(
                    prompt_ids=group.problem.prompt_ids,
                    completion_ids=c.token_ids,
                    behavior_logprobs=c.logprobs,
                    reward=reward,
                    group_id=group_id,
                    group_size=self.config.sampling.group_size,
                    index=index,
                    version_start=group.version_start,
                    version_end=version_end,
                    actor_id=self.actor_id,
                    incarnation=self.incarnation,
                    seq=-1,  # numbered below, once the whole group is kept
                    finish_reason=c.finish_reason,
                    metadata={"task": self.task.name, "correct": correct},
                )
            )
            why = unsendable(samples[-1], self.config.broker)
            if why is not None:  # refused however it is sent: resending it would never end
                return self._fail(group_id, group, "sample_too_large", why)
        for sample in samples:  # a dropped group uses no sequence numbers: gaps would stay in the broker's dedupe window
            sample.seq, self.next_seq = self.next_seq, self.next_seq + 1
        return samples

    def _fail(self, group_id: str, group: OpenGroup, cause: str, detail: str) -> None:
        """A dropped group counts against the failure budget, with its cause in the log, and gives its place
        in a synchronous run's per-version quota back (the step still needs a group in its stead)."""
        log.error("%s: dropping group %s: %s: %s", self.actor_id, group_id, cause, detail)
        self.counters["dropped_groups"] += 1
        self._give_back_quota([group.version_start])
        self.failures.record(cause, detail)

    def _give_back_quota(self, version_starts: list[int]) -> None:
        """Dropped groups started at the current version free their places in a synchronous step's quota."""
        if self.quota is not None:
            self.started_at_version -= version_starts.count(self.version)

    def _abort(self, group_ids: list[str]) -> None:
        """Cancel every running request of these groups in the engine and forget the groups."""
        for group_id in group_ids:
            self.engine.abort(list(self.groups.pop(group_id).running))

    def _abort_overdue(self) -> None:
        """Abort groups with a request past its time limit (failures), and groups too stale to be trained on."""
        now, limit = time.monotonic(), self.config.actor.request_timeout_s
        for group_id, group in list(self.groups.items()):
            late = sum(now - submitted > limit for submitted in group.running.values())
            if late:
                self._abort([group_id])
                self._fail(group_id, group, "generation_timeout", f"{late} requests ran over {limit:g} s")
        lag = self.config.broker.max_policy_lag
        stale = [g for g, group in self.groups.items() if self.broker_version - group.version_start > lag]
        if stale:
            log.info("%s: aborting %d groups the broker would drop as stale", self.actor_id, len(stale))
            self._abort(stale)
            self.counters["aborted_stale_groups"] += len(stale)

    def _send(self, samples: list[Sample]) -> None:
        """Send in as few messages as the broker's limits allow (half of its message and header sizes, leaving
        room for the rest), each posted once fewer than `actor.messages_in_flight` await their acknowledgement."""
        now = time.monotonic()
        for s in samples:  # all unacknowledged before any wait, so none is lost if posting fails
            self.unacked[s.seq] = (s, now)
        limits = self.config.broker
        for chunk in _chunks(samples, limits.max_message_bytes // 2, limits.max_header_bytes // 2):
            self._wait_for_acks(max(self.config.actor.messages_in_flight - 1, 0))
            now = time.monotonic()  # overdue counts from the post, not from a wait for room before it
            for s in chunk:
                self.unacked[s.seq] = (s, now)
            try:
                self.broker.post(m.SAMPLES, self._status_body(), samples=chunk)
            except TimeoutError as err:  # no connection: the samples stay unacknowledged and are sent again
                log.warning("%s: %s", self.actor_id, err)
                return
            self.counters["sample_messages"] += 1
        if not self.config.actor.messages_in_flight:
            self._wait_for_acks(0)

    def _wait_for_acks(self, at_most: int, timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Take replies until at most `at_most` posted messages await theirs; one unanswered for
        `timeout_s` is given up (its samples are resent when overdue)."""
        while len(self.broker.posted) > at_most:
            rid, posted_at = next(iter(self.broker.posted.items()))
            left = posted_at + timeout_s - time.monotonic()
            if left <= 0:
                log.warning("%s: no acknowledgement from the broker within %.0f s", self.actor_id, timeout_s)
                self.broker.forget(rid)
                continue
            self._take_replies(self.broker.collect(wait_s=left))

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        overdue = [s for s, sent in self.unacked.values() if now - sent > self.config.actor.resend_after_s]
        if overdue:
            log.warning("%s resending %d unacknowledged samples", self.actor_id, len(overdue))
            self._send(overdue)

    def _status_body(self) -> dict[str, Any]:
        """What every message to the broker says about this actor. `settled_below`: no sample numbered below it is
        ever sent again (each was acknowledged or rejected, or dropped with a rejected sibling), so the broker's
        dedupe window has no gap below it, whatever the broker lost or never got."""
        return {"actor_id": self.actor_id, "incarnation": self.incarnation, "gen_tokens_per_s": self.meter.rate(),
                "counters": self.stats(), "settled_below": min(self.unacked, default=self.next_seq)}  # fmt: skip

    def _call(self, kind: str, body: dict[str, Any]) -> None:
        """One request to the broker; a timeout or an ERROR reply is logged and counted."""
        try:
            reply = self.broker.request(kind, {**body, **self._status_body()}, timeout_s=ACK_TIMEOUT_S)
        except TimeoutError as err:
            log.warning("%s: %s", self.actor_id, err)
            return
        except PeerRefused as err:  # the broker is up but refused this message (e.g. its own internal error): keep going
            log.error("%s: %s", self.actor_id, err)
            self.counters["broker_refusals"] += 1
            return
        self._take_replies([*self.broker.arrived(), reply])  # replies to posted messages that came first

    def _take_replies(self, replies: list) -> None:
        """Acknowledgements, rejections, credits, the policy version and stop, from the broker's replies in order;
        an ERROR reply leaves its samples unacknowledged, to be sent again. An acknowledgement waits for the
        broker's fsync and may come after a newer status: versions only grow and a stop stays."""
        for kind, reply, _ in replies:
            self.last_heard = time.monotonic()
            if kind == m.ERROR:
                log.error("%s: %s", self.actor_id, PeerRefused(self.broker.endpoint, str(reply.get("reason")), str(reply.get("detail"))))
                self.counters["broker_refusals"] += 1
                continue
            for seq in reply.get("acked", []):
                self.unacked.pop(seq, None)
            for seq, reason in reply.get("rejected", []):
                log.error("%s: broker rejected sample %s: %s", self.actor_id, seq, reason)
                self.counters["rejected_samples"] += 1
                rejected = self.unacked.pop(seq, None)
                if rejected is not None:
                    self._drop_rejected_group(rejected[0], reason)
            self.credits = reply.get("credits", self.credits)
            self.broker_version = max(self.broker_version, reply.get("policy_version", 0))
            self.stop_requested = self.stop_requested or bool(reply.get("stop", False))

    def _drop_rejected_group(self, sample: Sample, reason: str) -> None:
        """Its group cannot complete at the broker (which expires the rest): forget the group's other unacknowledged
        samples, count the group once against the failure budget, and give its place in a synchronous step back."""
        siblings = [seq for seq, (s, _) in self.unacked.items() if s.group_id == sample.group_id]
        for seq in siblings:
            del self.unacked[seq]
        self.counters["dropped_groups"] += 1
        self._give_back_quota([sample.version_start])
        self.failures.record(f"rejected_{reason}", f"sample {sample.seq} of group {sample.group_id}")

    def _update_weights(self) -> None:
        started = time.monotonic()
        try:
            fetched = self.weights.fetch(self.version)
        except WeightTransferError as err:  # counted by the receiver; the old weights stay in place
            log.warning("%s: weight transfer failed, keeping v%d, next try in %.0f s: %s", self.actor_id, self.version, self.fetch_backoff, err)
            # a learner that is gone must not hold the engine once per loop turn (in flight it keeps generating)
            self.fetch_after, self.fetch_backoff = time.monotonic() + self.fetch_backoff, min(2 * self.fetch_backoff, FETCH_BACKOFF_S[1])
            return
        self.fetch_backoff = FETCH_BACKOFF_S[0]
        if fetched is None:
            return
        version, state_dict = fetched
        try:
            self.engine.load_weights(state_dict)
        finally:
            self.weights.release()  # the engine holds its own copy now: the learner may rewrite what this viewed
        self.version = version
        self.started_at_version = 0
        self.weight_updates += 1
        log.info("%s applied weights v%d in %.2f s", self.actor_id, version, time.monotonic() - started)


def credit_room(credits: int, open_groups: int, unacked: int, group_size: int) -> int:
    """Samples the broker can still take beyond what this actor has promised it.

    Every open group will send `group_size` samples, its finished ones included: they wait
    for their siblings, so they are neither in the broker nor unacknowledged yet. Counting
    only the unfinished ones let an actor start groups the broker then refused in part.
    """
    return credits - open_groups * group_size - unacked


def unsendable(sample: Sample, limits: BrokerSection) -> str | None:
    """Why the broker would refuse `sample` even alone in a message (arrays or metadata over its limits), else None."""
    header = header_bytes(sample)
    if sample.nbytes + header + MESSAGE_SLACK > limits.max_message_bytes:
        return f"{sample.nbytes + header} bytes, over broker.max_message_bytes = {limits.max_message_bytes} less room for the rest"
    if header + MESSAGE_SLACK > limits.max_header_bytes:
        return f"{header} bytes of metadata, over broker.max_header_bytes = {limits.max_header_bytes} less room for the rest"
    return None


def _chunks(samples: list[Sample], max_bytes: int, max_header_bytes: int) -> list[list[Sample]]:
    """Consecutive runs of samples whose arrays hold at most `max_bytes` together and whose metadata adds at
    most `max_header_bytes` to the header (a sample larger than either goes alone)."""
    chunks: list[list[Sample]] = []
    size = header = 0
    for sample in samples:
        extra = header_bytes(sample)
        if not chunks or size + sample.nbytes > max_bytes or header + extra > max_header_bytes:
            chunks.append([])
            size = header = 0
        chunks[-1].append(sample)
        size += sample.nbytes
        header += extra
    return chunks


def _sync_quota(config: RunConfig, index: int) -> int | None:
    """With max_policy_lag 0 (synchronous RL) each actor generates its share of one step per version, then waits."""
    if config.broker.max_policy_lag > 0:
        return None
    groups, actors = config.train.groups_per_step, config.actor.count
    return groups // actors + (index < groups % actors)


def run_actor(config: RunConfig, index: int, model_dir: Path, stop: threading.Event) -> None:
    """Build the engine, task and connections for actor `index` and run until told to stop."""
    from transformers import AutoTokenizer

    from actors.engine import make_engine
    from actors.tasks import make_task
    from actors.weights import make_weight_receiver

    seed = config.run.seed + 1000 * index
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = make_engine(model_dir, config, seed)
    faults = config.actor.inject_faults
    if faults.enabled:
        engine = FaultyEngine(engine, faults, faults.slowdown if index in faults.slow_actors else 1.0)
    broker = Client(config.endpoints.broker, f"actor-{index}-{uuid.uuid4().hex[:6]}", curve_dir=curve_keys_dir(config))
    weights = make_weight_receiver(config, f"actor-{index}-weights-{uuid.uuid4().hex[:6]}")
    actor = Actor(config, index, engine, make_task(config.task, tokenizer, seed), weights, broker)
    try:
        actor.run(stop)
    finally:
        stats_path = config.run.dir / f"actor-{index}_stats.json"
        stats_path.write_bytes(orjson.dumps(actor.stats(), option=orjson.OPT_INDENT_2))
        broker.close()
        weights.close()

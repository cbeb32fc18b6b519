"""The actor loop: admit prompts while credits allow, step the engine, stream finished samples.

Each prompt becomes a group of `group_size` requests stamped with the policy
version the engine holds. Finished samples are scored and sent at once; the broker
acknowledges each one, and anything not acknowledged is sent again (the broker
drops duplicates by (actor id, incarnation, seq)). When the broker reports a newer
policy version the actor stops admitting, lets running requests finish, fetches the
new weights and applies them before generating again. With `broker.max_policy_lag: 0`
the run is synchronous: each actor generates exactly its share of one learner step
per policy version, so generation and training strictly alternate.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engine import Completion, Engine
from actors.tasks import Problem, Task
from protocol import messages as m
from protocol.config import RunConfig
from protocol.curve import client_keys_dir
from protocol.sample import Sample
from protocol.transport import Client
from protocol.weights import WeightReceiver

log = logging.getLogger("actor")
IDLE_POLL_S = 0.05


@dataclass
class OpenGroup:
    problem: Problem
    version_start: int
    remaining: int


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
        self.seq = itertools.count()
        self.group_ids = itertools.count()
        self.meter = RateMeter()
        self.weight_updates = 0
        self.started_at_version = 0
        self.quota = _sync_quota(config, index)

    def run(self, stop: threading.Event) -> None:
        self._call(m.HELLO, {})
        while not stop.is_set() and not self.stop_requested:
            if self.broker_version > self.version and not self.engine.busy:
                self._update_weights()
            self._admit()
            if self.engine.busy:
                started = time.perf_counter()
                finished = self.engine.step()
                self.meter.add(sum(len(c.token_ids) for c in finished), time.perf_counter() - started)
                self._send(self._finish(finished))
            else:
                time.sleep(IDLE_POLL_S)
                self._call(m.PING, {})
            self._resend_overdue()
        log.info("%s stopping: %d weight updates, %d unacked", self.actor_id, self.weight_updates, len(self.unacked))

    @property
    def in_flight_samples(self) -> int:
        return sum(g.remaining for g in self.groups.values())

    def _admit(self) -> None:
        """Start new groups while the broker has room for them and the weights are current."""
        n = self.config.sampling.group_size
        while (
            self.broker_version <= self.version
            and len(self.groups) < self.config.actor.groups_in_flight
            and self.credits - self.in_flight_samples - len(self.unacked) >= n
            and (self.quota is None or self.started_at_version < self.quota)
        ):
            self.started_at_version += 1
            group_id = f"{self.actor_id}-{self.incarnation}-{next(self.group_ids)}"
            problem = self.task.next_problem()
            self.groups[group_id] = OpenGroup(problem, self.version, n)
            for i in range(n):
                self.engine.submit(f"{group_id}/{i}", problem.prompt_ids)

    def _finish(self, completions: list[Completion]) -> list[Sample]:
        samples = []
        for c in completions:
            group_id, _, index = c.request_id.rpartition("/")
            group = self.groups[group_id]
            group.remaining -= 1
            if group.remaining == 0:
                del self.groups[group_id]
            reward, correct = self.task.score(group.problem, c.token_ids)
            if index == "0" and group_id.endswith("0"):  # every tenth group: show what the model writes
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
                    index=int(index),
                    version_start=group.version_start,
                    version_end=self.version,
                    actor_id=self.actor_id,
                    incarnation=self.incarnation,
                    seq=next(self.seq),
                    finish_reason=c.finish_reason,
                    metadata={"task": self.task.name, "correct": correct},
                )
            )
        return samples

    def _send(self, samples: list[Sample]) -> None:
        if not samples:
            return
        now = time.monotonic()
        for s in samples:
            self.unacked[s.seq] = (s, now)
        self._call(m.SAMPLES, {}, samples)

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        overdue = [s for s, sent in self.unacked.values() if now - sent > self.config.actor.resend_after_s]
        if overdue:
            log.warning("%s resending %d unacknowledged samples", self.actor_id, len(overdue))
            self._send(overdue)

    def _call(self, kind: str, body: dict[str, Any], samples: list[Sample] = ()) -> None:
        """One request to the broker; a timeout is logged and retried later, never fatal."""
        body = {**body, "actor_id": self.actor_id, "incarnation": self.incarnation, "gen_tokens_per_s": self.meter.rate()}
        try:
            _, reply, _ = self.broker.request(kind, body, samples=samples)
        except TimeoutError as err:
            log.warning("%s: %s", self.actor_id, err)
            return
        for seq in reply.get("acked", []):
            self.unacked.pop(seq, None)
        for seq, reason in reply.get("rejected", []):
            log.error("%s: broker rejected sample %s: %s", self.actor_id, seq, reason)
            self.unacked.pop(seq, None)
        self.credits = reply.get("credits", self.credits)
        self.broker_version = reply.get("policy_version", self.broker_version)
        self.stop_requested = reply.get("stop", False)

    def _update_weights(self) -> None:
        started = time.monotonic()
        try:
            fetched = self.weights.fetch(self.version)
        except TimeoutError as err:
            log.warning("%s: weights not reachable yet: %s", self.actor_id, err)
            time.sleep(IDLE_POLL_S)
            return
        if fetched is None:
            return
        version, state_dict = fetched
        self.engine.load_weights(state_dict)
        self.version = version
        self.started_at_version = 0
        self.weight_updates += 1
        log.info("%s applied weights v%d in %.2f s", self.actor_id, version, time.monotonic() - started)


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
    from actors.weights import TcpWeightReceiver

    seed = config.run.seed + 1000 * index
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = make_engine(model_dir, config, seed)
    broker = Client(config.endpoints.broker, f"actor-{index}-{uuid.uuid4().hex[:6]}", curve_dir=client_keys_dir(config))
    weights = TcpWeightReceiver(config.endpoints.weights, f"actor-{index}-weights-{uuid.uuid4().hex[:6]}")
    try:
        Actor(config, index, engine, make_task(config.task, tokenizer, seed), weights, broker).run(stop)
    finally:
        broker.close()
        weights.close()

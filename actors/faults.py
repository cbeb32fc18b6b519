"""What can go wrong while generating, how the actor counts it, and a fault injector for tests.

A failed generation (engine error, a request past its time limit, a reward function
that raises or returns a non-finite value) never becomes a made-up reward: its group
is dropped, the cause is logged and counted. A few failures are normal on a long run;
a flood of them means something is broken, so more than `max_generation_failures`
within `failure_window_s` stops the actor with a named error instead of burning compute.

`FaultyEngine` wraps a real engine and injects faults into chosen groups, selected by
the config's `actor.inject_faults` (tests use it to check that the counters match
exactly what was injected).
"""

from __future__ import annotations

import time
from collections import Counter, deque

import torch

from actors.engine import Completion, Engine
from protocol.config import FaultInjectionSection
from protocol.errors import GenerationFailuresExceeded

FAILURES = ("engine_error", "generation_timeout", "reward_error", "reward_timeout", "reward_nan")


class EngineFault(RuntimeError):
    """Raised by FaultyEngine in place of a real engine error."""


class FailureBudget:
    """Counts failures by cause; raises GenerationFailuresExceeded past `limit` within `window_s`."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.counts: Counter[str] = Counter({name: 0 for name in FAILURES})
        self.recent: deque[float] = deque()

    def record(self, cause: str, detail: str) -> None:
        now = time.monotonic()
        self.counts[cause] += 1
        self.recent.append(now)
        while self.recent and now - self.recent[0] > self.window_s:
            self.recent.popleft()
        if len(self.recent) > self.limit:
            raise GenerationFailuresExceeded(
                f"{len(self.recent)} generation failures within {self.window_s:g} s (limit {self.limit}); "
                f"last: {cause}: {detail}; counts so far: {dict(self.counts)}"
            )


def group_ordinal(request_id: str) -> int:
    """The actor-local group number in a request id `<actor>-<incarnation>-<ordinal>/<index>`."""
    return int(request_id.rpartition("/")[0].rpartition("-")[2])


class FaultyEngine(Engine):
    """A real engine whose chosen groups hang (their requests never finish) or make one step raise.

    With `slowdown` s > 1 every step after the first also sleeps (s - 1) times its own duration: a
    straggler. The first step is spared because it prepares kernels (seconds on a CPU); stretching it
    would model a slow compiler, not a slow generator, and keep the actor deaf to a stop for minutes.
    """

    def __init__(self, inner: Engine, faults: FaultInjectionSection, slowdown: float = 1.0) -> None:
        self.inner, self.faults, self.slowdown = inner, faults, slowdown
        self.hung: set[str] = set()
        self.raised: set[int] = set()
        self.stepped = False

    def submit(self, request_id: str, prompt_ids: list[int]) -> None:
        self.inner.submit(request_id, prompt_ids)

    def step(self) -> list[Completion]:
        started = time.perf_counter()
        outputs = self.inner.step()
        if self.stepped:
            time.sleep((self.slowdown - 1) * (time.perf_counter() - started))
        self.stepped = True
        finished = []
        for c in outputs:
            group = group_ordinal(c.request_id)
            if group in self.faults.engine_hang:
                self.hung.add(c.request_id)  # from the actor's side it simply never finishes
            elif group in self.faults.engine_raise and group not in self.raised:
                self.raised.add(group)
                raise EngineFault(f"injected engine fault while finishing {c.request_id}")
            else:
                finished.append(c)
        return finished

    def abort(self, request_ids: list[str]) -> None:
        self.hung.difference_update(request_ids)
        self.inner.abort(request_ids)

    @property
    def busy(self) -> bool:
        return self.inner.busy or bool(self.hung)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.inner.load_weights(state_dict)


def injected_reward_fault(faults: FaultInjectionSection, group: int) -> float | None:
    """The reward a faulty reward function gives group `group` (NaN), raising where configured; None if healthy."""
    if group in faults.reward_raise:
        raise ZeroDivisionError(f"injected reward fault in group {group}")
    return float("nan") if group in faults.reward_nan else None

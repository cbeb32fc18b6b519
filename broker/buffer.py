"""The replay buffer: deduplicates samples, assembles GRPO groups, drops stale ones, serves FIFO.

Pure data structure, no sockets, so its accounting can be tested exactly. Every
accepted sample ends in one of four places, and `counters` proves it:
accepted == served + dropped_stale + expired + buffered.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from protocol.sample import Key, Sample


class SeqWindow:
    """The set of sequence numbers seen from one actor incarnation, compacted below a watermark.

    A sequence number that never arrives would hold the watermark back forever and let
    `above` grow with every later sample. Gaps are rare: the actor numbers only the samples
    it sends, and the broker marks the ones it rejects as seen (`ReplayBuffer.mark_seen`);
    what is left is a sample refused for credit and not yet resent, or one lost with a
    peer. Once `above` holds more than MAX_ABOVE numbers, the watermark jumps past the
    older half of them. That declares a refused sample still to come seen (its resend
    would be acknowledged and dropped), so the bound is set far beyond what an actor gets
    accepted within one resend delay (`actor.resend_after_s`).
    """

    MAX_ABOVE = 1 << 16

    def __init__(self) -> None:
        self.below = 0  # every seq < below has been seen
        self.above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Record `seq`; False if it was already seen."""
        if seq == self.below and not self.above:  # in order, the usual case
            self.below += 1
            return True
        if seq in self:
            return False
        self.above.add(seq)
        self._compact()
        if len(self.above) > self.MAX_ABOVE:
            self.below = sorted(self.above)[len(self.above) // 2]
            self.above = {s for s in self.above if s >= self.below}
            self._compact()
        return True

    def __contains__(self, seq: int) -> bool:
        return seq < self.below or seq in self.above

    def merge(self, below: int, above: list[int]) -> None:
        """Add everything another window (e.g. a logged snapshot) has seen."""
        self.below = max(self.below, below)
        self.above = {s for s in self.above.union(above) if s >= self.below}
        self._compact()

    def _compact(self) -> None:
        while self.below in self.above:
            self.above.remove(self.below)
            self.below += 1


COUNTERS = (
    "accepted", "duplicates", "dropped_stale", "dropped_stale_groups", "expired", "expired_groups",
    "groups_completed", "served", "served_groups",
)  # fmt: skip
Retire = Callable[[list[Sample], str], None]


class Admitted(NamedTuple):
    acked: list[int]
    refused: list[int]
    new: list[Key]
    clashed: list[int]


class ReplayBuffer:
    """`on_retire(samples, why)` hears of every buffered sample that leaves without being served."""

    def __init__(self, max_policy_lag: int, on_retire: Retire | None = None) -> None:
        self.max_policy_lag = max_policy_lag
        self.on_retire = on_retire
        self.policy_version = 0
        self.partial: dict[str, list[Sample]] = {}
        self.partial_since: dict[str, float] = {}  # group id -> when its first sample came (monotonic seconds)
        self.ready: deque[list[Sample]] = deque()
        self.seen: dict[tuple[str, str], SeqWindow] = {}
        self.held: Counter[str] = Counter()  # samples per actor currently buffered
        self.held_bytes: Counter[str] = Counter()  # their array bytes
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})

    def add(self, sample: Sample) -> str:
        """Take one validated sample; returns 'accepted', 'duplicate', 'stale' or 'clash'.

        A clash is a new sample for an index its partial group already holds (a buggy or hostile
        sender reusing a group id): taken, it would complete another sender's group with a
        stranger, or make a group of one index twice. It is refused and counts as seen.
        """
        owner = (sample.actor_id, sample.incarnation)
        window = self.seen.get(owner) or self.seen.setdefault(owner, SeqWindow())
        if not window.add(sample.seq):
            self.counters["duplicates"] += 1
            return "duplicate"
        group = self.partial.get(sample.group_id)
        if group is not None and any(s.index == sample.index for s in group):
            return "clash"
        self.counters["accepted"] += 1
        if self._stale(sample.version_start):
            self.counters["dropped_stale"] += 1
            return "stale"
        if group is None:
            group = self.partial[sample.group_id] = []
            self.partial_since[sample.group_id] = time.monotonic()
        group.append(sample)
        self.held[sample.actor_id] += 1
        self.held_bytes[sample.actor_id] += sample.nbytes
        if len(group) == sample.group_size:
            del self.partial[sample.group_id], self.partial_since[sample.group_id]
            self.ready.append(sorted(group, key=lambda s: s.index))
            self.counters["groups_completed"] += 1
        return "accepted"

    def admit(self, samples: list[Sample], window: int, byte_budget: int | None = None, total_budget: int | None = None) -> Admitted:
        """Add one message's samples as far as each actor's credit goes (see `credits`); returns the seqs to
        acknowledge (duplicates too, so the actor forgets them), the seqs refused for want of credit (the actor
        sends them again later), the keys newly accepted and the seqs that clashed (see `add`). The same decisions as `credits` then `add` per
        sample, without a method call per sample for the credit. A sample whose group is already partial here is
        taken over the credit, up to twice the credit (samples and bytes): refused, it would leave that group to
        wait on the learner, and to expire if the learner is slower than broker.actor_ttl_s. The cap keeps a
        sender claiming huge groups from growing one past any budget. `total_budget` bounds the bytes of all
        actors together the same way: more actors than the budget was split over (elastic ones joining, or
        made-up actor ids) each had a whole share."""
        done = Admitted([], [], [], [])
        held, held_bytes = self.held, self.held_bytes
        total = sum(held_bytes.values())
        for sample in samples:
            actor = sample.actor_id
            over = _credit_left(held[actor], held_bytes[actor], window, byte_budget) <= 0 or (total_budget is not None and total >= total_budget)
            if over and not self.is_duplicate(sample) and not self._completes(sample, held, held_bytes, window, byte_budget):
                done.refused.append(sample.seq)
                continue
            before = held_bytes[actor]
            outcome = self.add(sample)
            total += held_bytes[actor] - before
            if outcome == "clash":
                done.clashed.append(sample.seq)
                continue
            if outcome == "accepted":
                done.new.append(sample.key)
            done.acked.append(sample.seq)
        return done

    def settle(self, owner: tuple[str, str], below: int) -> None:
        """The sender says it never sends a sequence number below `below` again: count them all seen. Closes the
        gaps rejected samples leave after a restart (they are not logged) and those of samples the sender dropped
        unsent; a window grown to MAX_ABOVE by gaps would otherwise sort itself every MAX_ABOVE / 2 samples."""
        window = self.seen.get(owner)
        if window is not None and below > window.below:
            window.merge(below, [])

    def mark_seen(self, owner: tuple[str, str], seqs: list[int]) -> None:
        """Record sequence numbers answered for good without being accepted (rejected samples are never resent)."""
        window = self.seen.get(owner) or self.seen.setdefault(owner, SeqWindow())
        for seq in seqs:
            window.add(seq)

    def _completes(self, sample: Sample, held: Counter[str], held_bytes: Counter[str], window: int, byte_budget: int | None) -> bool:
        """Whether `sample` joins a group partial here, within twice its actor's credit."""
        if sample.group_id not in self.partial:
            return False
        return _credit_left(held[sample.actor_id], held_bytes[sample.actor_id], 2 * window, byte_budget and 2 * byte_budget) > 0

    def is_duplicate(self, sample: Sample) -> bool:
        window = self.seen.get((sample.actor_id, sample.incarnation))
        return window is not None and sample.seq in window

    def set_policy_version(self, version: int) -> None:
        """Advance the learner's version and evict every group that became too old."""
        if version <= self.policy_version:
            return
        self.policy_version = version
        for group_id in [g for g, samples in self.partial.items() if self._stale(_oldest(samples))]:
            self._drop(self._pop_partial(group_id))
        fresh = deque()
        for group in self.ready:
            if self._stale(_oldest(group)):
                self._drop(group)
            else:
                fresh.append(group)
        self.ready = fresh

    def take(self, num_groups: int) -> list[list[Sample]] | None:
        """The oldest `num_groups` complete groups, or None while fewer are ready."""
        if len(self.ready) < num_groups:
            return None
        groups = [self.ready.popleft() for _ in range(num_groups)]
        for group in groups:
            self._release(group)
            self.counters["served"] += len(group)
        self.counters["served_groups"] += num_groups
        return groups

    def expire(self, owner: tuple[str, str]) -> int:
        """Drop the partial groups of a silent (actor, incarnation); they can never complete. Returns samples dropped."""
        return self._expire([g for g, samples in self.partial.items() if (samples[0].actor_id, samples[0].incarnation) == owner])

    def expire_incomplete(self, started_before: float) -> int:
        """Drop the partial groups whose first sample came before `started_before` (monotonic seconds): an actor sends
        a group's samples together, so one still incomplete has lost a sibling (rejected, say) and would hold its
        actor's credit forever. Returns samples dropped."""
        return self._expire([g for g, since in self.partial_since.items() if since < started_before])

    def _expire(self, group_ids: list[str]) -> int:
        dropped = 0
        for group_id in group_ids:
            group = self._pop_partial(group_id)
            self._release(group)
            self.counters["expired"] += len(group)
            self.counters["expired_groups"] += 1
            dropped += len(group)
            if self.on_retire is not None:
                self.on_retire(group, "expired")
        return dropped

    def _pop_partial(self, group_id: str) -> list[Sample]:
        del self.partial_since[group_id]
        return self.partial.pop(group_id)

    def credits(self, actor_id: str, window: int, byte_budget: int | None = None) -> int:
        """How many more samples `actor_id` may have buffered here: `window` samples, and no more bytes than `byte_budget`."""
        return max(0, _credit_left(self.held[actor_id], self.held_bytes[actor_id], window, byte_budget))

    @property
    def buffered(self) -> int:
        return sum(self.held.values())

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "policy_version": self.policy_version,
            "ready_groups": len(self.ready),
            "partial_groups": len(self.partial),
            "buffered": self.buffered,
        }

    def _stale(self, version: int) -> bool:
        return self.policy_version - version > self.max_policy_lag

    def _drop(self, group: list[Sample]) -> None:
        self._release(group)
        self.counters["dropped_stale"] += len(group)
        self.counters["dropped_stale_groups"] += 1
        if self.on_retire is not None:
            self.on_retire(group, "stale")

    def _release(self, group: list[Sample]) -> None:
        for sample in group:
            self.held[sample.actor_id] -= 1
            self.held_bytes[sample.actor_id] -= sample.nbytes


def _credit_left(held: int, held_bytes: int, window: int, byte_budget: int | None) -> int:
    """Samples an actor holding `held` samples of `held_bytes` may still add (negative when over)."""
    credits = window - held
    if byte_budget is not None and held:
        credits = min(credits, int((byte_budget - held_bytes) // (held_bytes / held)))
    return credits


def _oldest(group: list[Sample]) -> int:
    return min(s.version_start for s in group)

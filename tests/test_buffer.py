"""Unit tests for broker/buffer.py: group assembly, staleness, credits, accounting (dedupe windows: tests/test_seq_window.py)."""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import pytest

from broker.buffer import ReplayBuffer
from protocol.sample import Sample
from tests import helpers


def make_sample(**overrides) -> Sample:
    return helpers.make_sample(**{**dict(group_size=2), **overrides})


class Maker:
    """Hands out samples with fresh sequence numbers per (actor, incarnation)."""

    def __init__(self) -> None:
        self.next_seq: Counter[tuple[str, str]] = Counter()

    def __call__(self, group_id: str, index: int, group_size: int = 2, version: int = 0, actor: str = "a", **kw):
        incarnation = kw.pop("incarnation", "i0")
        seq = self.next_seq[(actor, incarnation)]
        self.next_seq[(actor, incarnation)] += 1
        return make_sample(
            group_id=group_id,
            index=index,
            group_size=group_size,
            version_start=version,
            version_end=version,
            actor_id=actor,
            incarnation=incarnation,
            seq=seq,
            **kw,
        )


def add_group(buffer: ReplayBuffer, make: Maker, group_id: str, size: int = 2, version: int = 0, actor: str = "a"):
    samples = [make(group_id, i, size, version, actor) for i in range(size)]
    assert [buffer.add(s) for s in samples] == ["accepted"] * size
    return samples


def keys(group: list[Sample]) -> list[tuple[str, str, int]]:
    return [s.key for s in group]


def conserved(buffer: ReplayBuffer) -> bool:
    c = buffer.counters
    return c["accepted"] == c["served"] + c["dropped_stale"] + c["expired"] + buffer.buffered


# --------------------------------------------------------------------------- group assembly


def test_group_ready_only_when_complete_and_sorted_by_index():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    s2, s0, s1 = make("g", 2, 3), make("g", 0, 3), make("g", 1, 3)
    assert buffer.add(s2) == "accepted"
    assert buffer.add(s0) == "accepted"
    assert buffer.take(1) is None
    assert buffer.stats()["partial_groups"] == 1 and buffer.stats()["ready_groups"] == 0
    assert buffer.counters["groups_completed"] == 0
    assert buffer.add(s1) == "accepted"
    assert buffer.stats()["partial_groups"] == 0 and buffer.stats()["ready_groups"] == 1
    assert buffer.counters["groups_completed"] == 1
    (group,) = buffer.take(1)
    assert [s.index for s in group] == [0, 1, 2]
    assert group[0] is s0 and group[1] is s1 and group[2] is s2
    assert buffer.counters["served"] == 3
    assert buffer.counters["served_groups"] == 1
    assert buffer.buffered == 0
    assert buffer.take(1) is None


def test_groups_are_separate_by_group_id():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    buffer.add(make("a", 0))
    buffer.add(make("b", 0))
    assert buffer.take(1) is None
    assert buffer.stats()["partial_groups"] == 2
    buffer.add(make("b", 1))
    (group,) = buffer.take(1)
    assert {s.group_id for s in group} == {"b"}
    assert buffer.stats()["partial_groups"] == 1


def test_group_from_several_actors():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    buffer.add(make("g", 1, 2, actor="x"))
    buffer.add(make("g", 0, 2, actor="y"))
    (group,) = buffer.take(1)
    assert [(s.index, s.actor_id) for s in group] == [(0, "y"), (1, "x")]


def test_duplicates_counted_and_not_added():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    s0 = make("g", 0, 2)
    assert buffer.add(s0) == "accepted"
    assert buffer.add(s0) == "duplicate"
    resent = make_sample(group_id="g", index=1, group_size=2, actor_id="a", incarnation="i0", seq=s0.seq)
    assert buffer.add(resent) == "duplicate"  # same key, even with other content
    assert buffer.counters["duplicates"] == 2
    assert buffer.counters["accepted"] == 1
    assert buffer.buffered == 1
    assert buffer.take(1) is None  # the duplicates did not complete the group
    assert buffer.stats()["partial_groups"] == 1


def test_duplicate_after_serving_is_still_a_duplicate():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    group = add_group(buffer, make, "g")
    assert buffer.take(1) is not None
    assert [buffer.add(s) for s in group] == ["duplicate", "duplicate"]
    assert buffer.counters["duplicates"] == 2
    assert buffer.stats()["ready_groups"] == 0 and buffer.buffered == 0


def test_same_seq_from_other_incarnation_or_actor_is_new():
    buffer = ReplayBuffer(max_policy_lag=2)
    assert buffer.add(make_sample(group_id="g", index=0, seq=0, actor_id="a", incarnation="i0")) == "accepted"
    assert buffer.add(make_sample(group_id="g", index=1, seq=0, actor_id="a", incarnation="i1")) == "accepted"
    assert buffer.add(make_sample(group_id="h", index=0, seq=0, actor_id="b", incarnation="i0")) == "accepted"
    assert buffer.counters["duplicates"] == 0
    assert buffer.counters["accepted"] == 3


# --------------------------------------------------------------------------- take


def test_groups_still_incomplete_long_after_their_first_sample_expire():
    """A group whose sibling was rejected never completes; left alone it would hold its actor's credit forever."""
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    buffer.add(make("lost_sibling", 0))
    before_second = time.monotonic()
    buffer.add(make("young", 0))
    assert buffer.expire_incomplete(started_before=before_second) == 1  # only the older one
    assert set(buffer.partial) == {"young"} and buffer.credits("a", window=4) == 3
    assert buffer.counters["expired"] == 1 and buffer.counters["expired_groups"] == 1 and conserved(buffer)
    buffer.add(make("young", 1))  # complete groups are never expired
    assert buffer.expire_incomplete(started_before=time.monotonic() + 1) == 0 and len(buffer.ready) == 1


def test_take_is_fifo_by_completion():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    a0, b0 = make("A", 0), make("B", 0)
    buffer.add(a0)
    buffer.add(b0)
    buffer.add(make("B", 1))  # B completes first
    buffer.add(make("A", 1))
    add_group(buffer, make, "C")
    first = buffer.take(2)
    assert [g[0].group_id for g in first] == ["B", "A"]
    assert [g[0].group_id for g in buffer.take(1)] == ["C"]
    assert buffer.counters["served_groups"] == 3
    assert buffer.counters["served"] == 6


def test_take_returns_none_when_too_few_groups_and_keeps_them():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    add_group(buffer, make, "A")
    add_group(buffer, make, "B")
    assert buffer.take(3) is None
    assert buffer.stats()["ready_groups"] == 2
    assert buffer.counters["served"] == 0 and buffer.counters["served_groups"] == 0
    assert buffer.buffered == 4
    groups = buffer.take(2)
    assert [g[0].group_id for g in groups] == ["A", "B"]
    assert buffer.take(1) is None


def test_take_zero_groups():
    buffer = ReplayBuffer(max_policy_lag=2)
    assert buffer.take(0) == []
    assert buffer.counters["served_groups"] == 0


# --------------------------------------------------------------------------- staleness


def test_stale_at_arrival_is_dropped_and_counted():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    buffer.set_policy_version(5)
    old = make("g", 0, version=2)  # lag 3 > 2
    assert buffer.add(old) == "stale"
    assert buffer.counters["accepted"] == 1
    assert buffer.counters["dropped_stale"] == 1
    assert buffer.counters["dropped_stale_groups"] == 0  # a single sample, no group was dropped
    assert buffer.buffered == 0
    assert buffer.credits("a", 10) == 10
    assert buffer.stats()["partial_groups"] == 0
    assert buffer.add(old) == "duplicate"  # its seq is remembered, a resend is not counted twice
    assert buffer.counters["dropped_stale"] == 1
    assert conserved(buffer)


def test_lag_equal_to_max_is_kept_at_arrival():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    buffer.set_policy_version(5)
    assert buffer.add(make("g", 0, version=3)) == "accepted"
    assert buffer.add(make("g", 1, version=7)) == "accepted"  # ahead of the learner: lag < 0 is fine
    assert buffer.counters["dropped_stale"] == 0
    assert len(buffer.take(1)) == 1


def test_zero_lag():
    buffer, make = ReplayBuffer(max_policy_lag=0), Maker()
    buffer.set_policy_version(1)
    assert buffer.add(make("g", 0, version=0)) == "stale"
    assert buffer.add(make("g", 0, version=1)) == "accepted"


def test_set_policy_version_evicts_partial_and_ready_groups():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    add_group(buffer, make, "R_old", size=2, version=0)  # ready, stale at version 2
    add_group(buffer, make, "R_new", size=2, version=2)  # ready, lag 0
    add_group(buffer, make, "R_lag1", size=3, version=1)  # ready, lag exactly 1: kept
    buffer.add(make("R_mixed", 0, 2, version=2))
    buffer.add(make("R_mixed", 1, 2, version=0))  # ready; its oldest sample decides: stale
    buffer.add(make("P_old", 0, 3, version=0))  # partial, stale
    buffer.add(make("P_old", 1, 3, version=0))
    buffer.add(make("P_lag1", 0, 2, version=1))  # partial, lag exactly 1: kept
    assert buffer.buffered == 2 + 2 + 3 + 2 + 2 + 1
    assert buffer.stats()["ready_groups"] == 4 and buffer.stats()["partial_groups"] == 2

    buffer.set_policy_version(2)
    assert buffer.policy_version == 2
    assert buffer.counters["dropped_stale"] == 2 + 2 + 2  # R_old, R_mixed, P_old
    assert buffer.counters["dropped_stale_groups"] == 3
    assert buffer.stats()["ready_groups"] == 2
    assert set(buffer.partial) == {"P_lag1"}
    assert buffer.buffered == 2 + 3 + 1
    assert conserved(buffer)
    # survivors keep their order
    assert [g[0].group_id for g in buffer.take(2)] == ["R_new", "R_lag1"]

    buffer.set_policy_version(1)  # going back is ignored
    buffer.set_policy_version(2)  # so is repeating
    assert buffer.policy_version == 2 and buffer.counters["dropped_stale_groups"] == 3

    buffer.set_policy_version(3)  # now P_lag1 has lag 2 > 1
    assert buffer.counters["dropped_stale"] == 7
    assert buffer.counters["dropped_stale_groups"] == 4
    assert buffer.partial == {} and buffer.buffered == 0
    assert buffer.counters["accepted"] == 12 and buffer.counters["served"] == 5
    assert conserved(buffer)


def test_version_jump_evicts_everything_old():
    buffer, make = ReplayBuffer(max_policy_lag=2), Maker()
    for v in range(4):
        add_group(buffer, make, f"g{v}", version=v)
    buffer.set_policy_version(100)
    assert buffer.counters["dropped_stale"] == 8 and buffer.counters["dropped_stale_groups"] == 4
    assert buffer.take(1) is None
    stats = buffer.stats()
    assert stats["policy_version"] == 100 and stats["buffered"] == 0 and stats["ready_groups"] == 0


def test_late_sibling_of_evicted_group_is_stale_too():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    buffer.add(make("g", 0, 2, version=0))
    buffer.set_policy_version(2)
    assert buffer.counters["dropped_stale_groups"] == 1
    assert buffer.add(make("g", 1, 2, version=0)) == "stale"
    assert buffer.partial == {}
    assert buffer.counters["dropped_stale"] == 2


# --------------------------------------------------------------------------- credits


def test_credits_follow_buffered_samples():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    window = 5
    assert buffer.credits("a", window) == 5
    buffer.add(make("g1", 0, 3, actor="a"))
    buffer.add(make("g1", 1, 3, actor="a"))
    assert buffer.credits("a", window) == 3
    assert buffer.credits("b", window) == 5  # per actor
    buffer.add(make("g1", 2, 3, actor="b"))  # completes g1 with another actor's sample
    assert (buffer.credits("a", window), buffer.credits("b", window)) == (3, 4)
    add_group(buffer, make, "g2", size=3, actor="a")
    assert buffer.credits("a", window) == 0
    buffer.add(make("g3", 0, 2, actor="a"))  # beyond the window: never negative
    assert buffer.credits("a", window) == 0
    assert buffer.held["a"] == 6

    buffer.take(1)  # g1: two of a's samples, one of b's
    assert (buffer.credits("a", window), buffer.credits("b", window)) == (1, 5)
    buffer.take(1)  # g2
    assert buffer.credits("a", window) == 4

    buffer.set_policy_version(2)  # drops g3 (version 0, lag 2)
    assert buffer.counters["dropped_stale_groups"] == 1
    assert buffer.credits("a", window) == 5
    assert buffer.buffered == 0


def test_credits_not_consumed_by_duplicates_or_stale_arrivals():
    buffer, make = ReplayBuffer(max_policy_lag=0), Maker()
    s = make("g", 0, 2, version=0)
    buffer.add(s)
    buffer.add(s)
    assert buffer.credits("a", 4) == 3
    buffer.set_policy_version(1)
    assert buffer.credits("a", 4) == 4
    buffer.add(make("h", 0, 2, version=0))
    assert buffer.credits("a", 4) == 4


def test_admit_stops_at_the_credit_and_still_acks_duplicates():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    samples = [make(f"g{i // 2}", i % 2) for i in range(6)]
    acked, refused, new, _ = buffer.admit(samples, window=4)
    assert acked == [0, 1, 2, 3] and refused == [4, 5]
    assert new == [s.key for s in samples[:4]]
    acked, refused, new, _ = buffer.admit([samples[1], samples[5]], window=4)  # out of credit: the duplicate is acked
    assert (acked, refused, new) == ([1], [5], [])
    assert buffer.counters["duplicates"] == 1 and buffer.held["a"] == 4


def test_admit_completes_a_partial_group_over_the_credit():
    """Half of g1 got in before the credit ran out: its sibling is still taken, so g1 completes instead of waiting
    on the learner; a new group is refused."""
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    samples = [make(f"g{i // 2}", i % 2) for i in range(6)]
    acked, refused, _, _ = buffer.admit(samples[:3], window=3)
    assert acked == [0, 1, 2] and refused == []
    acked, refused, _, _ = buffer.admit(samples[3:], window=3)
    assert acked == [3] and refused == [4, 5] and buffer.held["a"] == 4 and len(buffer.ready) == 2


def test_a_group_claiming_a_huge_size_grows_no_further_than_twice_the_credit():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    samples = [make("endless", i, group_size=10**6) for i in range(20)]
    acked, refused, _, _ = buffer.admit(samples, window=4)
    assert len(acked) == 8 and len(refused) == 12 and buffer.held["a"] == 8


def test_admit_counts_bytes_as_it_goes():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    samples = [make(f"g{i // 2}", i % 2) for i in range(6)]
    budget = 3 * samples[0].nbytes
    acked, refused, _, _ = buffer.admit(samples, window=100, byte_budget=budget)
    assert (len(acked), len(refused)) == (4, 2)  # the third sample's sibling completes g1 over the budget
    assert buffer.held_bytes["a"] == budget + samples[0].nbytes


def test_actors_beyond_the_ones_the_budget_was_split_over_share_it():
    """Found by a helper's hunt: each actor id had its own whole share, so 20 ids held 20x the broker's budget."""
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    size = make("probe", 0).nbytes
    for actor in "abcd":
        acked, refused, _, _ = buffer.admit([make(f"{actor}{i}", 0, actor=actor) for i in range(4)], window=100,
                                            byte_budget=4 * size, total_budget=6 * size)  # fmt: skip
    assert sum(buffer.held_bytes.values()) == 6 * size and buffer.held["a"] == 4 and buffer.held["b"] == 2
    assert buffer.held["c"] == buffer.held["d"] == 0 and len(refused) == 4


def credits_as_before(buffer: ReplayBuffer, actor: str, window: int, budget: int | None) -> int:
    """The credit formula as the broker computed it per sample before `admit`, written out independently."""
    held, held_bytes = buffer.held[actor], buffer.held_bytes[actor]
    credits = window - held
    if budget is not None and held:
        credits = min(credits, int((budget - held_bytes) // (held_bytes / held)))
    return max(0, credits)


@pytest.mark.parametrize("seed", range(5))
def test_admit_decides_as_credits_then_add_per_sample(seed):
    """One message at a time through `admit` and through the per-sample reference: the same acks, refusals, state."""
    rng, make = random.Random(seed), Maker()
    fast, reference = ReplayBuffer(max_policy_lag=1), ReplayBuffer(max_policy_lag=1)
    sent: list[Sample] = []
    for step in range(60):
        message = [make(f"g{rng.randrange(12)}-{step // 10}", rng.randrange(3), 3, version=rng.randrange(3),
                        actor=rng.choice("ab"), prompt_ids=np.ones(rng.randrange(1, 9), np.int32)) for _ in range(rng.randrange(1, 6))]  # fmt: skip
        message += rng.sample(sent, min(len(sent), rng.randrange(3)))  # resends
        rng.shuffle(message)
        sent += message
        window, budget = rng.randrange(2, 12), rng.choice([None, rng.randrange(100, 800)])
        expected: tuple[list, list, list, list] = ([], [], [], [])
        for sample in message:
            partial = sample.group_id in reference.partial  # the rest of a group already here: up to twice the credit
            room = credits_as_before(reference, sample.actor_id, 2 * window, budget and 2 * budget) if partial else 0
            if not reference.is_duplicate(sample) and room <= 0 and credits_as_before(reference, sample.actor_id, window, budget) <= 0:
                expected[1].append(sample.seq)
                continue
            outcome = reference.add(sample)
            if outcome == "clash":
                expected[3].append(sample.seq)
                continue
            if outcome == "accepted":
                expected[2].append(sample.key)
            expected[0].append(sample.seq)
        assert fast.admit(message, window, budget) == expected
        version, groups = rng.randrange(3), rng.randrange(1, 3)
        for buffer in (fast, reference):
            buffer.set_policy_version(version)
            buffer.take(groups)
        assert fast.stats() == reference.stats() and fast.held_bytes == reference.held_bytes


def test_stats_exact():
    buffer, make = ReplayBuffer(max_policy_lag=1), Maker()
    add_group(buffer, make, "A")
    add_group(buffer, make, "B", version=0)
    buffer.add(make("C", 0, 2, version=3))  # partial, ahead of the learner
    buffer.add(make("D", 1, 2, version=3))  # partial
    buffer.take(1)
    buffer.set_policy_version(2)  # drops B (version 0)
    buffer.add(make("E", 0, 2, version=0))  # stale on arrival
    assert buffer.stats() == {
        "accepted": 7,
        "duplicates": 0,
        "groups_completed": 2,
        "served": 2,
        "served_groups": 1,
        "dropped_stale": 3,
        "dropped_stale_groups": 1,
        "expired": 0,
        "expired_groups": 0,
        "policy_version": 2,
        "ready_groups": 0,
        "partial_groups": 2,
        "buffered": 2,
    }


# --------------------------------------------------------------------------- conservation under random operations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conservation_under_random_operations(seed):
    rng = random.Random(seed)
    lag = rng.choice([0, 1, 2, 3])
    buffer = ReplayBuffer(max_policy_lag=lag)
    actors = [("a0", "i0"), ("a0", "i1"), ("a1", "i0"), ("a2", "x")]
    next_seq = Counter()
    pending: list[Sample] = []  # generated, not yet sent
    sent: list[Sample] = []  # everything ever sent once (for resends)
    served_keys: set = set()
    results = Counter()
    n_groups = 0
    adds = 0

    for step in range(3000):
        op = rng.random()
        if op < 0.08 or not pending:
            # a new group: generated by one actor (sometimes two), at a version near the learner's
            size = rng.randint(1, 5)
            version = max(0, buffer.policy_version - rng.randint(-1, lag + 2))
            for index in range(size):
                actor, inc = actors[rng.randrange(len(actors))] if rng.random() < 0.2 else actors[n_groups % 4]
                s = make_sample(
                    group_id=f"g{n_groups}",
                    group_size=size,
                    index=index,
                    version_start=version,
                    version_end=version + rng.randint(0, 1),
                    actor_id=actor,
                    incarnation=inc,
                    seq=next_seq[(actor, inc)],
                )
                next_seq[(actor, inc)] += 1
                pending.append(s)
            n_groups += 1
        elif op < 0.70:
            s = pending.pop(rng.randrange(len(pending)))
            results[buffer.add(s)] += 1
            adds += 1
            sent.append(s)
        elif op < 0.80 and sent:
            results[buffer.add(rng.choice(sent))] += 1  # a resend: always a duplicate
            adds += 1
        elif op < 0.92:
            want = rng.randint(0, 3)
            before = len(buffer.ready)
            groups = buffer.take(want)
            if before < want:
                assert groups is None
            else:
                assert len(groups) == want
                for group in groups:
                    assert len(group) == group[0].group_size
                    assert [s.index for s in group] == list(range(len(group)))
                    assert len({s.group_id for s in group}) == 1
                    assert min(s.version_start for s in group) >= buffer.policy_version - lag
                    for s in group:
                        assert s.key not in served_keys
                        served_keys.add(s.key)
        else:
            buffer.set_policy_version(buffer.policy_version + rng.choice([-1, 0, 1, 1, 2]))

        c = buffer.counters
        assert c["accepted"] == c["served"] + c["dropped_stale"] + buffer.buffered, step
        in_buffer = [s for g in buffer.partial.values() for s in g] + [s for g in buffer.ready for s in g]
        assert buffer.buffered == len(in_buffer)
        assert Counter(s.actor_id for s in in_buffer) == +buffer.held
        for actor, _ in actors:
            assert buffer.credits(actor, 8) == max(0, 8 - sum(s.actor_id == actor for s in in_buffer))
        assert c["accepted"] + c["duplicates"] == adds
        assert results["accepted"] + results["stale"] == c["accepted"]
        assert results["duplicate"] == c["duplicates"]
        assert c["served"] == len(served_keys)
        assert c["served_groups"] + len(buffer.ready) <= c["groups_completed"]
        assert all(len(g) == g[0].group_size for g in buffer.ready)
        assert all(0 < len(g) < g[0].group_size for g in buffer.partial.values())

    c = buffer.counters
    # the run exercised every path
    assert min(c["accepted"], c["served"], c["duplicates"], c["dropped_stale"], c["dropped_stale_groups"]) > 0
    assert results["stale"] > 0
    assert c["accepted"] == len({s.key for s in sent})

"""Actor pieces that need no engine: the synchronous quota, the credit arithmetic, the generation rate meter,
message sizing, and sending with acknowledgements still in flight (against a real ROUTER)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors import worker
from actors.engine import Completion
from actors.tasks import Problem, TokenRangeTask
from actors.weights import WeightClient
from actors.worker import HEARTBEAT_S, Actor, OpenGroup, RateMeter, _chunks, _sync_quota, credit_room, unsendable
from protocol import messages as m
from protocol.config import load_config
from protocol.transport import Client, free_port, send_reply
from protocol.weights import WeightReceiver
from protocol.wire import encode_samples, header_bytes
from tests.helpers import make_sample, router_in_thread


@pytest.mark.parametrize("groups,actors,expected", [(4, 1, [4]), (5, 2, [3, 2]), (6, 4, [2, 2, 1, 1])])
def test_sync_quota_splits_one_step_across_actors(groups, actors, expected):
    config = load_config(None, ["broker.max_policy_lag=0", f"train.groups_per_step={groups}", f"actor.count={actors}",
                                "broker.credits_per_actor=64"])  # fmt: skip
    quotas = [_sync_quota(config, i) for i in range(actors)]
    assert quotas == expected and sum(quotas) == groups


def test_async_runs_have_no_quota():
    assert _sync_quota(load_config(None, ["broker.max_policy_lag=1"]), 0) is None


def test_rate_meter_counts_engine_time_only():
    meter = RateMeter(window=2)
    assert meter.rate() == 0.0
    meter.add(100, 0.5)
    meter.add(50, 0.5)
    assert meter.rate() == 150.0
    meter.add(0, 1.0)  # the window keeps the last two steps
    assert meter.rate() == pytest.approx(50 / 1.5)


def test_samples_finished_together_go_in_as_few_messages_as_the_size_limit_allows():
    samples = [make_sample(seq=i, completion_ids=np.zeros(n, np.int32), behavior_logprobs=np.zeros(n, np.float32))
               for i, n in enumerate([10, 10, 10, 40, 10])]  # fmt: skip
    sizes = [s.nbytes for s in samples]  # prompt 3 tokens: 12 bytes, plus 8 bytes per completion token
    assert sizes == [92, 92, 92, 332, 92]
    chunks = _chunks(samples, max_bytes=200, max_header_bytes=1 << 20)
    assert [[s.seq for s in chunk] for chunk in chunks] == [[0, 1], [2], [3], [4]]  # the 332-byte one goes alone
    assert [s.seq for chunk in _chunks(samples, 1 << 20, 1 << 20) for s in chunk] == [0, 1, 2, 3, 4]
    assert len(_chunks(samples, 1 << 20, 1 << 20)) == 1 and _chunks([], 100, 100) == []


def test_samples_with_large_metadata_are_split_to_keep_each_header_within_its_limit():
    samples = [make_sample(seq=i, metadata={"note": "x" * 300, "i": i}) for i in range(7)]
    chunks = _chunks(samples, max_bytes=1 << 20, max_header_bytes=1000)
    assert [[s.seq for s in chunk] for chunk in chunks] == [[0, 1], [2, 3], [4, 5], [6]]
    for chunk in chunks:  # header_bytes bounds what each sample adds to the real header
        assert len(encode_samples(m.SAMPLES, chunk)[0]) <= sum(map(header_bytes, chunk)) + 256
    assert _chunks(samples, 1 << 20, max_header_bytes=10) == [[s] for s in samples]  # one too large still goes, alone


def test_a_sample_the_broker_would_refuse_even_alone_is_named_so_its_group_is_dropped_not_resent_forever():
    limits = load_config(None, ["broker.max_message_bytes=200000", "broker.max_header_bytes=65536"]).broker
    assert unsendable(make_sample(), limits) is None
    long = make_sample(completion_ids=np.zeros(30_000, np.int32), behavior_logprobs=np.zeros(30_000, np.float32))
    assert "broker.max_message_bytes = 200000" in unsendable(long, limits)
    chatty = make_sample(metadata={"note": "x" * 60_000})
    assert "broker.max_header_bytes = 65536" in unsendable(chatty, limits)


def test_open_groups_hold_credit_for_every_sample_they_will_send():
    # credit 32, groups of 8: three open groups (however many of their samples have finished) leave room for one more
    assert credit_room(credits=32, open_groups=3, unacked=0, group_size=8) == 8
    assert credit_room(credits=32, open_groups=4, unacked=0, group_size=8) == 0
    # samples sent but not yet acknowledged may still be refused: they hold credit too
    assert credit_room(credits=32, open_groups=2, unacked=9, group_size=8) == 7


@pytest.fixture
def slow_broker():
    """A real ROUTER that acknowledges each SAMPLES message `ACK_DELAY_S` after it arrives
    (as a broker does after its fsync), in order."""

    def acknowledge_later(router, identity: bytes, kind: str, body: dict) -> None:
        time.sleep(ACK_DELAY_S)
        send_reply(router, identity, body["rid"], m.ACK, {"acked": body["samples"]["seq"], "credits": 64})

    with router_in_thread(acknowledge_later) as endpoint:
        yield endpoint


ACK_DELAY_S = 0.3


def actor_sending_to(endpoint: str, in_flight: int, *overrides: str) -> Actor:
    """An actor with only its sending side (no engine or task, a receiver that never fetched: `_send` needs no more)."""
    config = load_config(None, [f"actor.messages_in_flight={in_flight}", *overrides])
    return Actor(config, 0, engine=None, task=None, weights=WeightReceiver(), broker=Client(endpoint, "actor-0-test"))


def group(first_seq: int) -> list:
    return [make_sample(seq=first_seq + i, index=i) for i in range(4)]


def test_the_engine_keeps_stepping_while_messages_await_their_acknowledgement(slow_broker):
    actor = actor_sending_to(slow_broker, in_flight=2)
    try:
        started = time.monotonic()
        actor._send(group(0))
        actor._send(group(4))
        assert time.monotonic() - started < ACK_DELAY_S  # two messages out, neither acknowledged yet
        assert len(actor.unacked) == 8 and len(actor.broker.posted) == 2
        actor._send(group(8))  # a third waits for the first acknowledgement
        assert time.monotonic() - started >= ACK_DELAY_S
        assert len(actor.broker.posted) == 2 and sorted(actor.unacked) == list(range(4, 12))
        actor._wait_for_acks(0)
        assert actor.unacked == {} and actor.credits == 64 and actor.counters["sample_messages"] == 3
    finally:
        actor.broker.close()


def test_with_no_messages_in_flight_each_send_waits_for_its_acknowledgement(slow_broker):
    actor = actor_sending_to(slow_broker, in_flight=0)
    try:
        started = time.monotonic()
        actor._send(group(0))
        assert time.monotonic() - started >= ACK_DELAY_S
        assert actor.unacked == {} and actor.broker.posted == {}
    finally:
        actor.broker.close()


def test_an_unanswered_message_is_given_up_and_its_samples_stay_unacknowledged():
    actor = actor_sending_to(f"127.0.0.1:{free_port()}", in_flight=1)  # nothing listens there: no reply ever comes
    try:
        actor._send(group(0))  # queued by ZeroMQ until a broker appears
        assert len(actor.unacked) == 4 and len(actor.broker.posted) == 1
        posted_at = next(iter(actor.broker.posted.values()))
        actor._wait_for_acks(0, timeout_s=0.3)
        assert 0.3 <= time.monotonic() - posted_at < 5.0
        assert actor.broker.posted == {} and len(actor.unacked) == 4  # resent later by _resend_overdue
    finally:
        actor.broker.close()


def test_every_message_tells_the_broker_below_which_no_sample_is_sent_again():
    """The broker's dedupe window closes its gaps at this watermark: samples it rejected (not logged, so a gap
    after a restart) and siblings the actor dropped with a rejected sample, which it never sends."""
    said: list[int] = []

    def answer(router, identity: bytes, kind: str, body: dict) -> None:
        said.append(body["settled_below"])
        seqs = body["samples"]["seq"]  # of group(4): 4 acknowledged, 5 rejected, 6 and 7 left unanswered
        acked = [s for s in seqs if s < 5 or s > 7]
        send_reply(router, identity, body["rid"], m.ACK, {"acked": acked, "rejected": [[5, "bad_sample"]] if 5 in seqs else [], "credits": 64})

    with router_in_thread(answer) as endpoint:
        actor = actor_sending_to(endpoint, in_flight=0)
        try:
            actor.next_seq = 12  # as if it had numbered group(0) to group(8) itself
            for first in (0, 4, 8):
                actor._send(group(first))
            assert said == [0, 4, 8] and actor.unacked == {}  # 6 and 7 went with their rejected sibling
            assert actor._status_body()["settled_below"] == 12
        finally:
            actor.broker.close()


def test_samples_are_overdue_from_their_own_post_not_from_the_wait_before_it(slow_broker):
    """One message in flight and room for one group per message: the second group is posted only once the
    first is acknowledged, and its resend clock starts then."""
    actor = actor_sending_to(slow_broker, 1, f"broker.max_message_bytes={2 * sum(s.nbytes for s in group(0))}")
    try:
        started = time.monotonic()
        actor._send([*group(0), *group(4)])
        assert actor.counters["sample_messages"] == 2 and sorted(actor.unacked) == [4, 5, 6, 7]
        assert all(sent - started >= ACK_DELAY_S for _, sent in actor.unacked.values())
    finally:
        actor.broker.close()


def test_a_late_acknowledgement_does_not_undo_a_newer_stop_or_version():
    """Acknowledgements wait for the broker's fsync, so a PING's status can overtake one."""
    actor = actor_sending_to(f"127.0.0.1:{free_port()}", 2)
    try:
        status = (m.STATUS, {"credits": 8, "policy_version": 3, "stop": True}, [])
        late_ack = (m.ACK, {"acked": [], "credits": 16, "policy_version": 1, "stop": False}, [])
        actor._take_replies([status, late_ack])
        assert actor.stop_requested and actor.broker_version == 3
    finally:
        actor.broker.close()


class BusyEngineStandIn:
    """Stands in for a vLLM engine whose requests run for a long time (a straggler): always busy, nothing finishes."""

    busy = True

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> list:
        self.steps += 1
        time.sleep(0.05)
        return []


def run_for(actor: Actor, seconds: float) -> bool:
    """Run `actor` for `seconds`, then ask it to stop; whether it did."""
    stop = threading.Event()
    runner = threading.Thread(target=actor.run, args=(stop,), daemon=True)
    runner.start()
    time.sleep(seconds)
    stop.set()
    runner.join(timeout=20)
    actor.broker.close()
    return not runner.is_alive()


def test_a_busy_actor_pings_so_it_hears_the_stop_while_its_requests_run():
    """Found as a straggler that missed the broker's stop: between batches, an actor pinged only when idle, so
    one whose requests ran past the broker's wait after FINISH (15 s) then waited for an exited broker forever."""
    stop_from = time.monotonic() + 0.5
    asked: list[str] = []

    def status(router, identity: bytes, kind: str, body: dict) -> None:
        asked.append(kind)
        send_reply(router, identity, body["rid"], m.STATUS, {"credits": 0, "policy_version": 0, "stop": time.monotonic() > stop_from})

    with router_in_thread(status) as endpoint:
        actor = actor_sending_to(endpoint, 2)
        actor.engine = BusyEngineStandIn()
        runner = threading.Thread(target=actor.run, args=(threading.Event(),), daemon=True)
        runner.start()
        runner.join(timeout=HEARTBEAT_S + 5)
        actor.broker.close()
    assert not runner.is_alive() and actor.stop_requested
    assert asked[0] == m.HELLO and set(asked[1:]) == {m.PING}


def test_a_busy_actor_keeps_generating_while_the_broker_is_down(monkeypatch):
    """Found by a review: the heartbeat waited for its reply, so with no broker each ping held the engine for
    ACK_TIMEOUT_S (42 engine steps in 25 s, against 498 without it)."""
    monkeypatch.setattr(worker, "ACK_TIMEOUT_S", 1.0)  # the HELLO, unanswered, costs a second
    actor = actor_sending_to(f"127.0.0.1:{free_port()}", 2)  # nothing listens there
    actor.engine = BusyEngineStandIn()
    assert run_for(actor, 1 + HEARTBEAT_S + 4)
    assert actor.engine.steps > (HEARTBEAT_S + 4) / 0.05 / 2  # half of what the engine alone would do


def test_an_announced_version_the_actor_cannot_fetch_does_not_stall_in_flight_generation():
    """Found by a helper's hunt: with the learner gone right after announcing a version, every loop turn of an
    in-flight actor blocked in a fetch for the weight client's whole timeout (60 s): one engine step a minute.
    (A review found the first fix, a 10 s wait for any reply, cut off a live learner packing a large model.)"""

    def status(router, identity: bytes, kind: str, body: dict) -> None:
        send_reply(router, identity, body["rid"], m.STATUS, {"credits": 0, "policy_version": 1, "stop": False})

    with router_in_thread(status) as endpoint:
        config = load_config(None, ["actor.weight_update=in_flight"])
        weights = WeightClient(f"127.0.0.1:{free_port()}", "actor-0-w", timeout_s=60.0, connect_timeout_s=1.0)  # nothing listens
        actor = Actor(config, 0, engine=BusyEngineStandIn(), task=None, weights=weights, broker=Client(endpoint, "actor-0"))
        actor.weight_updates = 1  # it has loaded weights before: in flight, it keeps generating meanwhile
        assert run_for(actor, 8)
        weights.close()
    assert weights.failures["timeout"] in (2, 3)  # at 0, 2 and 5 s: 1 s each, then 1 and 2 s of backing off
    assert actor.engine.steps > (8 - 3) / 0.05 / 2, actor.engine.steps  # half of what the engine alone would do in the time not spent asking


@pytest.fixture
def scoring_actor(tiny_model_dir):
    """An actor with a real (token range) task and no engine: `_score`, `_fail` and `_take_replies` need no more."""

    def make(*overrides: str) -> Actor:
        from transformers import AutoTokenizer

        config = load_config(None, ["task.name=token_range", *overrides])
        task = TokenRangeTask(config.task, AutoTokenizer.from_pretrained(tiny_model_dir), seed=0)
        return Actor(config, 0, engine=None, task=task, weights=WeightReceiver(), broker=Client(f"127.0.0.1:{free_port()}", "a"))

    return make


def finished_group(actor: Actor, ordinal: int, versions: list[int]) -> tuple[str, OpenGroup]:
    """A group whose requests finished while the engine held `versions` (one per completion)."""
    group_id = f"{actor.actor_id}-{actor.incarnation}-{ordinal}"
    done = [(Completion(f"{group_id}/{i}", np.array([5, 6], np.int32), np.array([-0.1, -0.2], np.float32), "stop"), v)
            for i, v in enumerate(versions)]  # fmt: skip
    return group_id, OpenGroup(Problem([1, 2, 3]), versions[0], {}, done)


def test_a_dropped_group_uses_no_sequence_numbers_and_each_sample_keeps_the_version_it_finished_under(scoring_actor):
    actor = scoring_actor("sampling.group_size=2", "actor.inject_faults.reward_nan=[1]")
    assert actor._score(*finished_group(actor, 1, [3, 3])) is None  # the second sample's reward is NaN: dropped
    samples = actor._score(*finished_group(actor, 2, [3, 4]))  # finished across an in-flight weight load
    assert [s.seq for s in samples] == [0, 1]  # no gap left at the broker by the dropped group
    assert [(s.version_start, s.version_end) for s in samples] == [(3, 3), (3, 4)]


def test_a_dropped_group_gives_its_place_in_a_synchronous_step_back(scoring_actor):
    actor = scoring_actor("broker.max_policy_lag=0", "sampling.group_size=2", "train.groups_per_step=2")
    actor.version, actor.started_at_version = 3, actor.quota
    actor._fail(*finished_group(actor, 1, [3, 3]), "generation_timeout", "late")  # started at this version: replaced
    actor._fail(*finished_group(actor, 2, [2, 2]), "generation_timeout", "late")  # an older version's: not this step's
    assert actor.started_at_version == actor.quota - 1


def test_a_rejected_sample_drops_its_group_once_and_gives_its_place_in_a_synchronous_step_back(scoring_actor):
    """Its group cannot complete at the broker: the siblings still unacknowledged are forgotten (never resent), the
    group is charged once to the failure budget, and the step gets a group in its stead."""
    actor = scoring_actor("broker.max_policy_lag=0", "sampling.group_size=2", "train.groups_per_step=2")
    actor.version, actor.started_at_version = 3, actor.quota
    now = time.monotonic()
    for seq in (7, 8):
        actor.unacked[seq] = (make_sample(seq=seq, group_id="g", version_start=3, version_end=3), now)
    actor.unacked[9] = (make_sample(seq=9, group_id="other", version_start=3, version_end=3), now)
    actor._take_replies([(m.ACK, {"acked": [], "rejected": [[7, "bad_logprobs"], [8, "bad_logprobs"]]}, None)])
    assert list(actor.unacked) == [9]
    assert actor.counters["rejected_samples"] == 2 and actor.counters["dropped_groups"] == 1
    assert actor.failures.counts["rejected_bad_logprobs"] == 1 and actor.started_at_version == actor.quota - 1


class LoadingEngineStandIn:
    """Stands in for a vLLM engine loading weights: notes whether the learner could rewrite the segment meanwhile."""

    def __init__(self, segment, refuse: bool = False) -> None:
        self.segment, self.refuse = segment, refuse
        self.rewritable_while_loading: bool | None = None

    def load_weights(self, state_dict: dict) -> None:
        self.rewritable_while_loading = self.segment.claim()
        if self.refuse:
            raise RuntimeError("the engine refused the weights")


@pytest.mark.parametrize("refuse", [False, True])
def test_the_learner_may_rewrite_a_shm_segment_once_the_engine_loaded_from_it(endpoints, refuse):
    """shm readers load straight from the learner's segment, leased while the engine loads (and only then: a lease
    kept would make the learner write every other version into fresh memory), whether the load works or not."""
    import torch

    from learner.weights import WeightServer

    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    weights = WeightClient(endpoints["weights"], "actor-0-w", timeout_s=10, shm=True)
    try:
        server.publish(1, {"w": torch.arange(16.0)})
        segment = server._latest.segment
        engine = LoadingEngineStandIn(segment, refuse)
        actor = Actor(load_config(None, []), 0, engine=engine, task=None, weights=weights, broker=Client(endpoints["broker"], "a"))
        if refuse:
            with pytest.raises(RuntimeError, match="refused"):
                actor._update_weights()
        else:
            actor._update_weights()
        assert engine.rewritable_while_loading is False and actor.version == (0 if refuse else 1)
        assert segment.claim()  # released: the learner's version after next goes here
    finally:
        weights.close()
        server.close()

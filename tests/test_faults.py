"""Generation faults: injected into a real actor, counted exactly, dropped whole, and never trained on."""

from __future__ import annotations

import json
import time

import pytest

from actors.faults import FailureBudget, group_ordinal
from protocol import messages as m
from protocol.errors import GenerationFailuresExceeded
from protocol.sample import Sample
from protocol.transport import Client, bind_router, send_reply
from protocol.wire import decode, per_sample_columns, samples_from
from tests.helpers import start_role

# The engine error drops every group in flight (0-3), so the other faults come after it.
INJECTED = {"engine_raise": 0, "reward_raise": 5, "reward_nan": 7, "engine_hang": 9}


def test_failure_budget_stops_only_on_a_flood():
    budget = FailureBudget(limit=2, window_s=0.3)
    budget.record("reward_error", "x")
    budget.record("engine_error", "y")
    time.sleep(0.35)  # those two left the window
    budget.record("generation_timeout", "z")
    budget.record("reward_nan", "w")
    with pytest.raises(GenerationFailuresExceeded, match=r"3 generation failures within 0.3 s \(limit 2\); last: reward_error: v"):
        budget.record("reward_error", "v")
    assert dict(budget.counts) == {"engine_error": 1, "generation_timeout": 1, "reward_error": 2, "reward_timeout": 0, "reward_nan": 1}


def test_group_ordinal_reads_request_ids():
    assert group_ordinal("actor-3-ab12cd34-17/5") == 17


def consume(client: Client, groups_wanted: int, timeout: float, until=lambda stats: True) -> list[list[Sample]]:
    """Play the learner: take batches of two groups, acknowledging each, until `groups_wanted` arrived and `until(stats)`."""
    groups, last, deadline, stats = [], None, time.monotonic() + timeout, {}
    while len(groups) < groups_wanted or not until(stats):
        assert time.monotonic() < deadline, f"only {len(groups)} groups arrived; broker stats {stats}"
        kind, body, arrays = client.request(m.GET_BATCH, {"groups": 2, "policy_version": 0, "ack_batch": last})
        stats = body["stats"]
        if kind == m.BATCH:
            last = body["batch_id"]
            samples = samples_from(body, arrays, None)
            groups += [samples[i : i + 8] for i in range(0, len(samples), 8)]
        else:
            time.sleep(0.2)
    client.request(m.FINISH, {"ack_batch": last})
    return groups


@pytest.mark.slow
def test_injected_faults_are_counted_exactly_and_never_reach_the_learner(tmp_path, endpoints):
    faults = [f"actor.inject_faults.{kind}=[{group}]" for kind, group in INJECTED.items()]
    broker = start_role("broker", tmp_path, endpoints)
    actor = start_role("actor", tmp_path, endpoints, *faults, "actor.request_timeout_s=20", "sampling.oversample=2")
    client = Client(endpoints["broker"], "test-learner")
    try:
        timed_out = lambda stats: stats.get("actor_counters", {}).get("actor-0", {}).get("generation_timeout")  # noqa: E731
        groups = consume(client, 12, timeout=240, until=timed_out)
        assert actor.wait(timeout=60) == 0, (tmp_path / "actor.log").read_text()[-3000:]
        assert broker.wait(timeout=60) == 0
    finally:
        client.close()
        for p in (broker, actor):
            if p.poll() is None:
                p.kill()
    stats = json.loads((tmp_path / "actor-0_stats.json").read_text())
    assert {cause: stats[cause] for cause in ("reward_error", "reward_nan", "generation_timeout", "engine_error")} == {
        "reward_error": 1, "reward_nan": 1, "generation_timeout": 1, "engine_error": 1}  # fmt: skip
    # Every group that was started is accounted for; the engine error took every group then in flight.
    assert stats["groups_started"] == stats["groups_sent"] + stats["dropped_groups"] + stats["aborted_stale_groups"] + stats["groups_open"]
    assert stats["dropped_groups"] >= 4
    # Spares: exactly two cancelled per group that reached group_size (sent, or dropped at scoring).
    assert stats["oversample_cancelled"] == 2 * (stats["groups_sent"] + stats["reward_error"] + stats["reward_nan"])
    received = {group_ordinal(g[0].group_id + "/0") for g in groups}
    assert not received & set(INJECTED.values())
    for group in groups:
        assert [s.index for s in group] == list(range(8)) and len({s.group_id for s in group}) == 1
        assert all(isinstance(s, Sample) and s.reward == s.reward for s in group)  # finite, never made up
    broker_stats = json.loads((tmp_path / "broker_stats.json").read_text())
    assert broker_stats["rejected"] == 0
    assert broker_stats["actor_counters"]["actor-0"]["reward_error"] == 1


@pytest.mark.slow
def test_a_flood_of_failures_stops_the_actor_by_name(tmp_path, endpoints):
    every_group = "[" + ",".join(map(str, range(200))) + "]"
    broker = start_role("broker", tmp_path, endpoints)
    actor = start_role("actor", tmp_path, endpoints, f"actor.inject_faults.reward_raise={every_group}",
                       "actor.max_generation_failures=3")  # fmt: skip
    try:
        assert actor.wait(timeout=240) == 1
    finally:
        for p in (broker, actor):
            p.kill()
    log = (tmp_path / "actor.log").read_text()
    assert "error: actor stopped: 4 generation failures within 300 s (limit 3); last: reward_error" in log
    assert json.loads((tmp_path / "actor-0_stats.json").read_text())["groups_sent"] == 0


@pytest.mark.slow
def test_prompts_too_long_for_the_model_are_skipped_and_counted_not_a_crash(tmp_path, endpoints):
    """Every arithmetic prompt (about 40 tokens with the chat template) is over a 24-token model.max_model_len: each
    is skipped (vLLM would refuse it), and a hundred in a row stop the actor by name: the config is wrong."""
    broker = start_role("broker", tmp_path, endpoints)
    actor = start_role("actor", tmp_path, endpoints, "model.max_model_len=24", "sampling.max_tokens=8")
    try:
        assert actor.wait(timeout=240) == 1
    finally:
        for p in (broker, actor):
            p.kill()
    assert "100 prompts in a row leave no room in model.max_model_len = 24" in (tmp_path / "actor.log").read_text()
    stats = json.loads((tmp_path / "actor-0_stats.json").read_text())
    assert stats["skipped_long_prompts"] == 100 and stats["groups_started"] == 0


@pytest.mark.slow
def test_an_error_reply_costs_a_resend_never_the_actor(tmp_path, endpoints):
    """A broker that answers SAMPLES with ERROR (its own internal error, say) gets those samples again; the actor keeps running."""
    router = bind_router(endpoints["broker"], 1 << 30)  # the test plays the broker: refuses the first SAMPLES, acks the rest
    actor = start_role("actor", tmp_path, endpoints, "actor.resend_after_s=1")
    refused, acked, stop, prompts = None, set(), False, []
    try:
        deadline = time.monotonic() + 240
        while not stop or actor.poll() is None:
            assert time.monotonic() < deadline and (stop or actor.poll() is None), (tmp_path / "actor.log").read_text()[-3000:]
            if not router.poll(500):
                continue
            identity, *frames = router.recv_multipart()
            kind, body, arrays = decode(frames)
            status = {"credits": 32, "policy_version": 0, "stop": stop}
            if kind == m.SAMPLES:  # the samples of a group share their prompt: it crosses the wire once per group
                groups = per_sample_columns(body["samples"], arrays[3].shape[1])["group_id"]
                prompts.append((len(set(groups)), len(set(arrays[3][0].tolist())), arrays[0].size, int(arrays[3][1].sum())))
            if kind == m.SAMPLES and refused is None:
                refused = body["samples"]["seq"]
                send_reply(router, identity, body["rid"], m.ERROR, {"reason": "internal_error", "detail": "injected by the test"})
            elif kind == m.SAMPLES:
                acked.update(body["samples"]["seq"])
                send_reply(router, identity, body["rid"], m.ACK, {"acked": body["samples"]["seq"], "rejected": [], "refused": [], **status})
            else:
                send_reply(router, identity, body["rid"], m.STATUS, status)
            stop = refused is not None and set(refused) <= acked and len(acked) >= 24
        assert actor.wait(timeout=30) == 0, (tmp_path / "actor.log").read_text()[-3000:]
    finally:
        router.close(linger=0)
        if actor.poll() is None:
            actor.kill()
    stats = json.loads((tmp_path / "actor-0_stats.json").read_text())
    assert stats["broker_refusals"] == 1 and stats["samples_sent"] >= 24
    assert "refused the request: internal_error: injected by the test" in (tmp_path / "actor.log").read_text()
    assert all(groups == spans for groups, spans, _, _ in prompts)  # one prompt span per group
    assert sum(sent for *_, sent in prompts) > sum(frame for *_, frame, _ in prompts)  # fewer prompt tokens than samples hold

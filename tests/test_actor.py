"""Actor pieces that need no engine: the synchronous quota, the credit arithmetic, the generation rate meter and
message sizing."""

from __future__ import annotations

import numpy as np
import pytest

from actors.worker import RateMeter, _chunks, _sync_quota, credit_room
from protocol.config import load_config
from tests.helpers import make_sample


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
    chunks = _chunks(samples, max_bytes=200)
    assert [[s.seq for s in chunk] for chunk in chunks] == [[0, 1], [2], [3], [4]]  # the 332-byte one goes alone
    assert [s.seq for chunk in _chunks(samples, max_bytes=1 << 20) for s in chunk] == [0, 1, 2, 3, 4]
    assert len(_chunks(samples, max_bytes=1 << 20)) == 1 and _chunks([], 100) == []


def test_open_groups_hold_credit_for_every_sample_they_will_send():
    # credit 32, groups of 8: three open groups (however many of their samples have finished) leave room for one more
    assert credit_room(credits=32, open_groups=3, unacked=0, group_size=8) == 8
    assert credit_room(credits=32, open_groups=4, unacked=0, group_size=8) == 0
    # samples sent but not yet acknowledged may still be refused: they hold credit too
    assert credit_room(credits=32, open_groups=2, unacked=9, group_size=8) == 7

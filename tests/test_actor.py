"""Actor pieces that need no engine: the synchronous quota and the generation rate meter."""

from __future__ import annotations

import pytest

from actors.worker import RateMeter, _sync_quota
from protocol.config import load_config


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

"""FSDP2 on CPU (gloo): 2 ranks train exactly what 1 rank trains, through the real learner process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import start_role
from tests.test_resume import GROUPS, SETTINGS, STEPS, feed

pytestmark = pytest.mark.slow


def train(run_dir, endpoints, *extra):
    run_dir.mkdir()
    broker = start_role("broker", run_dir, endpoints, *SETTINGS)
    learner = None
    try:
        feed(endpoints["broker"], range(GROUPS))
        learner = start_role("learner", run_dir, endpoints, *SETTINGS, "train.lr=0.001", *extra)
        assert learner.wait(timeout=300) == 0, (run_dir / "learner.log").read_text()[-3000:]
        assert broker.wait(timeout=60) == 0
    finally:
        for p in (broker, learner):
            if p is not None and p.poll() is None:
                p.kill()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


@pytest.mark.parametrize("micro", [["train.micro_batch_size=3"], ["train.micro_batch_tokens=30"]], ids=["padded", "packed"])
def test_two_ranks_match_one_rank(tmp_path, endpoints, micro):
    single, single_weights = train(tmp_path / "one", endpoints, *micro)
    double, double_weights = train(tmp_path / "two", endpoints, "learner.world_size=2", f"learner.master_port={29400 + len(micro[0])}", *micro)
    assert [r["step"] for r in double] == list(range(1, STEPS + 1))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["completion_tokens"] == a["completion_tokens"] and b["trained_samples"] == a["trained_samples"]
    assert set(single_weights) == set(double_weights)
    for name, tensor in single_weights.items():
        np.testing.assert_allclose(double_weights[name], tensor, atol=2e-5, rtol=0, err_msg=name)
    assert "started 2 FSDP ranks" in (tmp_path / "two" / "learner.log").read_text()

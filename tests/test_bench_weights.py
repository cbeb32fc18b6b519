"""bench/weights.py --quick runs and reports every transport on the same bytes (numbers belong in the reports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_weights_bench_quick_compares_every_transport_on_the_same_bytes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.weights", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "weights.json").read_text())["results"]
    assert [r["transport"] for r in rows] == ["gloo broadcast (baseline)", "shm", "tcp"]
    assert {r["params_m"] for r in rows} == {24} and len({r["bytes"] for r in rows}) == 1
    assert rows[0]["vs_baseline"] == 1.0 and all(r["gb_per_s"] > 0 and len(r["all_seconds"]) == 2 for r in rows)
    assert all(r["publish_seconds"] > 0 for r in rows[1:])
    assert "| 24M | 96 | tcp |" in result.stdout

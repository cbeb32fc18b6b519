"""bench/report.py: where a benchmark ran (machine, versions, commit) and where it writes."""

from __future__ import annotations

import subprocess

from bench.report import RESULTS, ROOT, environment, results_dir


def test_environment_names_the_machine_the_versions_and_the_commit():
    env = environment(gpu="H100")
    assert env["machine"]["gpu"] == "H100" and env["machine"]["cpus"] >= 1 and env["machine"]["cpu"]
    assert {"torch", "numpy", "pyzmq", "msgpack"} <= set(env["versions"]) and None not in env["versions"].values()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["commit"].removesuffix("+changes") == head


def test_a_quick_run_never_writes_over_the_measured_results(tmp_path):
    """`bench.run_all --quick`, suggested as a smoke run, overwrote bench/results with its tiny runs."""
    assert results_dir(None, quick=True) == RESULTS / "quick" and results_dir(None, quick=False) == RESULTS
    assert results_dir(tmp_path / "x", quick=True) == tmp_path / "x" and (tmp_path / "x").is_dir()

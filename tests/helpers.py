"""Sample and group builders, and role processes, shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from protocol.sample import Sample
from tests.conftest import ROOT


def make_sample(**overrides) -> Sample:
    """A valid sample (3 prompt tokens, 2 completion tokens); any field can be overridden."""
    fields = dict(
        prompt_ids=np.array([1, 2, 3], dtype=np.int32),
        completion_ids=np.array([4, 5], dtype=np.int32),
        behavior_logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        reward=1.0,
        group_id="g0",
        group_size=4,
        index=0,
        version_start=0,
        version_end=0,
        actor_id="a",
        incarnation="i0",
        seq=0,
        finish_reason="stop",
        metadata={},
    )
    fields.update(overrides)
    return Sample(**fields)


def make_groups(model, num_groups: int = 2, n: int = 4, length: int = 6, seed: int = 0):
    """Samples drawn from the model itself, rewarded by whether their first token is even."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        prompt = torch.randint(0, 1000, (5,), generator=gen)
        group = []
        for i in range(n):
            completion = torch.randint(0, 1000, (length,), generator=gen)
            ids = torch.cat([prompt, completion])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, 4:-1], -1).gather(-1, completion[:, None])[:, 0]
            group.append(Sample(
                prompt_ids=prompt.numpy().astype(np.int32), completion_ids=completion.numpy().astype(np.int32),
                behavior_logprobs=logp.numpy().astype(np.float32), reward=float(completion[0] % 2 == 0),
                group_id=f"g{g}", group_size=n, index=i, version_start=0, version_end=0,
                actor_id="a", incarnation="x", seq=g * n + i, metadata={"correct": bool(completion[0] % 2 == 0)},
            ))  # fmt: skip
        groups.append(group)
    return groups


def start_role(role: str, run_dir: Path, endpoints: dict[str, str], *extra: str, name: str = "") -> subprocess.Popen:
    """`launch.py --role role` on configs/tiny.yaml (10 steps) with `extra` arguments; output in <run_dir>/<name or role>.log."""
    log = (run_dir / f"{name or role}.log").open("ab")
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", role, "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoints['broker']}", f"endpoints.weights={endpoints['weights']}",
        "train.steps=10", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(run_dir)})


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)

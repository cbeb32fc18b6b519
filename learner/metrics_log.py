"""Where the learner's per-step metrics go: run.dir/metrics.jsonl, and TensorBoard when asked.

The JSON lines are the record (plots, the live bar and tests read them); TensorBoard
gets the same numbers as scalars `train/<name>` against the step, so a user's usual
`tensorboard --logdir RUN_DIR/tensorboard` shows the run live.

A learner resumed at step N trains the steps after N again (checkpoints may be sparser
than steps), so the rows it logged past N before it stopped move to
metrics.superseded.jsonl and TensorBoard hides its events past N: each step has one row,
and `time` (seconds of training) goes on from step N's instead of starting at 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int = 0) -> None:
        self.elapsed_before = _keep_rows_up_to(run_dir / "metrics.jsonl", resume_step)
        self.file = (run_dir / "metrics.jsonl").open("ab")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(orjson.dumps(row) + b"\n")
        self.file.flush()
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keep_rows_up_to(path: Path, step: int) -> float:
    """Move the rows of steps after `step` (and a line cut short by a crash) to metrics.superseded.jsonl;
    returns the `time` of the last row kept (0 if none)."""
    if not path.exists():
        return 0.0
    kept, superseded, elapsed = [], [], 0.0
    for line in path.read_bytes().splitlines():
        line += b"\n"
        try:
            row = orjson.loads(line)
            later = row["step"] > step
        except (orjson.JSONDecodeError, KeyError, TypeError):
            later = True
        if later:
            superseded.append(line)
        else:
            kept.append(line)
            elapsed = max(elapsed, float(row.get("time", 0.0)))
    if superseded:
        with path.with_name("metrics.superseded.jsonl").open("ab") as out:
            out.writelines(superseded)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return elapsed

"""Where the learner's per-step metrics go: run.dir/metrics.jsonl, and TensorBoard when asked.

The JSON lines are the record (plots, the live bar and tests read them); TensorBoard
gets the same numbers as scalars `train/<name>` against the step, so a user's usual
`tensorboard --logdir RUN_DIR/tensorboard` shows the run live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.file = (run_dir / "metrics.jsonl").open("ab")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

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

"""Files: what the broker's log and the learner's checkpoints need from the disk, and JSON-lines records
whose last line a crash or a full disk may have cut short."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson

_STEP_DIR = re.compile(r"step_(\d+)")  # the learner's checkpoint folders (complete ones only: step_N.tmp never matches)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes renames and new names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[Any]:
    """The complete JSON lines of `path` (none if it does not exist); a line cut short is passed over."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: Any) -> None:
    """Append `row` as a JSON line, on a line of its own even after a line cut short."""
    with path.open("a+b") as out:
        end = out.seek(0, os.SEEK_END)
        cut = end > 0 and os.pread(out.fileno(), 1, end - 1) != b"\n"  # the last byte only
        out.write((b"\n" if cut else b"") + orjson.dumps(row) + b"\n")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run (`run_dir/checkpoints/step_N`), as (step, folder), by step."""
    return sorted((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*") if (m := _STEP_DIR.fullmatch(p.name)))

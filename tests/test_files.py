"""fsync_path: files and directories alike, and no descriptor left open."""

from __future__ import annotations

import os

import pytest

from protocol.files import append_row, fsync_path, read_rows


def test_a_file_and_a_directory_are_fsynced_by_path_and_closed(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    (tmp_path / "f").write_bytes(b"x")
    before = len(os.listdir("/proc/self/fd"))
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    assert synced == [str(tmp_path / "f"), str(tmp_path)] and len(os.listdir("/proc/self/fd")) == before


def test_a_missing_path_is_an_error_not_a_silent_no_op(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


def test_a_row_cut_short_is_passed_over_and_the_next_one_starts_a_line_of_its_own(tmp_path):
    """The eval watcher read its rows strictly: one cut short by a crash or a full disk stopped every later start."""
    path = tmp_path / "rows.jsonl"
    assert read_rows(path) == []
    append_row(path, {"step": 1})
    with path.open("ab") as out:
        out.write(b'{"step": 2, "pa')
    append_row(path, {"step": 3})
    assert read_rows(path) == [{"step": 1}, {"step": 3}]
    assert path.read_bytes().splitlines()[-1] == b'{"step":3}'

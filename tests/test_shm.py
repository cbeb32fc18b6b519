"""Shared-memory segments: nothing is left in /dev/shm, even when creating one fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

import protocol.shm
from protocol.errors import WeightTransferError
from protocol.shm import PREFIX, SHM_DIR, Mapping, Segment, remove_orphans, shm_available
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")


def ours() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{PREFIX}{os.getpid()}-*")}


def test_a_segment_the_memory_cannot_hold_leaves_no_file():
    """Found by a helper's hunt: the file was registered for cleanup only after allocating it, so a small
    /dev/shm (Docker's 64 MB) refusing a large model left it behind."""
    before = ours()
    with pytest.raises(OSError):
        Segment(shutil.disk_usage(SHM_DIR).total + (1 << 30))
    assert ours() == before


def test_a_segment_is_written_through_and_unlinked():
    segment = Segment(4096)
    assert segment.name in ours() and os.path.getsize(SHM_DIR / segment.name) == 4096
    segment.map[:5] = b"hello"
    assert (SHM_DIR / segment.name).read_bytes()[:5] == b"hello"
    segment.unlink()
    segment.unlink()  # twice is harmless
    assert segment.name not in ours()


@pytest.mark.parametrize("name", ["other-name", f"{PREFIX}a/b", f"{PREFIX}a\0b"])
def test_a_segment_name_that_is_not_ours_is_a_bad_manifest(name):
    with pytest.raises(WeightTransferError) as err:  # a NUL byte made os.open raise ValueError, which stopped the actor
        Mapping(name, 16)
    assert err.value.reason == "bad_manifest"


SENDER = """
import sys
from pathlib import Path
import protocol.shm
protocol.shm.SHM_DIR = Path(sys.argv[1])
segment = protocol.shm.Segment(1 << 20)
print(segment.name, flush=True)
input()
"""


def test_segments_of_a_sender_killed_with_its_process_group_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """`kill -9 -PGID` (or `scancel --signal=KILL`) kills the resource tracker with the sender, and its segments,
    each the model's size, stayed in /dev/shm (memory) until the machine rebooted. A segment's lock, which the
    kernel drops when its sender dies, tells them apart from a live sender's (in a folder of its own here:
    another suite's learner on this machine must not see these)."""
    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    name = sender.stdout.readline().strip()
    live = Segment(4096)  # a live sender's: locked, it stays
    assert remove_orphans() == 0  # the other sender is alive too
    os.killpg(sender.pid, signal.SIGKILL)
    sender.wait()
    assert (tmp_path / name).exists()  # its tracker died with it
    (tmp_path / f"{PREFIX}folder").mkdir()  # names anyone may make in /dev/shm: only unlocked files go
    (tmp_path / f"{PREFIX}\u00b2-link").symlink_to(tmp_path / live.name)
    assert remove_orphans() == 1 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, f"{PREFIX}folder", f"{PREFIX}\u00b2-link"])
    live.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{PREFIX}folder", f"{PREFIX}\u00b2-link"])


def test_a_segment_a_starting_sender_removed_before_its_lock_is_made_again(tmp_path, monkeypatch):
    """The window between creating a segment's file and locking it: another learner starting then takes the
    unlocked file for an orphan. The new segment must not be left mapping a file no reader can open."""
    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    real_flock, removed = protocol.shm.fcntl.flock, []

    def flock_after_a_cleaner(fd, operation):
        if operation == protocol.shm.fcntl.LOCK_EX and not removed:  # the sender's first lock: a cleaner comes first
            removed.append(remove_orphans())
        return real_flock(fd, operation)

    monkeypatch.setattr(protocol.shm.fcntl, "flock", flock_after_a_cleaner)
    segment = Segment(4096)
    assert removed == [0] and [p.name for p in tmp_path.iterdir()] == [segment.name]
    segment.unlink()


READER = """
import sys
from pathlib import Path
import protocol.shm
protocol.shm.SHM_DIR = Path(sys.argv[1])
mapping = protocol.shm.Mapping(sys.argv[2], 4096)
print(mapping.lease(), flush=True)
input()
"""


def test_a_lease_keeps_the_writer_out_until_released_or_its_reader_dies(tmp_path, monkeypatch):
    """The writer's claim and a reader's lease exclude each other; the kernel drops a killed reader's lease.
    (In a folder of its own: `remove_orphans` of another suite's learner must not see it.)"""
    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    segment = Segment(4096)
    reader = Mapping(segment.name, 4096)
    try:
        assert segment.claim()
        assert not reader.lease()  # being written
        segment.unclaim()
        assert reader.lease() and reader.lease()  # leasing twice is harmless
        assert not segment.claim()
        reader.release()
        assert segment.claim()
        segment.unclaim()
        other = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), segment.name], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert other.stdout.readline().strip() == "True"
        assert not segment.claim()
        other.kill()
        other.wait()
        assert segment.claim()
    finally:
        reader.close()
        segment.unlink()


def test_closing_a_mapping_drops_its_lease_though_tensors_still_view_it(tmp_path, monkeypatch):
    """mmap keeps a duplicate of the descriptor, which shares the lock: only the explicit release drops it."""
    from protocol.buckets import as_bytes

    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    segment = Segment(4096)
    reader = Mapping(segment.name, 4096)
    view = as_bytes(reader.map)
    try:
        assert reader.lease()
        reader.close()
        assert segment.claim()
        segment.map[:3] = b"new"
        assert bytes(view[:3].numpy()) == b"new"  # the mapping lives on with its views
    finally:
        segment.unlink()


def test_a_system_without_ofd_locks_is_shm_unavailable_not_a_crash(tmp_path, monkeypatch):
    """Found by a review: EINVAL (Linux before 3.15, some sandboxes) came out of a lease as a bare OSError, which
    the actor does not catch; as `shm_unavailable` its weight client falls back to streams."""
    import errno

    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    segment = Segment(4096)
    reader = Mapping(segment.name, 4096)

    def no_ofd_locks(fd, command, arg):
        raise OSError(errno.EINVAL, "Invalid argument")

    try:
        monkeypatch.setattr(protocol.shm.fcntl, "fcntl", no_ofd_locks)
        for lock in (reader.lease, segment.claim):
            with pytest.raises(WeightTransferError) as err:
                lock()
            assert err.value.reason == "shm_unavailable"
        reader.close()  # dropping a lock that could not be taken is no error: the reader and learner go on with streams
        segment.unlink()
        assert not (tmp_path / segment.name).exists()
    finally:
        monkeypatch.undo()

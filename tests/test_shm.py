"""Shared-memory segments: nothing is left in /dev/shm, even when creating one fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from protocol.errors import WeightTransferError
from protocol.shm import PREFIX, SHM_DIR, Segment, attach, remove_orphans, segment_prefix, shm_available
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")


def ours() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{segment_prefix(os.getpid())}*")}


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
        attach(name, 16)
    assert err.value.reason == "bad_manifest"


def test_segments_of_a_sender_killed_with_its_process_group_are_removed_by_the_next_one():
    """`kill -9 -PGID` (or `scancel --signal=KILL`) kills the resource tracker with the sender, and its segments,
    each the model's size, stayed in /dev/shm (memory) until the machine rebooted."""
    sender = subprocess.Popen([sys.executable, "-c", "from protocol.shm import Segment; s = Segment(1 << 20); print(s.name, flush=True); input()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    name = sender.stdout.readline().strip()
    os.killpg(sender.pid, signal.SIGKILL)
    sender.wait()
    assert (SHM_DIR / name).exists()  # its tracker died with it
    live = Segment(4096)  # ours: alive, it stays
    strangers = [SHM_DIR / f"{PREFIX}1-{sender.pid}-0", SHM_DIR / f"{PREFIX}{name.split('-')[2]}-x-0"]  # another namespace; not a pid
    for path in strangers:
        path.write_bytes(b"x")
    try:
        assert remove_orphans() >= 1 << 20
        assert not (SHM_DIR / name).exists() and (SHM_DIR / live.name).exists() and all(p.exists() for p in strangers)
    finally:
        live.unlink()
        for path in strangers:
            path.unlink(missing_ok=True)

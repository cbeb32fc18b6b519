"""Shared-memory segments: nothing is left in /dev/shm, even when creating one fails."""

from __future__ import annotations

import os
import shutil

import pytest

from protocol.errors import WeightTransferError
from protocol.shm import PREFIX, SHM_DIR, Segment, attach, shm_available

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
        attach(name, 16)
    assert err.value.reason == "bad_manifest"

"""Same-host weight segments in POSIX shared memory (/dev/shm).

The sender (learner/weights.py) writes versions into two segments in turn and readers
verify what they copy out, so a copy torn by a later rewrite fails its checksum. Each
segment is registered with multiprocessing's resource tracker as soon as its file
exists, so it is unlinked even if the sender is killed with -9 (or fails) while the
segment is still being allocated. Killing the sender's whole process group kills the
tracker too (`kill -9 -PGID`, `scancel --signal=KILL`), and then the files stay until the
next sender on the host starts: it removes the segments no live sender holds a lock on
(`remove_orphans`), whichever container or pid namespace made them.

We map the files with `mmap` rather than `multiprocessing.shared_memory.SharedMemory`
because the latter refuses to close while tensors still view it; an `mmap` lives
exactly as long as the last tensor that uses it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import socket
import stat
from multiprocessing import resource_tracker
from pathlib import Path

from protocol.errors import WeightTransferError

SHM_DIR = Path("/dev/shm")
PREFIX = "streamrl-w-"


def host_id() -> str:
    """Same value for every process on this machine (and boot), so a peer can tell it may share memory."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def remove_orphans() -> int:
    """Unlink the segments no live sender holds (see `Segment`); returns the bytes freed.

    A sender holds an exclusive lock on each of its segments for as long as it lives, so a
    segment whose lock we can take is an orphan, whatever pid namespace its sender had. Files
    we may not open (another user's) and anything but a regular file stay. A reader that still
    maps a removed segment keeps its mapping."""
    freed = 0
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its sender lives
            if os.stat(path, follow_symlinks=False).st_ino == info.st_ino:  # still the file we locked
                path.unlink()
                freed += info.st_size
        except OSError:
            continue
        finally:
            os.close(fd)
    return freed


class Segment:
    """A sender-owned segment of `size` bytes, writable, unlinked by `unlink()` (or the tracker on a crash).

    Its file stays open with an exclusive lock until `unlink()`: the kernel drops the lock when
    the sender dies, however it dies, and `remove_orphans` takes only unlocked segments. A lock
    taken after `remove_orphans` had already locked the new file finds the name gone, and the
    segment is made again under a new name.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        while True:
            self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            fd = os.open(SHM_DIR / self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.stat(SHM_DIR / self.name).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:  # a starting sender took it for an orphan before we locked it
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self._fd = fd
        resource_tracker.register(f"/{self.name}", "shared_memory")
        self._linked = True
        try:
            os.ftruncate(fd, max(size, 1))
            os.posix_fallocate(fd, 0, max(size, 1))  # allocate and map every page up front, not a fault per page
            self.map = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:  # e.g. ENOSPC from a small /dev/shm: leave no file behind
            self.unlink()
            raise

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            (SHM_DIR / self.name).unlink(missing_ok=True)
            resource_tracker.unregister(f"/{self.name}", "shared_memory")
            os.close(self._fd)


def attach(name: str, size: int) -> mmap.mmap:
    """Map a published segment read-only; a name that is gone (superseded, sender died) is `shm_unavailable`."""
    if not name.startswith(PREFIX) or "/" in name or "\0" in name:
        raise WeightTransferError("bad_manifest", f"segment name {name!r} is not ours")
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY)
    except OSError as exc:
        raise WeightTransferError("shm_unavailable", f"segment {name}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size < size:
            raise WeightTransferError("size", f"segment {name} is smaller than the manifest's {size} bytes")
        return mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)

"""Same-host weight segments in POSIX shared memory (/dev/shm).

The sender (learner/weights.py) writes versions into segments it reuses, and readers
verify each version in place and hand out views of it, without a copy. A reader holds a
lease on the segment until it has loaded the weights (`Mapping.lease`), and the sender
writes only into a segment it can claim, which no lease allows (`Segment.claim`); a reader
that maps a segment the sender rewrote before the lease finds it fails its checksums. Both
are OFD locks on the segment's first byte: the kernel drops a dead reader's lease, and they
are separate from the `flock` below. Each
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
import struct
from multiprocessing import resource_tracker
from pathlib import Path

from protocol.errors import WeightTransferError

SHM_DIR = Path("/dev/shm")
PREFIX = "streamrl-w-"
_FLOCK = "hhqqi4x"  # Linux's struct flock: type, whence, start, length, pid (0 for OFD locks), padding


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

    def claim(self) -> bool:
        """Take the writer's lock, before writing a version here; False while a reader leases the segment.
        Released by `unclaim` once the version is written, so that readers may lease it."""
        return _lock_first_byte(self._fd, fcntl.F_WRLCK)

    def unclaim(self) -> None:
        if self._linked:
            _lock_first_byte(self._fd, fcntl.F_UNLCK)

    def unlink(self) -> None:
        if self._linked:
            self.unclaim()  # the map's duplicate of the descriptor would keep the claim
            self._linked = False
            (SHM_DIR / self.name).unlink(missing_ok=True)
            resource_tracker.unregister(f"/{self.name}", "shared_memory")
            os.close(self._fd)


class Mapping:
    """A reader's read-only mapping of a published segment, and its lease on it."""

    def __init__(self, name: str, size: int) -> None:
        """Map segment `name`; a name that is gone (superseded, sender died) is `shm_unavailable`."""
        if not name.startswith(PREFIX) or "/" in name or "\0" in name:
            raise WeightTransferError("bad_manifest", f"segment name {name!r} is not ours")
        try:
            self._fd = os.open(SHM_DIR / name, os.O_RDONLY)
        except OSError as exc:
            raise WeightTransferError("shm_unavailable", f"segment {name}: {exc.strerror}") from None
        try:
            if os.fstat(self._fd).st_size < size:
                raise WeightTransferError("size", f"segment {name} is smaller than the manifest's {size} bytes")
            self.map = mmap.mmap(self._fd, max(size, 1), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        except BaseException:
            os.close(self._fd)
            raise
        self.name = name

    def lease(self) -> bool:
        """Keep the sender from writing here until `release`; False while it is writing a version here."""
        return _lock_first_byte(self._fd, fcntl.F_RDLCK)

    def release(self) -> None:
        if self._fd >= 0:
            _lock_first_byte(self._fd, fcntl.F_UNLCK)

    @property
    def unlinked(self) -> bool:
        """The sender gave the segment up: once its views are gone, nothing else will read it."""
        return os.fstat(self._fd).st_nlink == 0

    def close(self) -> None:
        """Drop the lease for good; the mapping itself lives as long as the tensors that view it (and with it
        a duplicate of our descriptor, which would keep the lease: hence the explicit release)."""
        if self._fd >= 0:
            self.release()
            os.close(self._fd)
            self._fd = -1


def _lock_first_byte(fd: int, kind: int) -> bool:
    """Set (F_RDLCK, F_WRLCK) or drop (F_UNLCK) an OFD lock on byte 0 without waiting; False if another holder conflicts.

    Any other failure (no OFD locks: Linux before 3.15, some sandboxes) is `shm_unavailable`, except for
    F_UNLCK: where no lock can be taken there is none to drop."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 1, 0))
    except (BlockingIOError, PermissionError):  # EAGAIN, or EACCES on some systems: held by another
        return False
    except OSError as exc:
        if kind == fcntl.F_UNLCK:
            return True
        raise WeightTransferError("shm_unavailable", f"cannot lock a weight segment: {exc.strerror}") from None
    return True

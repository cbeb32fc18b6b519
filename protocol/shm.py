"""Same-host weight segments in POSIX shared memory (/dev/shm).

The sender (learner/weights.py) writes versions into two segments in turn and readers
verify what they copy out, so a copy torn by a later rewrite fails its checksum. Each
segment is registered with multiprocessing's resource tracker as soon as its file
exists, so it is unlinked even if the sender is killed with -9 (or fails) while the
segment is still being allocated. Killing the sender's whole process group kills the
tracker too (`kill -9 -PGID`, `scancel --signal=KILL`), and then the files stay until the
next sender on the host starts: it removes the segments of dead senders (`remove_orphans`).
A segment's name holds its sender's pid and pid namespace, so that a sender never takes a
live process of another container sharing /dev/shm for a dead one of its own.

We map the files with `mmap` rather than `multiprocessing.shared_memory.SharedMemory`
because the latter refuses to close while tensors still view it; an `mmap` lives
exactly as long as the last tensor that uses it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
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


def segment_prefix(pid: int) -> str:
    """The start of the names of the segments that process `pid` (of our pid namespace) creates."""
    return f"{PREFIX}{_pid_namespace()}-{pid}-"


def remove_orphans() -> int:
    """Unlink the segments whose sender, a process of our pid namespace, is gone; returns the bytes freed.

    A live sender's segments stay, as do those of other pid namespaces (their pids mean other processes)
    and names of another form. A reader that still maps a removed segment keeps its mapping."""
    namespace = _pid_namespace()
    if not namespace:
        return 0
    freed = 0
    for path in SHM_DIR.glob(f"{PREFIX}{namespace}-*"):
        pid = path.name.removeprefix(f"{PREFIX}{namespace}-").partition("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another sender starting at the same time removed it
            continue
        freed += size
    return freed


def _pid_namespace() -> str:
    """The inode of our pid namespace ('' where /proc cannot say): containers sharing /dev/shm have their own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Segment:
    """A sender-owned segment of `size` bytes, writable, unlinked by `unlink()` (or the tracker on a crash)."""

    def __init__(self, size: int) -> None:
        self.name = f"{segment_prefix(os.getpid())}{secrets.token_hex(8)}"
        self.size = size
        fd = os.open(SHM_DIR / self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        resource_tracker.register(f"/{self.name}", "shared_memory")
        self._linked = True
        try:
            os.ftruncate(fd, max(size, 1))
            os.posix_fallocate(fd, 0, max(size, 1))  # allocate and map every page up front, not a fault per page
            self.map = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:  # e.g. ENOSPC from a small /dev/shm: leave no file behind
            self.unlink()
            raise
        finally:
            os.close(fd)

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            (SHM_DIR / self.name).unlink(missing_ok=True)
            resource_tracker.unregister(f"/{self.name}", "shared_memory")


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

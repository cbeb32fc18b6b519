"""Child processes that end with their parent: a role, an FSDP rank or a reward child left
running after its parent was killed would hold its port, its GPU or a core for good."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

log = logging.getLogger("streamrl")
PR_SET_PDEATHSIG = 1
PARENT_ENV = "STREAMRL_DIE_WITH_PARENT"  # set by a supervisor to its pid: the child then dies with it
ORPHAN_GRACE_S = 20  # how long a role whose supervisor was killed may take to stop cleanly
ORPHAN_POLL_S = 0.5


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: get `sig` when the process (strictly, the thread) that started us dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        log.warning("cannot ask to die with the parent process; killing it may leave this one behind")


def follow_supervisor() -> bool:
    """In a child of `launch.py --role all` (`PARENT_ENV` names its pid): stop with SIGTERM when it dies,
    and end within `ORPHAN_GRACE_S` of that however the SIGTERM is handled.

    Returns False if it is gone already (it died before the request could be made), so the
    caller should not start at all.
    """
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return True
    for sig in (signal.SIGTERM, signal.SIGALRM):  # an inherited ignore would drop the kernel's signal
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != int(parent):
        return False
    threading.Thread(target=_end_in_time_when_orphaned, args=(int(parent),), name="orphan-watch", daemon=True).start()
    return True


def _end_in_time_when_orphaned(parent: int) -> None:
    """Once the supervisor is gone (killed, so nobody will escalate to SIGKILL after its grace period),
    have the kernel end this process in `ORPHAN_GRACE_S` unless it stops first.

    A thread of its own, and SIGALRM's default action, because the main thread may not get to any
    Python signal handler in time: in CI an actor or learner still starting outlived a killed
    supervisor by over a minute.
    """
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    signal.alarm(ORPHAN_GRACE_S)


def raise_interrupt(signum: int, _frame: object) -> None:
    """A signal handler that stops the main thread wherever it is, as Ctrl-C does (for code with no loop
    that could check a stop flag, such as vLLM generating a whole eval)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)

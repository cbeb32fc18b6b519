"""Child processes that end with their parent: a role, an FSDP rank or a reward child left
running after its parent was killed would hold its port, its GPU or a core for good."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger("streamrl")
PR_SET_PDEATHSIG = 1
PARENT_ENV = "STREAMRL_DIE_WITH_PARENT"  # set by a supervisor to its pid: the child then dies with it
ORPHAN_GRACE_S = 20  # how long a role whose supervisor was killed may take to stop cleanly


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: get `sig` when the process (strictly, the thread) that started us dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        log.warning("cannot ask to die with the parent process; killing it may leave this one behind")


def follow_supervisor() -> bool:
    """In a child of `launch.py --role all` (`PARENT_ENV` names its pid): stop with SIGTERM when it dies.

    Returns False if it is gone already (it died before the request could be made), so the
    caller should not start at all.
    """
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return True
    die_with_parent(signal.SIGTERM)
    return os.getppid() == int(parent)


def orphaned() -> bool:
    """True in a child of `launch.py --role all` whose supervisor has died."""
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and os.getppid() != int(parent)


def end_in_time_if_orphaned() -> None:
    """Called on a stop request: if the supervisor is gone (it was killed, so nobody will escalate to
    SIGKILL after its grace period), the kernel ends this process in `ORPHAN_GRACE_S` unless it stops first.

    SIGALRM's default action needs no Python code to run, so a role stuck in a long call (an actor
    still loading vLLM on a busy machine took over a minute) ends all the same.
    """
    if orphaned():
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(ORPHAN_GRACE_S)


def raise_interrupt(signum: int, _frame: object) -> None:
    """A signal handler that stops the main thread wherever it is, as Ctrl-C does (for code with no loop
    that could check a stop flag, such as vLLM generating a whole eval)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)

"""A role started by `launch.py --role all` stops, within a deadline, when its supervisor is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT
from tests.helpers import wait_for
from tests.test_supervisor import gone

STUCK_ROLE = """
import signal, time
import launch
from protocol import lifetime
lifetime.ORPHAN_GRACE_S = 4
assert lifetime.follow_supervisor()
{handler}
print("ready", flush=True)
while True:
    time.sleep(1)  # never looks at the stop flag, like an actor still loading vLLM
"""
HANDLERS = {
    "the role's": "launch.stop_on_signals()",
    "a library's that does nothing": "signal.signal(signal.SIGTERM, lambda *_: None)",
}
SUPERVISOR = """
import os, subprocess, sys, time
env = {**os.environ, "STREAMRL_DIE_WITH_PARENT": str(os.getpid())}
role = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, cwd=sys.argv[2])
print(role.pid, flush=True)
time.sleep(600)
"""


def start_stuck_role(handler: str = HANDLERS["the role's"], **popen) -> tuple[subprocess.Popen, int]:
    """A stand-in supervisor and its role; returns the supervisor and the role's pid once it handles signals."""
    code = STUCK_ROLE.format(handler=handler)
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, code, str(ROOT)], stdout=subprocess.PIPE, text=True, **popen)
    role = int(supervisor.stdout.readline())
    assert supervisor.stdout.readline().strip() == "ready"
    return supervisor, role


@pytest.mark.parametrize("handler", HANDLERS.values(), ids=HANDLERS.keys())
def test_a_role_whose_supervisor_was_killed_ends_within_the_grace_period(handler):
    """Found in CI: with the supervisor killed by SIGKILL, nothing enforced the grace period its own stop gives,
    and a role still starting ran on for over a minute. The deadline holds whatever handles SIGTERM."""
    supervisor, role = start_stuck_role(handler)
    try:
        supervisor.kill()
        supervisor.wait()
        time.sleep(1)
        assert not gone(role)  # asked to stop (SIGTERM from the kernel), and given its grace period
        wait_for(lambda: gone(role), 12, "the orphaned role to end")
    finally:
        if not gone(role):
            psutil.Process(role).kill()


def test_a_role_asked_to_stop_by_a_live_supervisor_gets_no_deadline_of_its_own():
    """The live supervisor enforces its own grace period (scripts/supervisor.py stop_all)."""
    supervisor, role = start_stuck_role()
    try:
        psutil.Process(role).send_signal(signal.SIGTERM)
        time.sleep(6)
        assert not gone(role)
    finally:
        psutil.Process(role).kill()
        supervisor.kill()
        supervisor.wait()


def test_a_role_that_inherited_sigterm_ignored_still_dies_with_its_supervisor():
    """An ignored SIGTERM (inherited through exec) would drop the kernel's signal while the role is starting."""
    supervisor, role = start_stuck_role("", preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    try:
        supervisor.kill()
        supervisor.wait()
        wait_for(lambda: gone(role), 2, "the role to end at the kernel's SIGTERM")
    finally:
        if not gone(role):
            psutil.Process(role).kill()

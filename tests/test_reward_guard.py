"""The reward guard: a reward that raises, hangs or kills its process is a named, counted RewardFailed; the caller lives on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from actors.reward_guard import GuardedReward, RewardFailed
from protocol.config import load_config
from protocol.errors import TaskError
from tests.conftest import ROOT
from tests.helpers import wait_for

PLUGIN = """
import os, time

def moody(completion, answer):
    if completion == "raise":
        raise ZeroDivisionError("bad luck")
    if completion == "hang":
        time.sleep(60)
    if completion == "exit":
        os._exit(3)
    return (1.0, True) if completion == answer else (0.0, False)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "moody_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "moody_rewards:moody"


def guard(function: str, *overrides: str) -> GuardedReward:
    return GuardedReward(load_config(None, [f"task.reward.function={function}", *overrides]).task)


def test_raise_timeout_and_crash_are_named_and_counted(plugin, caplog):
    reward = guard(plugin, "task.reward.timeout_s=1.0")
    try:
        assert reward("7", "7") == (1.0, True)
        with pytest.raises(RewardFailed, match="error: ZeroDivisionError: bad luck"):
            reward("raise", "7")
        assert reward("8", "8") == (1.0, True)  # same child, still serving
        started = time.monotonic()
        with pytest.raises(RewardFailed, match="timeout: no result within 1 s") as hung:
            reward("hang", "7")
        assert hung.value.kind == "timeout" and time.monotonic() - started < 5
        assert reward("9", "9") == (1.0, True)  # a fresh child replaced the hung one
        with pytest.raises(RewardFailed, match="the reward process died"):
            reward("exit", "7")
        assert reward("6", "6") == (1.0, True)
        assert reward.failures == {"error": 2, "timeout": 1} and reward.calls == 7
    finally:
        reward.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "reward"]
    assert any("ZeroDivisionError: bad luck" in m for m in messages)
    assert any("(timeout): no result within 1 s" in m for m in messages)
    assert messages[-1].endswith("[2 error, 1 timeout of 6 calls so far]")


def test_a_child_killed_between_calls_is_replaced(plugin):
    reward = guard(plugin)
    try:
        assert reward("1", "1") == (1.0, True)
        reward.process.kill()
        reward.process.join(5)
        with pytest.raises(RewardFailed, match="died"):  # the call that finds it dead fails ...
            reward("2", "2")
        assert reward("3", "3") == (1.0, True)  # ... and the next one has a new child
        assert reward.failures == {"error": 1}
    finally:
        reward.close()


def test_math_verify_through_the_guard():
    reward = guard("math_verify", "task.reward.format_weight=0.1")
    try:
        assert reward("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5") == (1.1, True)
        assert reward("The answer is 0.5", "0.5") == (0.0, False)  # no \\boxed{}: no answer in the asked format
        assert reward.failures == {}
    finally:
        reward.close()


def test_bad_plugin_is_named_before_any_call():
    with pytest.raises(TaskError, match="cannot import nowhere_rewards"):
        guard("nowhere_rewards:fn")


def test_a_plugin_slow_to_import_is_given_the_starts_deadline_not_the_first_calls(tmp_path, monkeypatch):
    """Found by a helper's hunt: the child said "ready" before importing the plug-in, so an import slower than
    `timeout_s` timed out the first call, killed the child, and the next child did the same, for ever."""
    (tmp_path / "slow_rewards.py").write_text("import time\ntime.sleep(2.5)\ndef same(c, a):\n    return float(c == a), c == a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = guard("slow_rewards:same", "task.reward.timeout_s=1.0")
    try:
        assert reward("1", "1") == (1.0, True) and reward.failures == {}
    finally:
        reward.close()


def test_a_child_that_dies_while_starting_is_a_counted_reward_failure(tmp_path, monkeypatch):
    """Found by a helper's hunt: a bare EOFError escaped (the eval role died of it)."""
    (tmp_path / "doomed_rewards.py").write_text(
        "import multiprocessing, os\nif multiprocessing.current_process().name == 'reward':\n    os._exit(1)\n"
        "def same(c, a):\n    return float(c == a), c == a\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = guard("doomed_rewards:same")
    try:
        with pytest.raises(RewardFailed, match=r"died while starting \(exit code 1;"):  # not "did not start within 120 s"
            reward("1", "1")
        assert reward.failures == {"error": 1} and reward.process is None
    finally:
        reward.close()


def test_a_child_busy_with_a_hanging_reward_dies_with_its_parent(plugin, tmp_path):
    """Found by a helper's hunt: an actor killed while its reward hung left the child spinning for good."""
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from tests.test_reward_guard import guard\n"
        "reward = guard('moody_rewards:moody', 'task.reward.timeout_s=600')\n"
        "reward('1', '1'); print(reward.process.pid, flush=True)\n"
        "reward('hang', '1')\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1)  # in the hanging call
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, 10, "the child to die")
    finally:
        if psutil.pid_exists(child):
            psutil.Process(child).kill()

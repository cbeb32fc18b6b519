"""Run a reward function with a deadline per call, in a child process that can be killed.

math-verify (sympy) and user plug-ins can hang or raise on odd model output. A thread
cannot be stopped and math-verify's own `signal.alarm` timeouts only work on the main
thread, so every call goes to one spawned child over a pipe: an exception there, a
call past `timeout_s`, or a dead child is counted by kind, logged, and raised as
`RewardFailed` (the child is replaced). The actor then drops the group rather than
train on a made-up reward; the eval counts the reply as wrong. Neither ever dies of
its reward function.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter

from actors.math_rewards import BUILTINS, resolve_plugin, score
from protocol.config import TaskSection
from protocol.lifetime import die_with_parent

log = logging.getLogger("reward")
START_TIMEOUT_S = 120.0  # a cold child imports sympy and math-verify; on a loaded 2-core machine that can take a while


class RewardFailed(RuntimeError):
    """The reward could not be computed; `kind` is 'error' or 'timeout'."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class GuardedReward:
    """`guard(completion, gold) -> (reward, correct)` or RewardFailed; `failures` counts 'timeout' and 'error' calls."""

    def __init__(self, task: TaskSection) -> None:
        self.process: mp.process.BaseProcess | None = None
        self.conn = None
        self.args = (task.reward.function, task.answer_format, task.reward.format_weight)
        self.timeout_s = task.reward.timeout_s
        if task.reward.function not in BUILTINS:
            resolve_plugin(task.reward.function)  # a bad import path fails here, named, before any generation
        self.failures: Counter[str] = Counter()
        self.calls = 0

    def __call__(self, completion: str, gold: str) -> tuple[float, bool]:
        self.calls += 1
        if self.process is None and (why := self._start()) is not None:
            return self._fail("error", why, restart=True)
        try:
            self.conn.send((completion, gold))
            if not self.conn.poll(self.timeout_s):
                return self._fail("timeout", f"no result within {self.timeout_s:g} s", restart=True)
            status, value = self.conn.recv()
        except (EOFError, OSError) as err:  # the child died (between calls too: a broken pipe on send)
            return self._fail("error", f"the reward process died: {err!r}", restart=True)
        if status == "error":
            return self._fail("error", value, restart=False)
        return value

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(5)
            self.conn.close()
            self.process = self.conn = None

    def _start(self) -> str | None:
        """Start the child; why not, if it died or did not import its function within `START_TIMEOUT_S`."""
        ctx = mp.get_context("spawn")  # never fork a process that holds vLLM's threads
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.args), daemon=True, name="reward")
        self.process.start()
        child.close()
        self.conn = parent
        try:
            if not parent.poll(START_TIMEOUT_S):
                return f"the reward process did not start within {START_TIMEOUT_S:g} s"
            if parent.recv() == "ready":
                return None
        except (EOFError, OSError):  # it died starting (an import that raises or kills the interpreter, say)
            pass
        self.process.join(5)
        return f"the reward process died while starting (exit code {self.process.exitcode}; its traceback is in this log)"

    def _fail(self, kind: str, detail: str, restart: bool) -> tuple[float, bool]:
        self.failures[kind] += 1
        log.warning("reward %s failed (%s): %s [%s of %d calls so far]", self.args[0], kind, detail,
                    ", ".join(f"{n} {k}" for k, n in sorted(self.failures.items())), self.calls)  # fmt: skip
        if restart:
            self.close()
        raise RewardFailed(kind, detail)

    def __del__(self) -> None:
        self.close()


def _serve(conn, args: tuple[str, str, float]) -> None:
    """Child loop: score each (completion, gold) received; report exceptions instead of dying.

    Imports are paid before "ready", under the start's deadline, not the first call's: a plug-in
    importing torch or sympy on a loaded machine timed out its first call, and every call after
    it in the next child. The child dies with its parent (an actor killed while a reward hangs
    left it spinning for good)."""
    die_with_parent()
    function, answer_format, format_weight = args
    if function == "math_verify":
        import math_verify  # noqa: F401
    elif function not in BUILTINS:
        resolve_plugin(function)
    conn.send("ready")
    while True:
        try:
            completion, gold = conn.recv()
        except EOFError:
            return
        started = time.perf_counter()
        try:
            conn.send(("ok", score(function, completion, gold, answer_format, format_weight)))
        except Exception as err:  # a user plug-in may raise anything
            conn.send(("error", f"{type(err).__name__}: {err} (after {time.perf_counter() - started:.2f} s)"))

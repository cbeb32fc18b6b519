"""Rewards for question/answer tasks: find the reply's answer, compare it with the gold one.

`score` is what `task.reward` runs for every completion (inside the guarded child
process, see reward_guard.py): the built-ins `math_verify` and `exact`, or a user
plug-in named `package.module:callable`.

Plug-in interface: `fn(completion: str, answer: str) -> float | tuple[float, bool]`,
called with the decoded completion and the record's gold answer (a string). A bare
float counts as correct when it is at least 1.0. It may raise or hang: the guard
counts and logs both, and the actor drops that group (never a made-up reward).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable

from actors.datasets import last_boxed
from actors.rewards import last_number
from protocol.errors import TaskError

BUILTINS = ("math_verify", "exact")
RewardFn = Callable[[str, str], "float | tuple[float, bool]"]
_HASH = re.compile(r"####\s*([^\n]*)")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}")


def extract_answer(text: str, answer_format: str) -> str | None:
    """The answer the reply states in `answer_format` (boxed / hash / last_number), or None."""
    if answer_format == "boxed":
        return last_boxed(text)
    if answer_format == "hash":
        found = _HASH.findall(text)
        return found[-1].strip() if found and found[-1].strip() else None
    return last_number(text)


def math_verify_match(answer: str, gold: str) -> bool:
    """Symbolic equivalence by math-verify (e.g. \\frac{1}{2} == 0.5). Its own signal-based timeouts are
    off (they fail off the main thread); the caller bounds the time."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=None))


def normalise(text: str) -> str:
    """Strip what does not change an answer: $, \\text{}, spaces, thousands separators, a trailing dot."""
    text = _TEXT.sub(r"\1", text).replace("\\!", "").replace("\\$", "").replace("$", "")
    return re.sub(r"\s+|,", "", text).rstrip(".").lower()


def exact_match(answer: str, gold: str) -> bool:
    """Equal after `normalise`, or equal as numbers (so 18.0 == 18)."""
    a, g = normalise(answer), normalise(gold)
    if a == g:
        return True
    try:
        return float(a) == float(g)
    except ValueError:
        return False


def resolve_plugin(spec: str) -> RewardFn:
    """Import `package.module:callable`; TaskError names the spec and what failed."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task.reward.function {spec!r}: expected one of {BUILTINS} or 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way on import
        raise TaskError(f"task.reward.function {spec!r}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskError(f"task.reward.function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def score(function: str, completion: str, gold: str, answer_format: str, format_weight: float) -> tuple[float, bool]:
    """(reward, correct) of one completion; may raise or be slow (run it through the guard)."""
    if function not in BUILTINS:
        result = resolve_plugin(function)(completion, gold)
        reward, correct = result if isinstance(result, tuple) else (result, result >= 1.0)
        return float(reward), bool(correct)
    answer = extract_answer(completion, answer_format)
    if answer is None:
        return 0.0, False
    correct = (math_verify_match if function == "math_verify" else exact_match)(answer, gold)
    return float(correct) + format_weight, correct

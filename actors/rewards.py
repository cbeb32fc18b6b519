"""Reward functions: pure, fast, and total (they never raise on odd model output)."""

from __future__ import annotations

import re

import numpy as np

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BARE_NUMBER = re.compile(r"\s*-?\d+\s*")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_answer(text: str, answer: int, format_reward: float = 0.0) -> tuple[float, bool]:
    """1.0 if the last number in `text` equals `answer`, plus `format_reward` if the reply is only a number."""
    number = last_number(text)
    correct = number is not None and float(number) == answer
    bare = _BARE_NUMBER.fullmatch(text) is not None
    return float(correct) + (format_reward if bare else 0.0), correct


def token_range(completion_ids: np.ndarray, limit: int) -> tuple[float, bool]:
    """Fraction of completion tokens with id < `limit`; 'correct' when most of them are."""
    fraction = float(np.mean(np.asarray(completion_ids) < limit))
    return fraction, fraction > 0.5

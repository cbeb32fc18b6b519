"""Reward functions: pure, fast, and total (they never raise on odd model output)."""

from __future__ import annotations

import re

import numpy as np

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")  # 1,234 is one number; "3,4" is two
_BARE_NUMBER = re.compile(r"\s*-?\d+\s*")


def last_number(text: str) -> str | None:
    """The last number in `text`, thousands separators dropped ("1,234" is 1234; in "3,4" it is 4)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


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

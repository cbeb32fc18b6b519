"""Math rewards: answer extraction per format, math-verify equivalences, exact match, plug-in resolution."""

from __future__ import annotations

import pytest

from actors.math_rewards import exact_match, extract_answer, math_verify_match, resolve_plugin, score
from protocol.errors import TaskError


@pytest.mark.parametrize("text,fmt,answer", [
    ("so the answer is \\boxed{42}.", "boxed", "42"),
    ("\\boxed{1} no, \\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),
    ("the answer is 42", "boxed", None),
    ("6 * 7 = 42\n#### 42", "hash", "42"),
    ("#### 1\n#### 2,000 ", "hash", "2,000"),
    ("####", "hash", None),
    ("it is 41, no 42.", "last_number", "42"),
    ("nothing", "last_number", None),
])  # fmt: skip
def test_extract_answer(text, fmt, answer):
    assert extract_answer(text, fmt) == answer


@pytest.mark.parametrize("answer,gold,equal", [
    ("0.5", "\\frac{1}{2}", True),
    ("$\\boxed{3}$", "3", True),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("90", "90^\\circ", True),
    ("10080", "10,\\!080", True),
    ("\\frac43", "\\frac{4}{3}", True),
    ("0.4", "\\frac{1}{2}", False),
    ("x", "3", False),
    ("", "3", False),
])  # fmt: skip
def test_math_verify_equivalences(answer, gold, equal):
    assert math_verify_match(answer, gold) is equal


@pytest.mark.parametrize("answer,gold,equal", [
    ("18", "18", True), ("18.0", "18", True), ("$1,234", "1234", True), ("\\text{east}", "east", True),
    ("East.", "east", True), ("19", "18", False), ("1/2", "0.5", False),
])  # fmt: skip
def test_exact_match(answer, gold, equal):
    assert exact_match(answer, gold) is equal


def test_score_adds_the_format_weight_only_when_the_format_is_used():
    assert score("math_verify", "so \\boxed{0.5}", "\\frac12", "boxed", 0.1) == (1.1, True)
    assert score("math_verify", "so \\boxed{0.4}", "\\frac12", "boxed", 0.1) == (0.1, False)
    assert score("math_verify", "it is 0.5", "\\frac12", "boxed", 0.1) == (0.0, False)
    assert score("exact", "5 + 3 = 8\n#### 8", "8", "hash", 0.0) == (1.0, True)


def test_plugin_float_and_tuple_results(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def half(completion, answer):\n    return 0.5\n"
        "def full(completion, answer):\n    return 1\n"
        "def pair(completion, answer):\n    return (0.25, completion == answer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score("my_rewards:half", "x", "y", "boxed", 0.3) == (0.5, False)  # format weight is the plug-in's business
    assert score("my_rewards:full", "x", "y", "boxed", 0.0) == (1.0, True)
    assert score("my_rewards:pair", "y", "y", "boxed", 0.0) == (0.25, True)


def test_plugin_import_errors_are_named(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "ok_rewards.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match="'no_colon': expected one of"):
        resolve_plugin("no_colon")
    with pytest.raises(TaskError, match="cannot import missing_pkg.mod: ModuleNotFoundError"):
        resolve_plugin("missing_pkg.mod:fn")
    with pytest.raises(TaskError, match="cannot import broken_rewards: ModuleNotFoundError: No module named 'not_a_module_anywhere'"):
        resolve_plugin("broken_rewards:fn")
    with pytest.raises(TaskError, match="ok_rewards has no callable 'VALUE'"):
        resolve_plugin("ok_rewards:VALUE")

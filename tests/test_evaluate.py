"""The eval role: pass@k arithmetic, split selection, and an end-to-end run through launch.py with real vLLM."""

from __future__ import annotations

import itertools
import json
from math import comb

import orjson
import pytest

import launch
from actors.datasets import Record
from actors.evaluate import pass_at_k, select
from protocol.errors import TaskError


@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (10, 0, 3), (10, 10, 1), (20, 3, 1), (20, 3, 5), (8, 7, 2), (200, 13, 10)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample():
    n, c = 6, 2
    for k in range(1, n + 1):
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)


def test_select_splits_and_limit():
    records = [Record(f"q{i}", str(i), str(i)) for i in range(10)]
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(select(records, "heldout", 3, None)) == ["7", "8", "9"]
    assert ids(select(records, "train", 3, 2)) == ["0", "1"]
    assert ids(select(records, "all", 3, 4)) == ["0", "1", "2", "3"]
    with pytest.raises(TaskError, match="needs task.holdout > 0"):
        select(records, "heldout", 0, None)


PLUGIN = "def even(completion, answer):\n    return (1.0, True) if len(completion) % 2 == 0 else (0.0, False)\n"


@pytest.mark.slow
def test_eval_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "even_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "ipc"))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(6)))
    common = [f"run.dir={tmp_path / 'run'}", "model.path=builtin:tiny-random", "task.name=dataset", "task.dataset.source=jsonl",
              f"task.dataset.path={data}", "task.holdout=3"]  # fmt: skip
    args = ["--role", "eval", *common, "task.reward.function=even_rewards:even", "eval.split=heldout", "eval.limit=2",
            "eval.samples=4", "eval.k=[1,2,4]", "eval.max_tokens=6"]  # fmt: skip
    assert launch.main(args) == 0
    out = tmp_path / "run" / "eval"
    rows = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert [r["id"] for r in rows] == ["qa-3", "qa-4"] and [r["answer"] for r in rows] == ["6", "8"]
    assert all(r["greedy_correct"] == (len(r["greedy"]) % 2 == 0) and 0 < r["greedy_tokens"] <= 6 for r in rows)
    assert all(r["samples"] == 4 and 0 <= r["samples_correct"] <= 4 for r in rows)
    assert summary["problems"] == 2 and summary["split"] == "heldout" and summary["reward_failures"] == {}
    assert summary["pass@1_greedy"] == sum(r["greedy_correct"] for r in rows) / 2
    for k in (1, 2, 4):
        assert summary[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, r["samples_correct"], k) for r in rows) / 2)
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
    # greedy decoding is deterministic: a second run writes the same replies
    assert launch.main(args[:-3] + ["eval.samples=0", "eval.k=[1]", "eval.max_tokens=6"]) == 0
    again = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert [r["greedy"] for r in again] == [r["greedy"] for r in rows]
    # a task without answers is refused, named, before any generation
    assert launch.main(["--role", "eval", f"run.dir={tmp_path / 'run'}", "model.path=builtin:tiny-random", "task.name=token_range"]) == 2
    assert "eval needs a task with problems and answers" in capsys.readouterr().err

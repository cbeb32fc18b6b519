"""Tasks and rewards: seeded prompts in the chat template, exact answers, token-range scores."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from actors.rewards import exact_answer, last_number, token_range
from actors.tasks import make_task
from protocol.config import load_config


@pytest.mark.parametrize("text,answer,reward,correct", [
    ("15", 15, 1.2, True),               # bare number: answer + format reward
    (" 15 \n", 15, 1.2, True),
    ("The answer is 15.", 15, 1.0, True),
    ("10 + 5 = 15", 15, 1.0, True),      # the last number counts
    ("15 or maybe 16", 15, 0.0, False),
    ("1,234", 1234, 1.0, True),          # thousands separators are read; the comma breaks the bare format
    ("no idea", 15, 0.0, False),
    ("-3", -3, 1.2, True),
])  # fmt: skip
def test_exact_answer(text, answer, reward, correct):
    got_reward, got_correct = exact_answer(text, answer, format_reward=0.2)
    assert got_correct == correct
    assert got_reward == pytest.approx(reward)


def test_last_number():
    assert last_number("a 1.5 b 2") == "2" and last_number("x") is None
    assert last_number("she paid $1,234.50") == "1234.50" and last_number("-12,000,000 left") == "-12000000"
    assert last_number("the pairs 3,4") == "4" and last_number("1,2345") == "2345"


def test_token_range():
    reward, correct = token_range(np.array([1, 2, 3, 100], dtype=np.int32), limit=50)
    assert reward == 0.75 and correct
    assert token_range(np.array([60, 70], dtype=np.int32), limit=50) == (0.0, False)


def test_arithmetic_task_is_seeded_and_uses_the_chat_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = load_config(None, ["task.max_operand=9", "task.operation='*'"]).task
    first = make_task(config, tokenizer, seed=3).next_problem()
    again = make_task(config, tokenizer, seed=3).next_problem()
    assert first.prompt_ids == again.prompt_ids and first.answer == again.answer
    text = tokenizer.decode(first.prompt_ids)
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    a, b = (int(x) for x in text.split("What is ")[1].split("?")[0].split(" * "))
    assert first.answer == a * b and 1 <= a <= 9 and 1 <= b <= 9
    ids = np.asarray(tokenizer(str(first.answer), add_special_tokens=False)["input_ids"], dtype=np.int32)
    assert make_task(config, tokenizer, seed=3).score(first, ids) == (1.0, True)


def test_token_range_task_scores_by_vocabulary_fraction(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = make_task(load_config(None, ["task.name=token_range", "task.token_range_fraction=0.5"]).task, tokenizer, 0)
    problem = task.next_problem()
    half = len(tokenizer) // 2
    assert task.score(problem, np.array([0, half - 1, half, half + 1], dtype=np.int32)) == (0.5, False)


def test_dataset_task_orders_by_seed_skips_holdout_and_scores_with_the_guard(tiny_model_dir, tmp_path):
    import json

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(10)))
    config = load_config(None, ["task.name=dataset", "task.dataset.source=jsonl", f"task.dataset.path={path}",
                                "task.holdout=3", "task.template='Q: {question} Box it: \\boxed{}.'"]).task  # fmt: skip
    task, again, other = (make_task(config, tokenizer, seed) for seed in (5, 5, 6))
    try:
        problems = [task.next_problem() for _ in range(14)]  # two passes over the 7 training problems
        assert [p.prompt_ids for p in problems] == [again.next_problem().prompt_ids for _ in range(14)]
        assert [p.answer for p in problems] != [other.next_problem().answer for _ in range(14)]
        assert sorted(p.answer for p in problems[:7]) == sorted(p.answer for p in problems[7:]) == [str(i) for i in range(1, 8)]
        text = tokenizer.decode(problems[0].prompt_ids)
        assert f"Q: What is {int(problems[0].answer) - 1} + 1? Box it: \\boxed{{}}.<|im_end|>" in text
        reply = np.asarray(tokenizer(f"\\boxed{{{problems[0].answer}}}", add_special_tokens=False)["input_ids"], dtype=np.int32)
        assert task.score(problems[0], reply) == (1.0, True)
        assert task.score(problems[1], reply) == (0.0, False)
    finally:
        for t in (task, again, other):
            t.reward.close()

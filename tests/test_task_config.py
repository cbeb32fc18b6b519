"""The task, reward and eval config sections: defaults, named errors for what cannot work."""

from __future__ import annotations

import pytest

from protocol.config import load_config
from protocol.errors import ConfigError


def error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


def test_defaults():
    task = load_config(None, ["task.name=dataset"]).task
    assert task.dataset.source == "gsm8k" and task.answer_format == "boxed" and task.reward.function == "math_verify"
    assert task.template == "{question}\nPut your final answer within \\boxed{}."
    assert load_config(None).eval.samples == 0 and load_config(None).run.tensorboard is False


@pytest.mark.parametrize("override,message", [
    ("task.reward.functoin=exact", "task.reward.functoin: unknown key"),
    ("task.reasoning_gym.sise=5", "task.reasoning_gym.sise: unknown key"),
    ("task.dataset.source=hub", "task.dataset.source: Input should be 'jsonl', 'parquet', 'hf_disk', 'gsm8k', 'math500' or 'math'"),
    ("task.template=Solve it.", "task.template: Value error, the template must contain {question}"),
    ("task.answer_format=xml", "task.answer_format: Input should be 'boxed', 'hash' or 'last_number'"),
    ("task.reward.timeout_s=0", "task.reward.timeout_s: Input should be greater than 0"),
    ("task.name=gsm8k", "task.name: Input should be 'arithmetic', 'token_range', 'dataset' or 'reasoning_gym'"),
    ("task.dataset.path=/tmp", "task.dataset: Value error, task.dataset.path is not used by source gsm8k"),
    ("task.dataset.split=train", "task.dataset: Value error, task.dataset.split is not used by source gsm8k (only hf_disk and math)"),
    ("eval.split=test", "eval.split: Input should be 'all', 'heldout' or 'train'"),
])  # fmt: skip
def test_named_errors(override, message):
    assert message in error(override)


def test_k_must_fit_the_samples():
    assert "eval.k must lie in 1..eval.samples (4), got [1, 8]" in error("eval.samples=4", "eval.k=[1,8]")
    assert load_config(None, ["eval.samples=8", "eval.k=[1,8]"]).eval.k == [1, 8]

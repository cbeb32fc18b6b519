"""Learner on one GPU: our FSDP2 bf16 Trainer vs a plain HF bf16-autocast loop, tokens/s and MFU.

A randomly initialised Llama with Qwen2.5-0.5B's shape (24 layers, width 896,
GQA 14/2 heads, 151,936-token vocabulary, tied embeddings: 0.49B parameters)
trains on GRPO batches of random tokens (8 groups of 8, 256 prompt + 768
completion tokens each), micro-batches of 8 sequences, one GPU. Ours is
`Trainer.step` under `FSDPBackend` (fully_shard, bf16 parameters, fp32 master
weights and reductions); the plain loop is fp32 weights under `torch.autocast`
with AdamW, computing the same token-level policy-gradient loss.

MFU counts the FLOPs the step needs, the same for both loops: 6 x (non-embedding
parameters) per token, 6 x (LM-head parameters) per completion token (prompt
positions need no logits), and PaLM's 12 x layers x width x sequence length per
token for attention, over the GPU's dense bf16 peak.

    python -m bench.learner_gpu [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import torch

from bench.learner import make_batches, plain_hf_step, sync, timed
from bench.report import environment, results_dir
from protocol.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s, no sparsity
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
}  # fmt: skip


def make_model(shape: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def step_flops(model: torch.nn.Module, prompt: int, completion: int) -> float:
    """FLOPs one sequence needs for forward + backward (see the module docstring)."""
    config = model.config
    head = config.vocab_size * config.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head  # tied: the embedding is the head
    length = prompt + completion
    return 6 * body * length + 6 * head * completion + 12 * config.num_hidden_layers * config.hidden_size * length * length


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def profiled(step, batch, path: Path | None) -> None:
    """One more step under the profiler: its busiest GPU operations, then its busiest host ones, written to `path`."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        sync()
    table = prof.key_averages().table
    path.write_text(table(sort_by="cuda_time_total", row_limit=40) + "\n" + table(sort_by="self_cpu_time_total", row_limit=40))


def ours(model: torch.nn.Module, batches, micro: int, profile_to: Path | None = None) -> float:
    from learner.backend import make_backend
    from learner.trainer import Trainer

    config = load_config(None, ["train.lr=1e-5", f"train.micro_batch_size={micro}", "loss.clip_high=0.2"])
    backend = make_backend(config.learner)  # what a learner alone on a GPU runs: FSDP2 of one rank, bf16
    try:
        trainer = Trainer(backend.wrap(model), config, backend=backend)
        tokens_per_s = timed(trainer.step, batches)
        profiled(trainer.step, batches[0], profile_to)
        return tokens_per_s
    finally:
        backend.close()


def plain(model: torch.nn.Module, batches, micro: int, profile_to: Path | None = None) -> float:
    model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens_per_s = timed(lambda b: plain_hf_step(model, optimizer, b, micro, "cuda"), batches)
    profiled(lambda b: plain_hf_step(model, optimizer, b, micro, "cuda"), batches[0], profile_to)
    return tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more runs untimed first)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, short sequences")
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--profile", action="store_true", help="write each loop's busiest GPU operations to --out")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.learner_gpu needs a CUDA GPU")
    shape, prompt, completion = ("tiny", 32, 96) if args.quick else ("0.5b", 256, 768)
    micro = args.micro
    batches = make_batches(args.steps + 1, groups=8, n=8, prompt=prompt, completion=completion)
    sequences = 8 * 8
    rows = []
    args.out = results_dir(args.out, args.quick)
    for loop, run in (("streamrl Trainer.step (FSDP2, bf16)", ours), ("plain HF loop (bf16 autocast)", plain)):
        model = make_model(shape)
        params = sum(p.numel() for p in model.parameters())
        flops_per_token = step_flops(model, prompt, completion) / (prompt + completion)
        tokens_per_s = run(model, batches, micro, args.out / f"profile_{run.__name__}.txt" if args.profile else None)
        peak = peak_flops()
        rows.append({"loop": loop, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops_per_token / 1e12,
                     "mfu": tokens_per_s * flops_per_token / peak if peak else None,
                     "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9})  # fmt: skip
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    device = torch.cuda.get_device_name()
    print(f"{shape} Llama ({params / 1e9:.2f}B parameters), {args.steps} timed steps of {sequences} sequences x "
          f"{prompt}+{completion} tokens, micro-batches of {micro}, {device}\n")  # fmt: skip
    print("| loop | trained tokens/s | TFLOP/s | MFU | peak GB | vs plain |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {r['loop']} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {mfu} | {r['peak_memory_gb']:.1f} | {r['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x |")
    report = {**environment(gpu=device),
              "shape": shape, "params": params, "prompt": prompt, "completion": completion, "sequences": sequences,
              "micro_batch": micro, "steps": args.steps, "quick": args.quick, "results": rows,
              "ratio": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]}  # fmt: skip
    (args.out / "learner_gpu.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'learner_gpu.json'}")


if __name__ == "__main__":
    main()

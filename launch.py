"""The one entry point: `python launch.py --role actor|learner|broker|all|eval|parity --config FILE [key.sub=value ...]`.

A single role runs in this process (for running roles on different hosts; endpoints
come from the config). `--role all` validates the config, prepares the run
directory and the model, then starts the broker, the actors and the learner as
separate processes, shows live progress, and stops them all when the learner has
finished its steps, on Ctrl-C or SIGTERM, or when any role dies (exiting non-zero, naming it).
With `--launcher slurm` or `--launcher ray` it places the same roles on a cluster
instead: one Slurm heterogeneous job, or Ray actors (docs/multinode.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from protocol.config import RunConfig, load_config
from protocol.errors import ConfigError, ModelNotFoundError, RoleFailed, TaskError
from protocol.lifetime import follow_supervisor, raise_interrupt
from protocol.models import resolve_model, vocab_size

ROLES = ("all", "broker", "actor", "learner", "eval", "parity")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=ROLES, default="all")
    parser.add_argument("--config", type=Path, help="YAML run config (defaults apply to missing keys)")
    parser.add_argument("--index", type=int, default=0, help="actor index (actor role only)")
    parser.add_argument("--resume", action="store_true", help="learner: continue from the run directory's latest checkpoint")
    parser.add_argument("--prompts", type=int, default=4, help="parity: groups to generate and compare")
    parser.add_argument("--tolerance", type=float, default=0.01, help="parity: largest acceptable mean |logprob difference|")
    parser.add_argument("--launcher", choices=("local", "slurm", "ray"), default="local", help="--role all: child processes here, a Slurm heterogeneous job, or Ray actors (docs/multinode.md)")
    parser.add_argument("--dry-run", action="store_true", help="--launcher slurm: print the batch script instead of submitting it")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.launcher != "local" and args.role != "all":
        parser.error("--launcher slurm|ray starts every role: use it with --role all")
    return args


def setup_logging(level: str) -> None:
    """Roles log to stdout; the supervisor (or the user's shell) decides where that goes."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT ask the role to stop cleanly at its next loop turn."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_role(role: str, config: RunConfig, index: int, resume: bool = False) -> None:
    if role == "eval":  # loads eval.model itself; no sockets
        from actors.evaluate import run_eval

        for sig in (signal.SIGTERM, signal.SIGINT):  # nothing checks a stop flag while vLLM generates: stop at once
            signal.signal(sig, raise_interrupt)  # SIGINT too: a background job of a script inherits it ignored
        run_eval(config)
        return
    run_dir = config.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(config.model.path, config.model.cache_dir)
    stop = stop_on_signals()
    if role == "broker":
        from broker.server import Broker

        Broker(config, vocab_size(model_dir), run_dir / "broker_stats.json").serve(stop)
    elif role == "actor":
        os.environ.setdefault("VLLM_RPC_BASE_PATH", str(run_dir / "tmp"))
        from actors.worker import run_actor

        run_actor(config, index, model_dir, stop)
    elif role == "learner" and config.learner.world_size > 1 and "RANK" not in os.environ:
        from learner.ranks import run_ranks

        run_ranks(config, model_dir, run_dir, stop, resume)
    elif role == "learner":
        from learner.main import run_learner

        run_learner(config, model_dir, run_dir, stop, resume)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:  # `launch.py plot RUN_DIR`: PNGs from a run's metrics
        from scripts.plot import main as plot_main

        plot_main(argv[1:])
        return 0
    if argv[:1] == ["keygen"]:  # `launch.py keygen DIR [CLIENT]`: CURVE keys for broker.curve
        from protocol.curve import keygen_main

        return keygen_main(argv[1:])
    args = parse_args(argv)
    if not follow_supervisor():
        print("error: the launch.py --role all that started this role has exited", file=sys.stderr)
        return 1
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.role == "all" and args.launcher == "slurm":
            from scripts.slurm import submit

            return submit(config, args.resume, args.dry_run)
        if args.role == "all" and args.launcher == "ray":
            from scripts.ray_launch import run_ray

            return run_ray(config, args.resume)
        if args.role == "all":
            from scripts.supervisor import run_all

            return run_all(config, args.resume)
        setup_logging(config.run.log_level)
        if args.role == "parity":
            from scripts.parity import run_parity

            return run_parity(config, resolve_model(config.model.path, config.model.cache_dir), args.prompts, args.tolerance)
        run_role(args.role, config, args.index, args.resume)
    except (ConfigError, ModelNotFoundError, TaskError) as err:  # ConfigError here: e.g. CURVE key files
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RoleFailed as err:
        print(f"error: {args.role} stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.role}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

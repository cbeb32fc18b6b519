"""`launch.py --role all`: run every role as a child process of this one and watch them.

Each child's output goes to `<run dir>/logs/<role>.log` and, prefixed with the
role's name, to this terminal, under a live progress bar fed by `metrics.jsonl`.
The run ends well when the learner exits 0 (the others are then given time to stop
by themselves); it fails, naming the role, as soon as any other child exits first.
Ctrl-C, SIGTERM and SIGHUP stop every role cleanly; if this process is killed
outright, each role gets SIGTERM from the kernel and ends itself if it has not stopped
cleanly within `ORPHAN_GRACE_S` (`protocol/lifetime.py`).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from protocol.config import RunConfig, dump_config
from protocol.lifetime import PARENT_ENV, raise_interrupt
from protocol.models import BUILTIN_PREFIX, resolve_model

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 30.0
console = Console(highlight=False)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    pump: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        with self.log_path.open("ab") as log:
            for line in iter(self.process.stdout.readline, b""):
                log.write(line)
                log.flush()
                console.print(Text.assemble((f"[{self.name}] ", "dim"), line.decode(errors="replace").rstrip()), soft_wrap=True)


PREVIOUS_RUN_MARKERS = ("wal", "checkpoints", "metrics.jsonl")


def prepare_run_dir(config: RunConfig, resume: bool = False) -> Path:
    """Make the config's paths absolute and the run directory ready; a fresh run first moves a previous run's state aside."""
    absolute_paths(config)
    run_dir, wal_dir = config.run.dir, config.broker.wal_dir
    if not resume:  # a fresh run: a previous run's broker log would be replayed into it, its checkpoints mixed in
        if any((run_dir / marker).exists() for marker in PREVIOUS_RUN_MARKERS):
            set_aside(run_dir)
        if wal_dir is not None and wal_dir.is_dir() and any(wal_dir.iterdir()):
            set_aside(wal_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    return run_dir


def absolute_paths(config: RunConfig) -> None:
    """Every path the roles read, made absolute from where the run starts: they run in the repository's folder
    (or on other hosts), where a relative path named another file, or none."""
    config.run.dir = config.run.dir.resolve()
    if not config.model.path.startswith(BUILTIN_PREFIX):
        config.model.path = str(Path(config.model.path).expanduser().resolve())
    for section, name in ((config.model, "cache_dir"), (config.task.dataset, "path"), (config.broker, "wal_dir"),
                          (config.broker.curve, "keys_dir"), (config.eval, "out")):  # fmt: skip
        if (path := getattr(section, name)) is not None:
            setattr(section, name, path.resolve())


def set_aside(path: Path) -> Path:
    """Rename a previous run's folder to `<name>.<timestamp>` beside it (never delete it); return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{stamp}")
    for n in itertools.count(1):  # two fresh runs within a second
        if not target.exists():
            break
        target = path.with_name(f"{path.name}.{stamp}-{n}")
    path.rename(target)
    console.print(f"{path} held a previous run: moved it to {target} (pass --resume to continue a run instead)")
    return target


def start(name: str, args: list[str], run_dir: Path, threads: int) -> Child:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "TMPDIR": str(run_dir / "tmp"),
           PARENT_ENV: str(os.getpid())}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "launch.py"), "--config", str(run_dir / "config.yaml"), *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return Child(name, process, run_dir / "logs" / f"{name}.log")


def last_metrics(path: Path) -> dict | None:
    """The learner's last complete metrics row (it may be writing the next one)."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
    return None


def describe(row: dict) -> str:
    return (
        f"reward {row['reward_mean']:.3f} acc {row['accuracy']:.3f} lag {row['lag_mean']:.1f} "
        f"gen {row['gen_tokens_per_s']:.0f} tok/s train {row['train_tokens_per_s']:.0f} tok/s"
    )


def stop_all(children: list[Child], grace_s: float) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    for child in children:
        child.pump.join(timeout=5)


def supervise(children: list[Child], learner: Child, run_dir: Path, steps: int) -> int:
    """Wait for the learner to finish; return the exit code of the whole run.

    A non-zero exit of any role fails the run at once. Broker and actors exit 0 by
    themselves after the learner's FINISH, which can beat the learner's own exit by
    a moment, so a clean exit of another role fails the run only if the learner
    does not follow within the grace period.
    """
    columns = [TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
    first_clean_exit: float | None = None
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("waiting for the first batch", total=steps)
        while learner.process.poll() != 0:
            row = last_metrics(run_dir / "metrics.jsonl")
            if row is not None:
                progress.update(task, completed=row["step"], description=describe(row))
            for child in children:
                code = child.process.poll()
                if code == 0 and first_clean_exit is None:
                    first_clean_exit = time.monotonic()
                if code not in (None, 0) or (first_clean_exit and time.monotonic() - first_clean_exit > GRACE_S):
                    console.print(f"[bold red]error:[/] role {child.name} exited with code {code} before the learner finished; see {child.log_path}")
                    return 1
            time.sleep(0.5)
        progress.update(task, completed=steps)
    others = [c for c in children if c is not learner]
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(c.process.poll() is None for c in others):
        time.sleep(0.2)
    return 0


def run_all(config: RunConfig, resume: bool = False) -> int:
    run_dir = prepare_run_dir(config, resume)
    console.print(f"run directory: {run_dir}")
    console.print(f"preparing model {config.model.path} ...")
    resolve_model(config.model.path, config.model.cache_dir)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stopped by kill, timeout or a scheduler: as by Ctrl-C
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored hangup stays ignored
            signal.signal(sig, raise_interrupt)
    children = [start("broker", ["--role", "broker"], run_dir, 1)]
    try:
        children += [start(f"actor-{i}", ["--role", "actor", "--index", str(i)], run_dir, config.actor.threads) for i in range(config.actor.count)]
        learner = start("learner", ["--role", "learner", *(["--resume"] if resume else [])], run_dir, config.learner.threads)
        children.append(learner)
        code = supervise(children, learner, run_dir, config.train.steps)
    except KeyboardInterrupt:
        console.print("interrupted; stopping every role")
        code = 130
    finally:  # whatever ended the watch, no role is left running
        stop_all(children, GRACE_S)
    return report_end(code, run_dir, config.train.steps)


def report_end(code: int, run_dir: Path, steps: int) -> int:
    """The run's exit code, said: a learner asked to stop (SIGTERM) exits 0, to be resumed, and a run whose
    learner did not reach `steps` did not succeed (it was reported done, with nothing trained)."""
    reached = (last_metrics(run_dir / "metrics.jsonl") or {}).get("step", 0)
    if code == 0 and reached < steps:
        console.print(f"[bold red]error:[/] the learner stopped at step {reached} of {steps}; "
                      f"see its log in {run_dir / 'logs'} (--resume continues the run)")  # fmt: skip
        code = 1
    if code == 0:
        console.print(f"done: {steps} steps; metrics in {run_dir / 'metrics.jsonl'}")
    return code

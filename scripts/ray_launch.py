"""`launch.py --role all --launcher ray`: broker, actors and learner ranks as Ray actors.

Each role is a Ray actor (`RoleProcess`) that holds the role's resources
(`ray.*_cpus`, `ray.*_gpus`) and runs `launch.py --role ROLE` as its child process,
so the roles run the same code as locally or under Slurm; the child dies with its
Ray actor (PR_SET_PDEATHSIG). The driver places the broker and learner rank 0
first, asks Ray which nodes they landed on, points every role at those addresses,
and watches the run with the local supervisor's rules: it succeeds when the
learner finishes and fails, naming the role, when another role ends first.

Ray restarts a crashed broker or actor up to `ray.max_restarts` times: the new
incarnation rejoins the run (actors resend what the broker never acknowledged;
the broker drops duplicates). The learner is never restarted; resume it with
`--resume` from its checkpoints. Every node must see the repository, its Python
environment and the run directory at the same paths (a shared filesystem).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from protocol.config import RunConfig
from protocol.lifetime import die_with_parent
from protocol.models import resolve_model
from scripts.supervisor import ROOT, console, prepare_run_dir, report_end, supervise

PLACE_TIMEOUT_S = 600.0


class PlacementError(RuntimeError):
    """Ray cannot place the roles the run asks for."""


class RoleProcess:
    """A Ray actor that runs one role's process on the node Ray placed it on."""

    def __init__(self, name: str, run_dir: str) -> None:
        import ray

        self.log_path = Path(run_dir) / "logs" / f"{name}.log"
        again = ray.get_runtime_context().was_current_actor_reconstructed
        with self.log_path.open("a") as log:
            log.write(f"ray: {name} {'restarted' if again else 'started'} in Ray actor pid {os.getpid()} on {self.node_ip()}\n")

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def run(self, args: list[str], env: dict[str, str]) -> int:
        """Run `launch.py ARGS` to its end and return its exit code (a restarted actor runs it again)."""
        with self.log_path.open("ab") as log:
            child = subprocess.Popen(
                [sys.executable, str(ROOT / "launch.py"), *args], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **env}, cwd=ROOT, preexec_fn=die_with_parent,
            )  # fmt: skip
        return child.wait()


class RayCall:
    """The Popen-like face (`poll`) of one `RoleProcess.run` call, as `supervisor.supervise` watches it."""

    def __init__(self, name: str, handle, args: list[str], env: dict[str, str]) -> None:
        self.name, self.handle = name, handle
        self.ref = handle.run.remote(args, env)

    def poll(self) -> int | None:
        import ray

        if not ray.wait([self.ref], timeout=0)[0]:
            return None
        try:
            return ray.get(self.ref)
        except ray.exceptions.RayError as err:
            console.print(f"[bold red]error:[/] the Ray actor of {self.name} failed (restarts used up, or none allowed): {err}")
            return -1


@dataclass
class RayRole:
    name: str
    log_path: Path
    process: RayCall


def local_cpus(config: RunConfig) -> int:
    """CPUs a local Ray cluster must offer to place every role (logical CPUs; Ray does not pin them)."""
    ray = config.ray
    total = ray.broker_cpus + ray.actor_cpus * config.actor.count + ray.learner_cpus * config.learner.world_size
    return max(1, math.ceil(total))


def role_name(role: str, index: int, count: int) -> str:
    return role if role == "learner" and count == 1 else f"{role}-{index}"


def start_roles(config: RunConfig, run_dir: Path, resume: bool) -> list[RayRole]:
    """Place every role, wire the endpoints to the nodes the broker and learner rank 0 got, start them."""
    import ray

    settings, world = config.ray, config.learner.world_size
    remote = ray.remote(RoleProcess)

    def place(name: str, cpus: float, gpus: float, restarts: int):
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=restarts, max_task_retries=-1 if restarts else 0)
        return name, remote.options(**options).remote(name, str(run_dir))

    broker = place("broker", settings.broker_cpus, 0, settings.max_restarts)
    ranks = [place(role_name("learner", r, world), settings.learner_cpus, settings.learner_gpus, 0) for r in range(world)]
    actors = [place(f"actor-{i}", settings.actor_cpus, settings.actor_gpus, settings.max_restarts) for i in range(config.actor.count)]
    try:
        broker_ip, learner_ip = ray.get([broker[1].node_ip.remote(), ranks[0][1].node_ip.remote()], timeout=PLACE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise PlacementError(f"Ray placed no broker or no learner rank 0 within {PLACE_TIMEOUT_S:.0f} s: "
                             "does the cluster have the CPUs/GPUs that ray.* asks for? (`ray status`)") from None
    endpoints = [
        f"endpoints.broker={broker_ip}:{config.endpoints.broker.rpartition(':')[2]}",
        f"endpoints.weights={learner_ip}:{config.endpoints.weights.rpartition(':')[2]}",
    ]
    base = ["--config", str(run_dir / "config.yaml"), *endpoints]
    threads = {"broker": 1, "actor": config.actor.threads, "learner": config.learner.threads}

    def start(name: str, handle, role: str, extra: list[str], env: dict[str, str] | None = None) -> RayRole:
        env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads[role]), **(env or {})}
        return RayRole(name, run_dir / "logs" / f"{name}.log", RayCall(name, handle, ["--role", role, *base, *extra], env))

    roles = [start(*broker, "broker", [])]
    roles += [start(name, handle, "actor", ["--index", str(i)]) for i, (name, handle) in enumerate(actors)]
    rendezvous = {"WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": learner_ip, "MASTER_PORT": str(config.learner.master_port)}
    resume_flag = ["--resume"] if resume else []
    for rank, (name, handle) in enumerate(ranks):
        roles.append(start(name, handle, "learner", resume_flag, {"RANK": str(rank), **rendezvous} if world > 1 else {}))
    console.print(f"ray: broker on {broker_ip}, learner rank 0 on {learner_ip}; {len(roles)} roles started")
    return roles


def run_ray(config: RunConfig, resume: bool = False) -> int:
    """Run every role on Ray (`ray.address`, or a local cluster sized for the run); return an exit code."""
    import ray

    run_dir = prepare_run_dir(config, resume)
    console.print(f"run directory: {run_dir}")
    resolve_model(config.model.path, config.model.cache_dir)
    address = config.ray.address
    ray.init(  # "local" always starts a fresh cluster, never joins one found on this machine
        address=address or "local", num_cpus=None if address else local_cpus(config), include_dashboard=False,
        log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )  # fmt: skip
    roles: list[RayRole] = []
    try:
        roles = start_roles(config, run_dir, resume)
        learner = next(r for r in roles if r.name in ("learner", "learner-0"))
        code = supervise(roles, learner, run_dir, config.train.steps)
    except PlacementError as err:
        console.print(f"[bold red]error:[/] {err}")
        code = 1
    except KeyboardInterrupt:
        console.print("interrupted; stopping every role")
        code = 130
    finally:
        for role in roles:
            ray.kill(role.process.handle, no_restart=True)
        ray.shutdown()
    return report_end(code, run_dir, config.train.steps)

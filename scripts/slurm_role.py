"""One task of the Slurm job (`python -m scripts.slurm_role --config RUN/config.yaml ROLE`).

Turns Slurm's environment into what `launch.py --role ROLE` needs, logs it, and
replaces itself with launch.py: the broker's and the learner's addresses come from
the first node of het groups 0 and 1 (`SLURM_JOB_NODELIST_HET_GROUP_<N>`), the ports
from the config or from the job id, the actor index from the task's rank, and the
learner's torch.distributed rendezvous from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
A requeued job (SLURM_RESTART_COUNT > 0, e.g. after preemption) resumes the learner.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from protocol.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
BROKER_GROUP, LEARNER_GROUP = 0, 1  # the order of scripts/slurm.py's COMPONENTS


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compact node list (`gpu[01-03,7],cpu-a`) as host names, in order (what `scontrol show hostnames` prints)."""
    items, depth, current = [], 0, ""
    for char in spec:
        if char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += (char == "[") - (char == "]")
        current += char
    items.append(current)
    return [host for item in items if item for host in _expand(item)]


def _expand(item: str) -> list[str]:
    match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    hosts = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        for number in range(int(low), int(high or low) + 1):
            hosts += [f"{prefix}{number:0{len(low)}d}{tail}" for tail in _expand(rest)]
    return hosts


def job_ports(job_id: int) -> tuple[int, int, int]:
    """Broker, weights and rendezvous ports for `slurm.ports: job_id`: distinct for jobs that share nodes."""
    base = 20000 + (job_id % 10000) * 4
    return base, base + 1, base + 2


def _port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def plan(role: str, config: RunConfig, env: Mapping[str, str], resume: bool = False) -> tuple[list[str], dict[str, str]]:
    """The launch.py arguments (after --config) and the environment updates for this task."""
    broker_host = expand_hostlist(env[f"SLURM_JOB_NODELIST_HET_GROUP_{BROKER_GROUP}"])[0]
    learner_host = expand_hostlist(env[f"SLURM_JOB_NODELIST_HET_GROUP_{LEARNER_GROUP}"])[0]
    if config.slurm.ports == "job_id":
        broker_port, weights_port, master_port = job_ports(int(env["SLURM_JOB_ID"]))
    else:
        broker_port, weights_port = _port(config.endpoints.broker), _port(config.endpoints.weights)
        master_port = config.learner.master_port
    args = ["--role", role, f"endpoints.broker={broker_host}:{broker_port}", f"endpoints.weights={learner_host}:{weights_port}"]
    updates = {"OMP_NUM_THREADS": str({"actor": config.actor.threads, "learner": config.learner.threads}.get(role, 1))}
    task = env.get("SLURM_PROCID", "0")
    if role == "actor":
        args += ["--index", task]
        gpus = config.slurm.actors.gpus_per_node
        if gpus:  # one engine per GPU: the task's local rank picks one of the GPUs Slurm gave the node
            visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
            updates["CUDA_VISIBLE_DEVICES"] = visible[int(env.get("SLURM_LOCALID", "0"))]
    if role == "learner" and (resume or int(env.get("SLURM_RESTART_COUNT", "0")) > 0):
        args.append("--resume")  # asked for, or the job was requeued (preemption, node failure)
    if role == "learner" and config.learner.world_size > 1:
        updates.update(
            RANK=task, WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
            MASTER_ADDR=learner_host, MASTER_PORT=str(master_port),
        )  # fmt: skip
    return args, updates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("role", choices=("broker", "learner", "actor"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    launch_args, updates = plan(args.role, config, os.environ, args.resume)
    env = os.environ
    print(
        f"slurm: job {env.get('SLURM_JOB_ID')} het group {het_group(env)} node {env.get('SLURMD_NODENAME')} "
        f"task {env.get('SLURM_PROCID')}/{env.get('SLURM_NTASKS')}: launch.py {' '.join(launch_args)} "
        + " ".join(f"{k}={v}" for k, v in sorted(updates.items())),
        flush=True,
    )
    os.environ.update(updates)
    cmd = [sys.executable, str(ROOT / "launch.py"), "--config", str(args.config), *launch_args]
    os.execv(sys.executable, cmd)


def het_group(env: Mapping[str, str]) -> str:
    """The het group(s) whose node list is this task's allocation, as Slurm says (for the log)."""
    mine = env.get("SLURM_JOB_NODELIST")
    prefix = "SLURM_JOB_NODELIST_HET_GROUP_"
    return ",".join(sorted(k[len(prefix) :] for k, v in env.items() if k.startswith(prefix) and v == mine)) or "?"


if __name__ == "__main__":
    main()

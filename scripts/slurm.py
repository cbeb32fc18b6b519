"""`launch.py --role all --launcher slurm`: the run as one Slurm heterogeneous job.

The job has three components, each its own het group, so each gets the nodes it
needs: 0 the broker (one task, CPUs only), 1 the learner (one task per FSDP rank,
`learner.world_size` split over `slurm.learner.nodes`), 2 the actors (one task per
engine, `actor.count` split over `slurm.actors.nodes`). The batch script starts
each component with `srun --het-group=N`; inside, `scripts/slurm_role.py` finds the
broker and the learner from `SLURM_JOB_NODELIST_HET_GROUP_<N>`. The script then
watches the three steps: the job succeeds when the learner finishes, and fails,
naming the component and the end of its log, as soon as another one dies first.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from protocol.config import RunConfig, SlurmComponent, SlurmNodes
from protocol.errors import ConfigError
from scripts.supervisor import GRACE_S, ROOT, absolute_paths, prepare_run_dir

COMPONENTS = ("broker", "learner", "actor")
"""Het group N runs COMPONENTS[N]; scripts/slurm_role.py relies on this order."""

WATCH = r"""
# Wait for the learner. A component that exits before it (non-zero, or zero without the
# learner following within the grace period) fails the job, naming the component; once the
# learner has finished, training is complete and a component failing on its way out is only named.
grace={grace}
names=(broker learner actor)
pids=("$broker" "$learner" "$actor")
finished_at=
learner_ok=
stop_all() {{  # SIGTERM to every task still running (roles stop cleanly), SIGKILL after the grace period
  local pid alive
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
  for _ in $(seq "$grace"); do
    alive=; for pid in "${{pids[@]}}"; do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break; sleep 1
  done
  [ -n "$alive" ] && scancel --signal=KILL "$SLURM_JOB_ID" 2>/dev/null
  echo "streamrl: job ends with exit code $1"
  exit "$1"
}}
while :; do
  for i in 1 0 2; do  # the learner first: whoever else ended in the same second ended after it
    pid=${{pids[$i]}}
    [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null || continue
    wait "$pid"; code=$?; pids[$i]=
    if [ "$code" -ne 0 ] && [ -n "$learner_ok" ]; then
      echo "streamrl: component ${{names[$i]}} (het group $i) exited with code $code after the learner finished"
    elif [ "$code" -ne 0 ]; then
      echo "streamrl: component ${{names[$i]}} (het group $i) failed with exit code $code; end of its log:"
      tail -n 5 "$RUN"/logs/"${{names[$i]}}"*.log 2>/dev/null | sed 's/^/  /'
      stop_all 1
    else
      echo "streamrl: component ${{names[$i]}} (het group $i) finished"
    fi
    [ "$i" -eq 1 ] && [ "$code" -eq 0 ] && learner_ok=1
    [ -z "$finished_at" ] && finished_at=$SECONDS
  done
  if [ -z "${{pids[1]}}" ]; then
    if [ -z "${{pids[0]}}${{pids[2]}}" ] || [ $((SECONDS - finished_at)) -gt "$grace" ]; then stop_all 0; fi
  elif [ -n "$finished_at" ] && [ $((SECONDS - finished_at)) -gt "$grace" ]; then
    echo "streamrl: a component finished but the learner did not follow within $grace s"
    stop_all 1
  fi
  sleep 1
done
"""


def tasks_per_node(total: int, group: SlurmNodes, what: str) -> int:
    """`total` tasks split evenly over the group's nodes, at most one per GPU where there are GPUs."""
    if total % group.nodes:
        raise ConfigError(f"{what} = {total} does not split evenly over {group.nodes} nodes")
    per_node = total // group.nodes
    if group.gpus_per_node and per_node > group.gpus_per_node:
        raise ConfigError(f"{what} = {total} needs {per_node} tasks per node but there are {group.gpus_per_node} GPUs per node")
    return per_node


def sbatch_options(config: RunConfig, component: SlurmComponent, nodes: int, per_node: int, gpus: int) -> str:
    slurm = config.slurm
    parts = [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--cpus-per-task={component.cpus_per_task}"]
    if gpus:
        parts.append(f"--gpus-per-node={gpus}")
    if component.partition or slurm.partition:
        parts.insert(0, sbatch_value("partition", component.partition or slurm.partition))
    return "#SBATCH " + " ".join(parts)


def srun_line(group: int, log: str, component: SlurmComponent, role_cmd: str, extra: str = "") -> str:
    """The component's `srun`, its environment set by `env` for srun to pass on: in `--export=ALL,K=V` a comma
    ends the value (NCCL_SOCKET_IFNAME=^docker0,lo arrived as ^docker0)."""
    env = "".join(f"{shlex.quote(f'{k}={v}')} " for k, v in component.env.items())
    name = COMPONENTS[group]
    return (
        f'{"env " + env if env else ""}srun --het-group={group} --kill-on-bad-exit=1 --open-mode=append '
        f'--output="$LOGS/{log}" {role_cmd} {name}{extra} &\n{name}=$!'
    )


def sbatch_value(option: str, value: object) -> str:
    """`--option="value"`: sbatch splits an #SBATCH line at spaces outside quotes and ends it at a `#`, so a run
    folder with a space sent the job's log elsewhere. A double quote or line break cannot be written there."""
    text = str(value)
    if '"' in text or "\n" in text:
        raise ConfigError(f"{option} {text!r}: a Slurm batch option cannot hold a double quote or a line break")
    return f'--{option}="{text}"'


def render_sbatch(config: RunConfig, resume: bool = False) -> str:
    """The batch script for this run; `config.run.dir` must be absolute (prepare_run_dir makes it so)."""
    slurm, run_dir = config.slurm, config.run.dir
    logs = f"{run_dir}/logs".replace("%", "%%")  # Slurm expands % in --output (%j: the job id); %% is a plain %
    learner_per_node = tasks_per_node(config.learner.world_size, slurm.learner, "learner.world_size")
    actor_per_node = tasks_per_node(config.actor.count, slurm.actors, "actor.count")
    header = [sbatch_value("job-name", slurm.job_name), sbatch_value("time", slurm.time),
              sbatch_value("output", f"{logs}/slurm-%j.out"), "--open-mode=append", "--requeue"]  # fmt: skip
    if slurm.account:
        header.append(sbatch_value("account", slurm.account))
    role_cmd = f"{shlex.quote(sys.executable)} -m scripts.slurm_role --config \"$RUN/config.yaml\""
    learner_log = "learner-%t.log" if config.learner.world_size > 1 else "learner.log"
    lines = [
        "#!/bin/bash",
        f"# Generated by `launch.py --role all --launcher slurm` for {run_dir}.",
        f"# het group 0: broker; 1: learner, {slurm.learner.nodes} node(s) x {learner_per_node} rank(s); "
        f"2: actors, {slurm.actors.nodes} node(s) x {actor_per_node} engine(s).",
        *(f"#SBATCH {h}" for h in header),
        sbatch_options(config, slurm.broker, 1, 1, 0),
        "#SBATCH hetjob",
        sbatch_options(config, slurm.learner, slurm.learner.nodes, learner_per_node, slurm.learner.gpus_per_node),
        "#SBATCH hetjob",
        sbatch_options(config, slurm.actors, slurm.actors.nodes, actor_per_node, slurm.actors.gpus_per_node),
        "set -u",
        f"cd {shlex.quote(str(ROOT))}",
        "export PYTHONUNBUFFERED=1",
        *slurm.setup,
        f"RUN={shlex.quote(str(run_dir))}",
        f"LOGS={shlex.quote(logs)}",
        srun_line(0, "broker.log", slurm.broker, role_cmd),
        srun_line(1, learner_log, slurm.learner, role_cmd, " --resume" if resume else ""),
        srun_line(2, "actor-%t.log", slurm.actors, role_cmd),
        WATCH.format(grace=int(GRACE_S)).strip(),
    ]
    return "\n".join(lines) + "\n"


def submit(config: RunConfig, resume: bool = False, dry_run: bool = False) -> int:
    """Write `<run dir>/job.sbatch` and submit it (or print it with `dry_run`); return an exit code."""
    absolute_paths(config)  # as prepare_run_dir will write them, for the dry run too
    run_dir = config.run.dir
    try:
        script = render_sbatch(config, resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print(script, end="")
        return 0
    prepare_run_dir(config, resume)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    cmd = ["sbatch", "--parsable", *(["--wait"] if config.slurm.wait else []), str(path)]
    try:
        sbatch = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        print("error: sbatch not found; is this a Slurm login node?", file=sys.stderr)
        return 2
    job_id = sbatch.stdout.readline().strip().split(";")[0]
    if job_id:
        print(f"submitted {path} as job {job_id}; logs in {run_dir / 'logs'}; stop it with: scancel {job_id}", flush=True)
    code = sbatch.wait()
    if config.slurm.wait:
        print(f"job {job_id} ended with exit code {code}")
    return code

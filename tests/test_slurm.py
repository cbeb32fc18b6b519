"""`launch.py --launcher slurm`: the generated heterogeneous job, run on a real (throw-away, local) Slurm.

The cluster is Debian's slurmctld + four `slurmd -N ciN` virtual nodes + munge, started by
scripts/local_slurm.sh for this module and stopped after it, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch
from scripts.slurm import WATCH
from tests.conftest import ROOT

CLUSTER_SCRIPT = ROOT / "scripts" / "local_slurm.sh"


def sbatch_groups(script: str) -> list[list[str]]:
    """The #SBATCH options of each het group, in order (group 0 also carries the job-wide ones), read as sbatch
    does: split at spaces outside quotes, up to a `#` (src/sbatch/opt.c)."""
    groups: list[list[str]] = [[]]
    for line in script.splitlines():
        if line == "#SBATCH hetjob":
            groups.append([])
        elif line.startswith("#SBATCH "):
            groups[-1] += shlex.split(line.removeprefix("#SBATCH "), comments=True)
    return groups


def test_dry_run_prints_one_het_job_with_a_component_per_role(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = launch.main([
        "--role", "all", "--launcher", "slurm", "--dry-run", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", "learner.world_size=16", "actor.count=32", "slurm.partition=gpu", "slurm.broker.partition=cpu",
        "slurm.learner.nodes=2", "slurm.learner.gpus_per_node=8", "slurm.actors.nodes=4", "slurm.actors.gpus_per_node=8",
        "slurm.actors.env={HF_HOME: /scratch/hf}", "slurm.setup=[module load cuda]",
    ])  # fmt: skip
    script = capsys.readouterr().out
    assert code == 0
    assert not run_dir.exists(), "a dry run writes nothing"
    broker, learner, actors = sbatch_groups(script)
    assert {"--partition=cpu", "--nodes=1", "--ntasks-per-node=1", "--requeue", f"--output={run_dir}/logs/slurm-%j.out"} <= set(broker)
    assert {"--partition=gpu", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(learner)
    assert {"--partition=gpu", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(actors)
    sruns = [line for line in script.splitlines() if "srun " in line]
    assert [re.search(r"--het-group=(\d)", s).group(1) for s in sruns] == ["0", "1", "2"]
    assert [s.split(" &")[0].split()[-1] for s in sruns] == ["broker", "learner", "actor"]
    assert sruns[2].startswith("env HF_HOME=/scratch/hf srun ") and "HF_HOME" not in sruns[0] + sruns[1]
    assert "learner-%t.log" in sruns[1] and "actor-%t.log" in sruns[2]
    assert script.index("module load cuda") < script.index("srun ")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "the script must parse"


def test_paths_and_values_slurm_would_split_reach_it_whole(tmp_path, capsys):
    """Found by a helper's hunt: #SBATCH values were unquoted (a run folder with a space or `#` sent the job's log
    elsewhere) and component env values went in `--export=ALL,K=V`, where a comma ends the value."""
    run_dir = tmp_path / "my runs" / "exp#2"
    code = launch.main([
        "--role", "all", "--launcher", "slurm", "--dry-run", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", "slurm.job_name=grpo smollm2", "slurm.learner.env={NCCL_SOCKET_IFNAME: '^docker0,lo'}",
    ])  # fmt: skip
    script = capsys.readouterr().out
    assert code == 0
    assert {f"--output={run_dir}/logs/slurm-%j.out", "--job-name=grpo smollm2"} <= set(sbatch_groups(script)[0])
    learner_srun = next(line for line in script.splitlines() if "--het-group=1" in line)
    env = subprocess.run(["bash", "-c", learner_srun.replace(" srun ", " printenv NCCL_SOCKET_IFNAME #", 1)],
                         capture_output=True, text=True)  # fmt: skip
    assert env.stdout.strip() == "^docker0,lo"


def test_a_percent_sign_in_the_run_folder_is_not_a_slurm_pattern(tmp_path, capsys):
    """Slurm expands % in --output (%j is the job id), so logs of a run folder named "lr_5%" went elsewhere."""
    run_dir = tmp_path / "lr_5%j"
    argv = ["--role", "all", "--launcher", "slurm", "--dry-run", "--config", str(ROOT / "configs" / "tiny.yaml"), f"run.dir={run_dir}"]
    assert launch.main(argv) == 0
    script = capsys.readouterr().out
    assert f"--output={tmp_path}/lr_5%%j/logs/slurm-%j.out" in sbatch_groups(script)[0]
    lines = script.splitlines()
    srun = next(line for line in lines if "--het-group=1" in line).replace("srun ", "echo ", 1).split(" &")[0]
    variables = [line for line in lines if line.startswith(("RUN=", "LOGS="))]
    shown = subprocess.run(["bash", "-c", "\n".join([*variables, srun])], capture_output=True, text=True)
    assert f"--output={tmp_path}/lr_5%%j/logs/learner.log" in shown.stdout.split(), shown


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['slurm.job_name=grpo "v2"'], "job-name 'grpo \"v2\"': a Slurm batch option cannot hold a double quote"),
        (["learner.world_size=3", "slurm.learner.nodes=2"], "learner.world_size = 3 does not split evenly over 2 nodes"),
        (["actor.count=4", "slurm.actors.gpus_per_node=2"], "actor.count = 4 needs 4 tasks per node but there are 2 GPUs per node"),
    ],
)
def test_a_layout_that_cannot_be_placed_is_a_named_error(tmp_path, capsys, overrides, message):
    argv = ["--role", "all", "--launcher", "slurm", "--dry-run", "--config", str(ROOT / "configs" / "tiny.yaml"), f"run.dir={tmp_path}/r"]
    assert launch.main(argv + overrides) == 2
    assert message in capsys.readouterr().err


def test_launcher_needs_role_all():
    with pytest.raises(SystemExit) as exit_info:
        launch.parse_args(["--role", "actor", "--launcher", "slurm"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory) -> Path:
    """A running local Slurm cluster for this module; its slurm.conf path."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it installs and starts slurmctld, slurmd and munge)")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start", str(cluster_dir)], capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHON": sys.executable},
        )  # fmt: skip
        if started.returncode == 3:
            pytest.skip(started.stderr.strip())
        assert started.returncode == 0, started.stdout + started.stderr
        yield cluster_dir / "slurm.conf"
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster_dir)], timeout=120)


def slurm(conf: Path, *args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, env={**os.environ, "SLURM_CONF": str(conf)}).stdout


def submit(conf: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Submit the tiny config with launch.py (without waiting for the job) on free ports."""
    from protocol.transport import free_ports

    broker, weights, master = free_ports(3)
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", "all", "--launcher", "slurm", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker=127.0.0.1:{broker}", f"endpoints.weights=127.0.0.1:{weights}",
        f"learner.master_port={master}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "SLURM_CONF": str(conf)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def job_records(conf: Path, job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` of every component of the het job, as key=value dicts."""
    out = slurm(conf, "scontrol", "-o", "show", "job", job_id)
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


def job_id_of(output: str) -> str:
    return re.search(r"as job (\d+)", output).group(1)


def leftovers(run_dir: Path) -> str:
    return subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.strip()


def test_expand_hostlist_agrees_with_scontrol(slurm_conf):
    from scripts.slurm_role import expand_hostlist

    spec = "ci[1-3],gpu[08-11],r[1-2]-n[01-02]"
    assert expand_hostlist(spec) == slurm(slurm_conf, "scontrol", "show", "hostnames", spec).split()


@pytest.mark.slow
def test_het_job_trains_with_each_role_in_its_own_component_and_resumes_when_requeued(slurm_conf, tiny_model_dir, tmp_path):
    """A 2-node learner, the broker and the actor each on their own nodes; requeued after step 1 (as a
    preemption would), the job comes back, the learner resumes from its checkpoint and finishes."""
    run_dir, steps = tmp_path / "run", 4
    overrides = [f"train.steps={steps}", "train.checkpoint_every=1", "learner.world_size=2", "slurm.learner.nodes=2"]
    result = submit(slurm_conf, run_dir, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)
    wait_until(lambda: read(run_dir / "metrics.jsonl"), 300, "the first step")
    slurm(slurm_conf, "scontrol", "requeue", job_id)
    wait_until(lambda: {r["JobState"] for r in job_records(slurm_conf, job_id)} == {"PENDING"}, 60, "the requeue")
    for record in job_records(slurm_conf, job_id):  # Slurm holds requeued jobs ~2 min; every component must be let go
        slurm(slurm_conf, "scontrol", "update", f"jobid={record['JobId']}", "StartTime=now")
    wait_until(lambda: {r["JobState"] for r in job_records(slurm_conf, job_id)} <= {"COMPLETED", "FAILED"}, 400, "the job's end")
    batch_log = read(next((run_dir / "logs").glob("slurm-*.out")))
    records = job_records(slurm_conf, job_id)
    assert [(r["HetJobOffset"], r["NodeList"], r["JobState"], r["ExitCode"], r["Restarts"]) for r in records] == [
        ("0", "ci1", "COMPLETED", "0:0", "1"), ("1", "ci[2-3]", "COMPLETED", "0:0", "1"), ("2", "ci4", "COMPLETED", "0:0", "1"),
    ], batch_log  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "resumed exactly after the last checkpoint"

    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("*.log")}
    assert sorted(logs) == ["actor-0.log", "broker.log", "learner-0.log", "learner-1.log"]
    where = {name: re.findall(r"^slurm: job \d+ het group (\d) node (\w+) task (\d/\d)", text, re.M) for name, text in logs.items()}
    assert where == {  # two runs of the job, same placement
        "broker.log": [("0", "ci1", "0/1")] * 2, "learner-0.log": [("1", "ci2", "0/2")] * 2,
        "learner-1.log": [("1", "ci3", "1/2")] * 2, "actor-0.log": [("2", "ci4", "0/1")] * 2,
    }  # fmt: skip
    starts = [line for line in logs["learner-0.log"].splitlines() if line.startswith("slurm: ")]
    assert "--resume" not in starts[0] and "--resume" in starts[1]
    assert all("MASTER_ADDR=ci2" in line and "WORLD_SIZE=2" in line for line in starts)
    assert re.search(r"resumed from \S+/step_00000[1-3] at policy version [1-3]", logs["learner-0.log"])
    broker_port = re.search(r"endpoints.broker=ci1:(\d+)", logs["actor-0.log"]).group(1)
    assert f"broker listening on ci1:{broker_port}" in logs["broker.log"]
    assert "endpoints.weights=ci2:" in logs["actor-0.log"] and "applied weights v" in logs["actor-0.log"]
    assert "streamrl: job ends with exit code 0" in batch_log
    assert leftovers(run_dir) == ""


@pytest.mark.slow
def test_a_failing_actor_fails_the_job_and_is_named(slurm_conf, tiny_model_dir, tmp_path):
    """The actors' nodes cannot write the model cache (as when a shared filesystem is missing there)."""
    run_dir = tmp_path / "run"
    result = submit(slurm_conf, run_dir, "slurm.actors.env={STREAMRL_CACHE: /dev/null/cache}")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)  # polled here: sbatch --wait (slurm.wait) polls with back-off, up to 32 s late
    wait_until(lambda: {r["JobState"] for r in job_records(slurm_conf, job_id)} <= {"FAILED", "COMPLETED"}, 300, "the job's end")
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert "streamrl: component actor (het group 2) failed with exit code 1" in batch_log
    assert "NotADirectoryError" in batch_log.split("failed with exit code 1")[1], "the end of the actor's log says why"
    assert "streamrl: job ends with exit code 1" in batch_log
    states = [(r["JobState"], r["ExitCode"]) for r in job_records(slurm_conf, job_id)]
    assert states[0] == ("FAILED", "1:0") and {s for s, _ in states} == {"FAILED"}, states
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()
    assert leftovers(run_dir) == ""


@pytest.mark.slow
def test_scancel_stops_every_component(slurm_conf, tiny_model_dir, tmp_path):
    """scancel sends SIGTERM to every task: the broker stops cleanly (writes its stats), nothing is left."""
    run_dir = tmp_path / "run"
    result = submit(slurm_conf, run_dir, "train.steps=1000")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)
    logs = {n: run_dir / "logs" / f"{n}.log" for n in ("broker", "learner", "actor-0")}
    started = lambda: "broker listening" in read(logs["broker"]) and all("launch.py" in read(p) for p in logs.values())  # noqa: E731
    wait_until(started, 120, "every component to start")
    assert len(leftovers(run_dir).splitlines()) >= 3
    slurm(slurm_conf, "scancel", job_id)
    gone = lambda: not leftovers(run_dir) and {r["JobState"] for r in job_records(slurm_conf, job_id)} == {"CANCELLED"}  # noqa: E731
    wait_until(gone, 60, "every process of the job to end")
    assert "broker stopped" in read(logs["broker"])
    assert (run_dir / "broker_stats.json").exists()


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("learner", "actor", "ends", "says"),
    [
        ("exit 0", "sleep 1; exit 3", 0, "component actor (het group 2) exited with code 3 after the learner finished"),
        ("sleep 1; exit 0", "exit 3", 1, "component actor (het group 2) failed with exit code 3"),
    ],
)
def test_a_component_failing_after_the_learner_finished_does_not_fail_the_job(tmp_path, learner, actor, ends, says):
    """An actor whose engine crashed on its way out after the last step marked a complete training FAILED.
    The job's watcher runs here with stand-in components (scancel stubbed: no job)."""
    components = f'(sleep 0.3; exit 0) & broker=$!\n({learner}) & learner=$!\n({actor}) & actor=$!\n'
    script = f"scancel() {{ :; }}\nRUN={shlex.quote(str(tmp_path))}\nSLURM_JOB_ID=0\n{components}{WATCH.format(grace=5)}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == ends and says in done.stdout, done.stdout + done.stderr
    assert f"streamrl: job ends with exit code {ends}" in done.stdout

"""scripts/slurm_role.py: Slurm's environment -> launch.py arguments, rendezvous and GPU choice."""

from __future__ import annotations

import pytest

from protocol.config import load_config
from scripts.slurm_role import expand_hostlist, het_group, job_ports, plan


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("ci1", ["ci1"]),
        ("ci[1-3]", ["ci1", "ci2", "ci3"]),
        ("gpu[08-11],cpu-a", ["gpu08", "gpu09", "gpu10", "gpu11", "cpu-a"]),
        ("n[1,3-4]x", ["n1x", "n3x", "n4x"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


def slurm_env(**extra: str) -> dict[str, str]:
    """What srun puts in a learner task's environment (as printed by a real het job, trimmed)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "cpu7",
        "SLURM_JOB_NODELIST_HET_GROUP_1": "gpu[03-04]",
        "SLURM_JOB_NODELIST_HET_GROUP_2": "gpu[10-13]",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        **extra,
    }


def test_learner_rank_gets_the_rendezvous_from_slurm():
    config = load_config(None, ["learner.world_size=16", "slurm.learner.nodes=2", "endpoints.broker=x:7000", "endpoints.weights=y:7001", "learner.master_port=7002"])
    args, env = plan("learner", config, slurm_env(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1"))
    assert args == ["--role", "learner", "endpoints.broker=cpu7:7000", "endpoints.weights=gpu03:7001"]
    assert env == {"OMP_NUM_THREADS": "1", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": "7002"}


def test_single_rank_learner_sets_no_rank_and_a_requeued_job_resumes():
    config = load_config(None, [])
    args, env = plan("learner", config, slurm_env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_RESTART_COUNT="1"))
    assert "RANK" not in env and args[-1] == "--resume"
    args, _ = plan("learner", config, slurm_env(SLURM_PROCID="0", SLURM_NTASKS="1"))
    assert "--resume" not in args
    args, _ = plan("learner", config, slurm_env(SLURM_PROCID="0", SLURM_NTASKS="1"), resume=True)
    assert args[-1] == "--resume"


def test_actor_index_is_its_task_and_it_gets_one_gpu():
    config = load_config(None, ["actor.count=16", "slurm.actors.nodes=2", "slurm.actors.gpus_per_node=8", "actor.threads=4"])
    args, env = plan("actor", config, slurm_env(SLURM_PROCID="11", SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"))
    assert args[-2:] == ["--index", "11"]
    assert env == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "3"}
    _, env = plan("actor", config, slurm_env(SLURM_PROCID="11", SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert env["CUDA_VISIBLE_DEVICES"] == "7"
    _, env = plan("actor", config, slurm_env(SLURM_PROCID="2", SLURM_LOCALID="2"))  # no GRES: Slurm set nothing
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    _, env = plan("actor", load_config(None, []), slurm_env(SLURM_PROCID="0"))  # CPU actors: no GPU choice
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_ports_from_the_job_id_differ_between_jobs():
    config = load_config(None, ["slurm.ports=job_id"])
    args, _ = plan("broker", config, slurm_env(SLURM_PROCID="0"))
    broker, weights, master = job_ports(4242)
    assert args[2:] == [f"endpoints.broker=cpu7:{broker}", f"endpoints.weights=gpu03:{weights}"]
    assert len({broker, weights, master}) == 3 and all(1024 < p < 65536 for p in (broker, weights, master))
    assert not set(job_ports(4242)) & set(job_ports(4243))


def test_het_group_is_read_from_the_node_lists():
    assert het_group(slurm_env()) == "1"
    assert het_group({"SLURM_JOB_NODELIST": "elsewhere"}) == "?"

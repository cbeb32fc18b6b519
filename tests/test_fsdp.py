"""FSDP2 on CPU (gloo): 2 ranks train exactly what 1 rank trains, through the real learner process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from learner.backend import FSDPBackend
from learner.checkpoint import restore_trainer, save_checkpoint
from learner.main import load_model
from learner.trainer import Trainer
from protocol.config import LearnerSection, load_config
from protocol.transport import free_port
from protocol.weights import allocate
from tests.helpers import make_groups, start_role
from tests.test_resume import GROUPS, SETTINGS, STEPS, feed

pytestmark = pytest.mark.slow


def train(run_dir, endpoints, *extra):
    run_dir.mkdir()
    broker = start_role("broker", run_dir, endpoints, *SETTINGS)
    learner = None
    try:
        feed(endpoints["broker"], range(GROUPS))
        learner = start_role("learner", run_dir, endpoints, *SETTINGS, "train.lr=0.001", *extra)
        assert learner.wait(timeout=300) == 0, (run_dir / "learner.log").read_text()[-3000:]
        assert broker.wait(timeout=60) == 0
    finally:
        for p in (broker, learner):
            if p is not None and p.poll() is None:
                p.kill()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


@pytest.mark.parametrize(
    "micro",
    [["train.micro_batch_size=3"], ["train.micro_batch_tokens=30"], ["loss.kl_coef=0.5", "train.micro_batch_size=3"]],
    ids=["padded", "packed", "kl"],
)
def test_two_ranks_match_one_rank(tmp_path, endpoints, micro):
    single, single_weights = train(tmp_path / "one", endpoints, *micro)
    double, double_weights = train(tmp_path / "two", endpoints, "learner.world_size=2", f"learner.master_port={29400 + len(micro[0])}", *micro)
    assert [r["step"] for r in double] == list(range(1, STEPS + 1))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["completion_tokens"] == a["completion_tokens"] and b["trained_samples"] == a["trained_samples"]
    assert set(single_weights) == set(double_weights)
    # with the KL term, a few weights whose gradients are near zero differ by up to 6e-5: AdamW divides
    # the ranks' slightly different roundings by a tiny second moment
    atol = 1e-4 if "kl" in micro[0] else 2e-5
    for name, tensor in single_weights.items():
        np.testing.assert_allclose(double_weights[name], tensor, atol=atol, rtol=0, err_msg=name)
    assert "started 2 FSDP ranks" in (tmp_path / "two" / "learner.log").read_text()
    if "kl" in micro[0]:  # the sharded reference's KL term entered the loss: it moved off zero
        assert max(r["kl_mean"] for r in double) > 1e-6


def on_ranks(target, *args, ranks: int = 2) -> list[dict]:
    """Run `target(rank, port, *args, results)` as two spawned gloo ranks (or `ranks`); what each put in `results`.

    Spawned also for one rank: a vLLM engine another test built in this process holds torch's default process group.
    """
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, results)) for rank in range(ranks)]
    for proc in procs:
        proc.start()
    try:
        got = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
    finally:  # a rank that died early leaves the other waiting in a collective
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    return got


def _gather_on_rank(rank: int, port: int, model_dir, results) -> None:
    """One FSDP rank: shard the tiny model, gather it on rank 0 into tensors a sender's `stage` handed out."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = FSDPBackend(LearnerSection(world_size=2))
    try:
        model = backend.wrap(load_model(model_dir))
        handed_out: dict[str, torch.Tensor] = {}

        def stage(specs):
            handed_out.update(allocate(specs))
            return dict(handed_out)

        state = backend.full_state_dict(model, stage if rank == 0 else None)
        if rank == 0:
            reference = load_model(model_dir).state_dict()
            results.put({
                "names": sorted(state) == sorted(reference),
                "staged": sorted(handed_out),
                "equal": all(torch.equal(state[n], reference[n].float()) for n in reference),
                "in_place": all(any(state[n] is t for t in handed_out.values()) for n in state),
                "tied": state["lm_head.weight"] is state["model.embed_tokens.weight"],
            })  # fmt: skip
        else:
            results.put({"empty": state == {}})
    finally:
        backend.close()


def test_sharded_weights_are_gathered_straight_into_the_staged_tensors(tiny_model_dir):
    """Two gloo ranks: rank 0 gets the exact unsharded weights in the tensors `stage` gave it, tied ones once."""
    got = on_ranks(_gather_on_rank, tiny_model_dir)
    main = next(r for r in got if "names" in r)
    assert {"empty": True} in got
    assert main["names"] and main["equal"] and main["in_place"] and main["tied"]
    assert "lm_head.weight" not in main["staged"] and "model.embed_tokens.weight" in main["staged"]  # asked for once


def _reference_on_rank(rank: int, port: int, model_dir, results) -> None:
    """One FSDP rank: the frozen KL reference, sharded; its logits against the unsharded model's."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = FSDPBackend(LearnerSection(world_size=2))
    try:
        reference, plain = backend.wrap_frozen(load_model(model_dir)), load_model(model_dir).eval()
        ids = torch.arange(1, 17).reshape(2, 8)
        with torch.no_grad():
            got, want = reference(input_ids=ids).logits, plain(input_ids=ids).logits
        results.put({
            "close": torch.allclose(got, want, atol=1e-5),
            "held": sum(p.to_local().numel() for p in reference.parameters()) / sum(p.numel() for p in plain.parameters()),
            "frozen": not reference.training and not any(p.requires_grad for p in reference.parameters()),
        })  # fmt: skip
    finally:
        backend.close()


def test_the_kl_reference_is_sharded_across_ranks(tiny_model_dir):
    """Two gloo ranks: each holds about half of the frozen reference, and it computes the unsharded model's logits."""
    for rank in on_ranks(_reference_on_rank, tiny_model_dir):
        assert rank["close"] and rank["frozen"]
        assert 0.45 < rank["held"] < 0.55, rank["held"]


def _updates_on_rank(rank: int, port: int, model_dir, results) -> None:
    """One FSDP rank: a step of four updates whose mini-batches split unevenly over the ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = FSDPBackend(LearnerSection(world_size=2))
    try:
        model = load_model(model_dir)
        groups = make_groups(model, num_groups=3, n=4)
        metrics = Trainer(backend.wrap(model), load_config(None, UPDATES), None, backend).step(groups)
        results.put({"rank": rank, "loss": metrics["loss"], "updates": metrics["optimizer_steps"]})
    finally:
        backend.close()


UPDATES = ["train.updates_per_step=4", "train.micro_batch_size=2", "train.lr=0.001"]


def _resume_on_rank(rank: int, port: int, checkpoint, results) -> None:
    """One FSDP rank: resume from a one-process checkpoint; rank 0 reports the gathered Adam state against the saved one."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = FSDPBackend(LearnerSection(world_size=2))
    try:
        trainer = Trainer(backend.wrap(load_model(checkpoint)), load_config(None, UPDATES), None, backend)
        restored = restore_trainer(trainer, checkpoint)
        gathered = backend.optimizer_state(trainer.model, trainer.optimizer).get("state")  # collective; rank 0 holds it
        if rank == 0:
            saved = torch.load(checkpoint / "trainer.pt", weights_only=True)["optimizer"]["state"]
            names = [name for name, _ in load_model(checkpoint).named_parameters()]
            same = all(torch.equal(gathered[names[i]][key], value) for i, moments in saved.items() for key, value in moments.items())
            results.put({"restored": tuple(restored), "same": same, "count": len(gathered)})
        else:
            results.put({"restored": tuple(restored)})
    finally:
        backend.close()


def test_a_one_process_checkpoint_resumes_on_ranks(tiny_model_dir, tmp_path):
    """Found by a helper's hunt: a one-process learner saves its optimizer state keyed by parameter index, FSDP's
    loader wants names: a run resumed with more ranks failed on every rank with KeyError 'state.0.step'."""
    trainer = Trainer(load_model(tiny_model_dir), load_config(None, UPDATES))
    trainer.step(make_groups(trainer.model, num_groups=3, n=4))
    checkpoint = save_checkpoint(tmp_path, 1, trainer, tiny_model_dir, batch_id=3)
    got = on_ranks(_resume_on_rank, checkpoint)
    assert all(rank["restored"] == (1, 1, 3) for rank in got)
    main = next(rank for rank in got if "same" in rank)
    assert main["same"] and main["count"] == len(list(trainer.model.parameters()))


def test_several_updates_per_step_on_two_ranks_match_one_rank(tiny_model_dir):
    """Found by a helper's hunt: the proximal log-probs were spread over the ranks unlike the updates' samples,
    so a rank asked for ones it never computed (KeyError) whenever a mini-batch had an odd length."""
    model = load_model(tiny_model_dir)
    single = Trainer(model, load_config(None, UPDATES)).step(make_groups(load_model(tiny_model_dir), num_groups=3, n=4))
    for rank in on_ranks(_updates_on_rank, tiny_model_dir):
        assert rank["updates"] == single["optimizer_steps"] == 4
        assert rank["loss"] == pytest.approx(single["loss"], abs=1e-5)


def alone(overrides: list[str]) -> tuple:
    """In a spawned process: the config and the FSDP backend of a learner of its own (no RANK, no rendezvous)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    config = load_config(None, overrides)
    return config, FSDPBackend(config.learner)


def _steps_alone(_rank: int, _port: int, model_dir, results) -> None:
    """A learner of its own (no RANK, no rendezvous) trains two steps of four updates under FSDP."""
    config, backend = alone(UPDATES)
    try:
        trainer = Trainer(backend.wrap(load_model(model_dir)), config, backend=backend)
        syncs: list[bool] = []
        reduce_gradients = backend.reduce_gradients
        backend.reduce_gradients = lambda model, now: syncs.append(now) or reduce_gradients(model, now)
        metrics = [trainer.step(groups) for groups in two_batches(model_dir)]
        weights = {k: v.numpy().copy() for k, v in backend.full_state_dict(trainer.model).items()}  # tensors would pass as fds
        results.put({"metrics": metrics, "syncs": syncs, "weights": weights})
    finally:
        backend.close()


def two_batches(model_dir) -> list:
    return [make_groups(load_model(model_dir), num_groups=3, n=4, seed=seed) for seed in (0, 1)]


def test_one_rank_of_its_own_trains_what_one_process_trains(tiny_model_dir):
    """A learner alone on a GPU runs FSDP for its bf16 mixed precision, with no ranks to meet (no port), and
    its micro-batches before an update's last only accumulate gradients. Checked here on CPU, in fp32, over
    two steps of four updates (each update's parameters must be gathered afresh)."""
    torch.set_num_threads(1)
    plain = Trainer(load_model(tiny_model_dir), load_config(None, UPDATES))
    expected = [plain.step(groups) for groups in two_batches(tiny_model_dir)]
    (got,) = on_ranks(_steps_alone, tiny_model_dir, ranks=1)
    pattern = "".join("T" if now else "F" for now in got["syncs"])  # each update reduces at its last micro-batch only
    assert re.fullmatch("(F*T)+", pattern) and "F" in pattern, pattern
    for a, b in zip(expected, got["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for name, tensor in plain.model.state_dict().items():
        np.testing.assert_allclose(got["weights"][name], tensor.numpy(), atol=2e-6, rtol=0, err_msg=name)


def _checkpoint_alone(_rank: int, _port: int, model_dir, out_dir, results) -> None:
    """A learner of its own under FSDP trains a step and saves a checkpoint."""
    config, backend = alone(UPDATES)
    try:
        trainer = Trainer(backend.wrap(load_model(model_dir)), config, backend=backend)
        trainer.step(make_groups(load_model(model_dir), num_groups=3, n=4))
        results.put({"checkpoint": save_checkpoint(out_dir, 1, trainer, model_dir, batch_id=3)})
    finally:
        backend.close()


def test_a_sharded_checkpoint_resumes_in_one_process(tiny_model_dir, tmp_path):
    """FSDP saves its optimizer state keyed by parameter name; a one-process learner (a sharded or GPU run
    resumed on a CPU) loads it, since torch's optimizer matches parameters by position."""
    (got,) = on_ranks(_checkpoint_alone, tiny_model_dir, tmp_path, ranks=1)
    checkpoint = got["checkpoint"]
    saved = torch.load(checkpoint / "trainer.pt", weights_only=True)["optimizer"]["state"]
    resumed = Trainer(load_model(checkpoint), load_config(None, UPDATES))
    assert tuple(restore_trainer(resumed, checkpoint)) == (1, 1, 3)
    names = [name for name, _ in resumed.model.named_parameters()]
    state = resumed.optimizer.state_dict()["state"]
    assert len(state) == len(saved) == len(names)
    assert all(torch.equal(state[i][key], saved[names[i]][key]) for i in state for key in ("exp_avg", "exp_avg_sq"))

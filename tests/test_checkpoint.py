"""Checkpoints load as plain HF folders and resume training bit-exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.checkpoint import check_resumable, latest_checkpoint, restore_trainer, save_checkpoint
from learner.main import load_model
from learner.trainer import Trainer, lr_factor
from protocol.config import load_config
from protocol.errors import ResumeMismatch
from tests.conftest import ROOT
from tests.helpers import make_groups

OVERRIDES = ["train.lr=0.01", "train.warmup_steps=2", "train.lr_schedule=cosine", "train.steps=4", "train.micro_batch_size=3"]


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    config = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    batches = [make_groups(load_model(tiny_model_dir), seed=s) for s in range(4)]

    straight = Trainer(load_model(tiny_model_dir), config)
    straight_losses = [straight.step(b)["loss"] for b in batches]

    first = Trainer(load_model(tiny_model_dir), config)
    losses = [first.step(b)["loss"] for b in batches[:2]]
    save_checkpoint(tmp_path, 2, first, tiny_model_dir, batch_id=7)
    del first
    checkpoint = latest_checkpoint(tmp_path)
    resumed = Trainer(load_model(checkpoint), config)
    assert restore_trainer(resumed, checkpoint) == (2, 2, 7)  # step, policy version, batch id
    losses += [resumed.step(b)["loss"] for b in batches[2:]]

    assert losses == straight_losses
    assert resumed.lr == straight.lr
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_resumed_run_trains_with_the_lr_and_weight_decay_of_its_config(tiny_model_dir, tmp_path, caplog):
    """A user lowering train.lr to resume a run that diverged got the checkpoint's: the schedule's base values came
    from the optimizer state. The schedule's position still comes from the checkpoint."""
    torch.manual_seed(0)
    batches = [make_groups(load_model(tiny_model_dir), seed=s) for s in range(2)]
    first = Trainer(load_model(tiny_model_dir), load_config(None, OVERRIDES))
    for batch in batches:
        first.step(batch)
    checkpoint = save_checkpoint(tmp_path, 2, first, tiny_model_dir)
    lowered = load_config(None, [*OVERRIDES, "train.lr=0.002", "train.weight_decay=0.3"])
    straight = Trainer(load_model(tiny_model_dir), lowered)
    for batch in batches:
        straight.step(batch)
    resumed = Trainer(load_model(checkpoint), lowered)
    restore_trainer(resumed, checkpoint)
    assert resumed.lr == straight.lr == 0.002 * lr_factor(resumed.scheduler.last_epoch, lowered.train, total=4)
    assert resumed.scheduler.get_last_lr() == [resumed.lr]  # what a logger or a user reading the schedule sees
    assert {g["weight_decay"] for g in resumed.optimizer.param_groups} == {0.3}
    assert "resuming with train.lr 0.002 and weight_decay 0.3 (the checkpoint's: 0.01" in caplog.text
    resumed.step(batches[0])  # the next update's lr follows the schedule from the new base
    straight.step(batches[0])
    assert resumed.lr == straight.lr


def test_a_checkpoint_of_another_model_is_refused_before_training(tiny_model_dir, tmp_path, caplog):
    """The learner trained the checkpoint's weights while the actors and the KL reference loaded the new model.path."""
    trainer = Trainer(load_model(tiny_model_dir), load_config(None, []))
    save_checkpoint(tmp_path / "run", 2, trainer, tiny_model_dir)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers + 1}))
    with pytest.raises(ResumeMismatch, match=r"another model than model.path .*num_hidden_layers"):
        check_resumable(latest_checkpoint(tmp_path / "run"), other)
    # the learner says so and exits 2 before it asks a broker for anything (none is running)
    role = [sys.executable, "launch.py", "--role", "learner", "--resume", f"run.dir={tmp_path / 'run'}", f"model.path={other}"]
    for ranks in ([], ["learner.world_size=2"]):  # with FSDP ranks the parent says so before it starts them
        done = subprocess.run([*role, *ranks], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and f"num_hidden_layers {layers} there, {layers + 1} here" in done.stderr, done.stderr[-2000:]
    moved = tmp_path / "moved-model"  # the same model at another path is resumed, with a warning
    shutil.copytree(tiny_model_dir, moved)
    check_resumable(latest_checkpoint(tmp_path / "run"), moved)
    assert f"was trained from {tiny_model_dir.resolve()}, model.path is now {moved}" in caplog.text


def test_a_model_that_keeps_its_sizes_in_a_text_config_is_compared_too(tmp_path):
    """Gemma 3 and vision-language models nest their sizes; only the top-level keys were compared."""
    def folder(name: str, layers: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        config = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "num_hidden_layers": layers}, "vision_config": {"hidden_size": 32}}
        (path / "config.json").write_text(json.dumps(config))
        (path / "trainer_state.json").write_text(json.dumps({"step": 1, "model_path": str(path)}))
        return path

    check_resumable(folder("checkpoint", 4), folder("same", 4))
    with pytest.raises(ResumeMismatch, match=r"text_config.num_hidden_layers 4 there, 6 here"):
        check_resumable(tmp_path / "checkpoint", folder("deeper", 6))


def test_a_checkpoint_keeps_its_policy_version_apart_from_its_step(tiny_model_dir, tmp_path):
    """After a resume moved versions ahead of steps (learner/main.py: rising_version), a later resume must go on
    from the version, or versions would restart lower again."""
    trainer = Trainer(load_model(tiny_model_dir), load_config(None, []))
    path = save_checkpoint(tmp_path, 2, trainer, tiny_model_dir, batch_id=7, version=9)
    assert restore_trainer(Trainer(load_model(path), load_config(None, [])), path) == (2, 9, 7)


def test_only_the_newest_checkpoints_are_kept_when_asked(tiny_model_dir, tmp_path):
    """Each checkpoint holds the model and Adam's moments (1.6 GB at 135M parameters): checkpoint_every 1 filled the disk."""
    trainer = Trainer(load_model(tiny_model_dir), load_config(None, []))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000099.tmp").mkdir()  # a save that was killed half-way is not a checkpoint
    for leftover in ("step_000001.tmp", "step_000002.old"):  # what saves killed half-way left: each a whole model
        (tmp_path / "checkpoints" / leftover).mkdir()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, trainer, tiny_model_dir, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000004", "step_000099.tmp"]
    save_checkpoint(tmp_path, 5, trainer, tiny_model_dir)  # keep None: every one stays
    assert latest_checkpoint(tmp_path).name == "step_000005" and (tmp_path / "checkpoints" / "step_000003").exists()
    # a review found the newest steps were kept, not the newest saves: in a folder holding a later run's
    # checkpoints (started by hand without --resume) the one just saved was deleted at once
    for step in (100, 200):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir()
    save_checkpoint(tmp_path, 6, trainer, tiny_model_dir, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000005", "step_000006", "step_000099.tmp", "step_000100", "step_000200"]


def test_checkpoint_is_a_loadable_hf_folder_and_latest_ignores_partial_ones(tiny_model_dir, tmp_path):
    config = load_config(None, [])
    trainer = Trainer(load_model(tiny_model_dir), config)
    save_checkpoint(tmp_path, 3, trainer, tiny_model_dir)
    path = save_checkpoint(tmp_path, 12, trainer, tiny_model_dir)
    (tmp_path / "checkpoints" / "step_000099.tmp").mkdir()  # a save that was killed half-way
    assert latest_checkpoint(tmp_path) == path
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 12
    assert (path / "tokenizer.json").exists() and (path / "trainer.pt").exists()
    reloaded = load_model(path)
    for a, b in zip(trainer.model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tiny_model_dir, tmp_path, monkeypatch):
    """Found by a helper's hunt: nothing was fsynced, while the broker durably records the step's batch as consumed
    once the next request acknowledges it; after a power loss the batch was gone and the checkpoint torn."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    path = save_checkpoint(tmp_path, 5, Trainer(load_model(tiny_model_dir), load_config(None, [])), tiny_model_dir)
    renamed = events.index(("rename", str(path)))
    synced_before = {p for kind, p in events[:renamed] if kind == "fsync"}
    tmp = str(path) + ".tmp"
    assert {f"{tmp}/{p.name}" for p in path.iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(path.parent)) in events[renamed:]


def test_a_learner_killed_while_replacing_an_older_runs_checkpoint_leaves_a_whole_one(tiny_model_dir, tmp_path, monkeypatch):
    """A run started by hand in a folder holding an older run's step_N deleted that folder before renaming the new
    one into place: killed during the delete, it left half a step_N, which resume then picked."""
    trainer = Trainer(load_model(tiny_model_dir), load_config(None, []))
    save_checkpoint(tmp_path, 2, trainer, tiny_model_dir)  # the older run's
    real_rmtree = shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        path = Path(path)
        if path.exists() and not path.name.endswith(".tmp"):
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt("killed while deleting")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("learner.checkpoint.shutil.rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, trainer, tiny_model_dir, batch_id=9)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000002" and (latest / "model.safetensors").exists()
    assert restore_trainer(Trainer(load_model(latest), load_config(None, [])), latest).batch_id == 9  # the new one


def test_a_checkpoint_carries_every_tokenizer_file_the_model_has(tiny_model_dir, tmp_path):
    """Found by a helper's hunt: SentencePiece (tokenizer.model) and BPE (vocab.json, merges.txt) files were left out."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    extra = {"tokenizer.model": b"sp", "vocab.json": b"{}", "merges.txt": b"#version", "added_tokens.json": b"{}"}
    for name, data in extra.items():
        (model_dir / name).write_bytes(data)
    path = save_checkpoint(tmp_path, 1, Trainer(load_model(model_dir), load_config(None, [])), model_dir)
    assert {name: (path / name).read_bytes() for name in extra} == extra

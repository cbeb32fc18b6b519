"""Checkpoints: a loadable Hugging Face folder plus everything needed to resume exactly.

`checkpoints/step_N/` holds the policy (safetensors, config, tokenizer) so that
`from_pretrained` loads it as is, `trainer.pt` (optimizer, LR schedule and RNG
state) and `trainer_state.json` (step and policy version). It is written into
`step_N.tmp`, fsynced, and renamed (an older run's `step_N` is moved aside first, and
deleted only once the new one is in place), so neither a learner killed mid-save nor a
power loss leaves half a checkpoint that resume would pick: the next batch request
acknowledges this step's batch to the broker, which then never serves it again.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from learner.trainer import Trainer
from protocol.errors import ResumeMismatch
from protocol.files import checkpoints, fsync_path
from protocol.weights import unique_tensors

log = logging.getLogger("learner.checkpoint")
_LEFTOVER = re.compile(r"step_(\d+)\.(tmp|old)")  # what a save killed half-way leaves

TOKENIZER_FILES = (  # whichever the model has: fast (tokenizer.json), SentencePiece (tokenizer.model), BPE (vocab + merges)
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip
SHAPE_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "tie_word_embeddings")  # fmt: skip


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainer: Trainer,
    model_dir: Path,
    batch_id: int | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    version: int | None = None,
    keep: int | None = None,
) -> Path:
    """Every rank calls this (gathering sharded state is collective); the main rank writes.

    `weights` is the full state dict if the caller already gathered it. `batch_id` is
    the broker batch trained at `step`: a resumed learner acknowledges it, so it is
    never re-served. `version` is the policy version of these weights (`step` unless a
    resume moved versions ahead of steps). `keep`: how many of the newest checkpoints stay (None: all).
    """
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    weights = weights if weights is not None else trainer.backend.full_state_dict(trainer.model)
    state = {**trainer.state_dict(), "rng": torch.get_rng_state()}
    if not trainer.backend.is_main:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(unique_tensors(weights), tmp / "model.safetensors", metadata={"format": "pt"})
    trainer.model.config.save_pretrained(tmp)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, tmp / name)
    torch.save(state, tmp / "trainer.pt")
    meta = {"step": step, "policy_version": step if version is None else version, "batch_id": batch_id, "model_path": str(model_dir.resolve())}
    (tmp / "trainer_state.json").write_text(json.dumps(meta))
    for path in (*tmp.iterdir(), tmp):
        fsync_path(path)
    older = final.with_name(final.name + ".old")  # an older run's step_N, whole until this one is in place
    shutil.rmtree(older, ignore_errors=True)
    if final.exists():
        final.rename(older)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(older, ignore_errors=True)
    if keep is not None:
        _prune(run_dir, step, keep)
    return final


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Delete the checkpoints before `step` beyond the newest `keep` (counting `step`'s), and what killed saves
    before `step` left (`step_K.tmp`, `step_K.old`); later steps (another run's, in a folder reused without
    --resume) are not this run's to delete. A failed delete is only logged."""
    older = [path for s, path in checkpoints(run_dir) if s < step]
    leftovers = [path for path in (run_dir / "checkpoints").glob("step_*.*") if (m := _LEFTOVER.fullmatch(path.name)) and int(m[1]) < step]
    for path in older[: max(0, len(older) - (keep - 1))] + leftovers:
        try:
            shutil.rmtree(path)
        except OSError as err:
            log.warning("could not delete the old checkpoint %s: %s", path, err)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def check_resumable(checkpoint: Path, model_dir: Path) -> None:
    """Refuse a checkpoint of another model than `model_dir`'s (ResumeMismatch), and warn when the same model now
    comes from another path: the learner trains the checkpoint's weights, while the actors, the tokenizer and the
    KL reference load `model_dir`."""
    ours, theirs = (_shape(json.loads((folder / "config.json").read_text())) for folder in (checkpoint, model_dir))
    differ = [key for key in ours if key in theirs and ours[key] != theirs[key]]
    if differ:
        detail = ", ".join(f"{key} {ours[key]!r} there, {theirs[key]!r} here" for key in differ)
        raise ResumeMismatch(f"{checkpoint} is a checkpoint of another model than model.path {model_dir} ({detail}): "
                             "resume with the model it was trained from, or start a new run.dir")  # fmt: skip
    trained_from = json.loads((checkpoint / "trainer_state.json").read_text()).get("model_path")
    if trained_from is not None and Path(trained_from) != model_dir.resolve():
        log.warning("%s was trained from %s, model.path is now %s: the KL reference and tokenizer come from the latter",
                    checkpoint, trained_from, model_dir)  # fmt: skip


def _shape(config: dict) -> dict:
    """The SHAPE_KEYS a model's config.json has, with those of its sub-models' configs (`text_config`,
    `vision_config`: Gemma 3, vision-language models keep their sizes there) under dotted names."""
    shape = {key: config[key] for key in SHAPE_KEYS if key in config}
    for name, sub in config.items():
        if name.endswith("_config") and isinstance(sub, dict):
            shape.update({f"{name}.{key}": value for key, value in _shape(sub).items()})
    return shape


def checkpoint_to_resume(run_dir: Path, model_dir: Path) -> Path | None:
    """The latest checkpoint in `run_dir` (None if there is none), once `check_resumable` let it through."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, model_dir)
    return checkpoint


class Restored(NamedTuple):
    step: int
    version: int  # the policy version of the checkpoint's weights
    batch_id: int | None  # the broker batch trained at `step`


def restore_trainer(trainer: Trainer, checkpoint: Path) -> Restored:
    """Load optimizer, schedule and RNG state into `trainer` (whose model came from `checkpoint`)."""
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    torch.set_rng_state(state.pop("rng"))
    trainer.load_state_dict(state)
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    return Restored(int(meta["step"]), int(meta.get("policy_version", meta["step"])), meta.get("batch_id"))

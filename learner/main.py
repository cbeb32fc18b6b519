"""The learner role: pull batches from the broker, train, publish weights, log metrics, checkpoint.

Each step's batch is acknowledged in the next request, so the broker re-serves a
batch the learner never confirmed. Each step moves the policy version on by one
(from 0, or from where a resume starts: see `rising_version`); the new weights are
published before the broker hears of the version, so an actor that sees version k
can always fetch it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.backend import Backend, make_backend
from learner.batch import regroup
from learner.checkpoint import Restored, checkpoint_to_resume, restore_trainer, save_checkpoint
from learner.metrics_log import MetricsLog
from learner.trainer import Trainer
from learner.weights import make_weight_sender
from protocol import messages as m
from protocol.config import RunConfig
from protocol.curve import curve_keys_dir
from protocol.errors import PeerRefused, RoleFailed
from protocol.memory import LEARNER_TRIM_BYTES, keep_freed_memory
from protocol.sample import Sample
from protocol.transport import Client
from protocol.weights import WeightSender
from protocol.wire import samples_from

log = logging.getLogger("learner")
POLL_S = 0.05
MAX_REFUSALS = 5  # ERROR replies in a row before the learner gives up
REFUSED_PAUSE_S = 1.0


def load_model(model_dir: Path, attention: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    model.train()
    return model


def batch_metrics(groups: list[list[Sample]], version: int) -> dict[str, Any]:
    """What the batch says about the actors: reward, accuracy, and how stale the samples were."""
    samples = [s for g in groups for s in g]
    lags = np.array([version - s.version_start for s in samples])
    return {
        "reward_mean": float(np.mean([s.reward for s in samples])),
        "accuracy": float(np.mean([bool(s.metadata.get("correct", False)) for s in samples])),
        "completion_len_mean": float(np.mean([len(s.completion_ids) for s in samples])),
        "samples": len(samples),
        "lag_mean": float(lags.mean()),
        "lag_max": int(lags.max()),
        "lag_counts": np.bincount(np.maximum(lags, 0)).tolist(),  # samples at lag 0, 1, ... (the plot's histogram)
    }


class BatchSource:
    """Asks the broker for B complete groups, acknowledging the previous batch with each request.

    An ERROR reply (the broker is up but refused the request, e.g. its own internal error
    on that one request) is logged, counted in `refusals` and asked again after a pause;
    `MAX_REFUSALS` in a row stop the learner with `RoleFailed` naming the broker's reason,
    since a request refused that often (a malformed one) would be refused forever.
    """

    def __init__(self, client: Client, groups: int, last_batch: int | None = None) -> None:
        self.client = client
        self.groups = groups
        self.last_batch = last_batch
        self.waited_s = 0.0
        self.refusals = 0

    def next(self, version: int, stop: threading.Event) -> tuple[list[list[Sample]], dict[str, Any]] | None:
        started, refused_in_a_row = time.perf_counter(), 0
        while not stop.is_set():
            try:
                kind, body, arrays = self.client.request(
                    m.GET_BATCH, {"groups": self.groups, "policy_version": version, "ack_batch": self.last_batch, "wait_ms": 1000}
                )
            except TimeoutError as err:
                log.warning("broker not answering: %s", err)
                continue
            except PeerRefused as err:
                self.refusals += 1
                refused_in_a_row += 1
                log.error("batch request refused (%d so far): %s", self.refusals, err)
                if refused_in_a_row >= MAX_REFUSALS:
                    raise RoleFailed(f"the broker refused {refused_in_a_row} batch requests in a row; the last: {err}") from err
                stop.wait(REFUSED_PAUSE_S)
                continue
            refused_in_a_row = 0
            if kind == m.BATCH:
                self.last_batch = body["batch_id"]
                self.waited_s = time.perf_counter() - started
                samples = [s for s in samples_from(body, arrays, None) if isinstance(s, Sample)]
                return regroup(samples), body["stats"]
            time.sleep(POLL_S)
        return None


def run_learner(config: RunConfig, model_dir: Path, run_dir: Path, stop: threading.Event, resume: bool = False) -> None:
    """Train `train.steps` steps; with `resume`, continue from the latest checkpoint in `run_dir` exactly.

    Under FSDP every rank runs this; only the main rank talks to the broker, publishes
    weights and writes metrics and checkpoints.
    """
    keep_freed_memory(LEARNER_TRIM_BYTES)  # a step's activations are reused the next step, not faulted in again
    backend = make_backend(config.learner)
    try:
        _run(config, model_dir, run_dir, stop, resume, backend)
    finally:
        backend.close()


def _run(config: RunConfig, model_dir: Path, run_dir: Path, stop: threading.Event, resume: bool, backend: Backend) -> None:
    torch.manual_seed(config.run.seed)
    torch.set_num_threads(config.learner.threads)
    checkpoint = checkpoint_to_resume(run_dir, model_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", run_dir / "checkpoints")
    attention = config.learner.attention
    model = backend.wrap(load_model(checkpoint or model_dir, attention))
    reference = None
    if config.loss.kl_coef > 0:
        reference = backend.wrap_frozen(load_model(model_dir, attention))
    trainer = Trainer(model, config, reference, backend)
    start = restore_trainer(trainer, checkpoint) if checkpoint else Restored(0, 0, None)
    client = Client(config.endpoints.broker, f"learner-{uuid.uuid4().hex[:6]}", curve_dir=curve_keys_dir(config)) if backend.is_main else None
    try:
        heard = broker_version(client, stop) if client else None  # None off the main rank, or if stopped first
        version = int(backend.max([-1 if heard is None else rising_version(start.version, heard)])[0])  # the main rank's
        if version < 0:
            return
        first_weights = backend.full_state_dict(model) if version else None  # collective: every rank gathers
        if client is None:
            train_loop(config, trainer, None, None, None, run_dir, model_dir, start.step, version, stop)
            return
        weights = make_weight_sender(config)
        try:
            if version:
                weights.publish(version, first_weights)
                log.info("resumed from %s at policy version %d", checkpoint or model_dir, version)
            source = BatchSource(client, config.train.groups_per_step, start.batch_id)
            with MetricsLog(run_dir, config.run.tensorboard, start.step) as metrics:
                step = train_loop(config, trainer, source, weights, metrics, run_dir, model_dir, start.step, version, stop)
            log.info("stopped at step %d; checkpoints in %s", step, run_dir / "checkpoints")
            if step >= config.train.steps:  # a learner stopped early may be resumed: actors keep waiting for it
                client.request(m.FINISH, {"ack_batch": source.last_batch})
        finally:
            weights.close()
    finally:
        if client is not None:
            client.close()


def broker_version(client: Client, stop: threading.Event) -> int | None:
    """The newest policy version the broker knows of: its own (kept in its log) or one an actor reports
    holding (a broker restarted without its log knows only those); None if stopped first."""
    while not stop.is_set():
        try:
            stats = client.request(m.STATS)[1]
        except TimeoutError as err:
            log.warning("broker not answering: %s", err)
            continue
        held = [c.get("version", 0) for c in stats.get("actor_counters", {}).values()]
        return max([int(stats["policy_version"]), *(v for v in held if type(v) is int)])
    return None


def rising_version(restored: int, heard: int) -> int:
    """The policy version to start at, so that versions only rise across restarts.

    Actors fetch only weights newer than theirs and the broker ignores an older version,
    so weights restored from a checkpoint older than what the broker heard of must not
    reuse a number: that one, and the next (published before the broker hears of it, so
    an actor may hold it), may name weights this learner is discarding. An equal number
    is the same training state (resume is exact, and the step after it is trained again
    on the batch the broker serves again).
    """
    return restored if heard <= restored else heard + 2


def train_loop(
    config: RunConfig,
    trainer: Trainer,
    source: BatchSource | None,
    weights: WeightSender | None,
    metrics: MetricsLog | None,
    run_dir: Path,
    model_dir: Path,
    done: int,
    version: int,
    stop: threading.Event,
) -> int:
    """Steps done+1 .. train.steps, each one policy version on; returns the last step done.

    `source` etc. are None off the main rank.
    """
    started, every, backend = time.time() - (metrics.elapsed_before if metrics else 0.0), config.train.checkpoint_every, trainer.backend
    for step in range(done + 1, config.train.steps + 1):
        got = source.next(version, stop) if source else None
        groups = backend.share(got[0] if got else None)
        if groups is None:
            break
        if weights is not None:
            weights.settle()  # the last version's buckets are packed: the optimizer may change the parameters
        row = {"step": step, **batch_metrics(groups, version), **trainer.step(groups, version)}
        done, version = step, version + 1
        state = backend.full_state_dict(trainer.model, weights.stage if weights is not None else None)  # sharded: straight into the sender's buffers
        if (every and step % every == 0) or step == config.train.steps:
            save_checkpoint(run_dir, step, trainer, model_dir, source.last_batch if source else None, state, version,
                            config.train.keep_checkpoints)  # fmt: skip
        if not backend.is_main:
            continue
        weights.publish(version, state, wait=False)  # packed while the next batch is fetched; actors stream it as it is
        row.update(
            policy_version=version,
            wait_seconds=source.waited_s,
            broker_refusals=source.refusals,
            gen_tokens_per_s=got[1].get("gen_tokens_per_s", 0.0),
            actor_gen_tokens_per_s=got[1].get("actor_gen_tokens_per_s", {}),
            dropped_stale=got[1].get("dropped_stale", 0),
            time=time.time() - started,
        )
        metrics.write(row)
        log.info(
            "step %d/%d reward %.3f acc %.3f loss %.4f lag %.1f gen %.0f tok/s train %.0f tok/s",
            step, config.train.steps, row["reward_mean"], row["accuracy"], row["loss"],
            row["lag_mean"], row["gen_tokens_per_s"], row["train_tokens_per_s"],
        )  # fmt: skip
    return done

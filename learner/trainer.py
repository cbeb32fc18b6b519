"""One learner step: advantages per group, micro-batched forward/backward, AdamW with grad clipping.

The batch is split into `updates_per_step` mini-batches, one optimizer step each.
With a single update the proximal policy *is* the current one before the step, so
its log-probs come from the same forward pass (detached); with several, they are
recomputed once up front, before any weights move.

Samples whose advantage is exactly zero (every sample of a group got the same
reward) add nothing to the gradient unless a KL or entropy term is on, so they are
not run through the model at all; their tokens still count in the aggregate's
normaliser, which keeps the update identical. On CPU this often halves a step.
With `loss.filter_flat_groups` such groups leave the step entirely instead.

Micro-batches hold `train.micro_batch_size` padded sequences, or with
`train.micro_batch_tokens` as many sequences as fit that token budget, packed into
one row (no padding at all). Under FSDP every rank trains its share of each
mini-batch; ranks with fewer micro-batches run zero-weighted ones, because every
rank must take part in every forward and backward.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import fields
from functools import partial

import torch
from torch.distributed.fsdp import FSDPModule

from learner.backend import Backend
from learner.batch import MicroBatch, collate
from learner.loss import (
    LossStats,
    Normalizer,
    flat_groups,
    group_advantages,
    policy_loss,
    to_numbers,
    token_entropy,
    token_logprobs,
)
from learner.parity import ParityStats, parity_stats
from protocol.config import RunConfig, TrainSection
from protocol.memory import LARGEST_MMAP_THRESHOLD
from protocol.sample import Sample

log = logging.getLogger("learner.trainer")
HEAD_CHUNK_BYTES = LARGEST_MMAP_THRESHOLD // 2  # logits per chunk of the LM head: glibc keeps blocks below the threshold on its heap
PLAIN_HEADS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})  # logits = lm_head(last hidden state)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: RunConfig,
        reference: torch.nn.Module | None = None,
        backend: Backend | None = None,
    ) -> None:
        """`model` is already wrapped by `backend`; `reference` is the frozen KL policy (default: a copy of `model`)."""
        self.model = model
        self.backend = backend or Backend()
        self.train = config.train
        self.loss = config.loss
        self.temperature = config.sampling.temperature
        self.max_tokens = config.sampling.max_tokens
        fused = self.backend.device.type == "cuda"  # one kernel per step for all parameters (FSDP2 supports it)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.train.lr, weight_decay=self.train.weight_decay, fused=fused)
        total = self.train.steps * self.train.updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, train=self.train, total=total))
        if self.loss.kl_coef > 0 and reference is None:
            if self.backend.world_size > 1:  # a copy of a sharded model is not a sharded reference
                raise ValueError("with FSDP, pass the KL reference: backend.wrap_frozen(load_model(...))")
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.reference = reference

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Optimizer (unsharded) and schedule; every rank must call it."""
        return {"optimizer": self.backend.optimizer_state(self.model, self.optimizer), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Optimizer moments and the schedule's position from a checkpoint. `train.lr` and `train.weight_decay` come
        from the config, as the schedule's shape does, so that a run resumed with new values trains with them."""
        self.backend.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved = (self.scheduler.base_lrs[0], self.optimizer.param_groups[0]["weight_decay"])
        if saved != (self.train.lr, self.train.weight_decay):
            log.warning("resuming with train.lr %g and weight_decay %g (the checkpoint's: %g and %g)",
                        self.train.lr, self.train.weight_decay, *saved)  # fmt: skip
        self.scheduler.base_lrs = [self.train.lr] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=self.train.lr, lr=self.train.lr * factor, weight_decay=self.train.weight_decay)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() says

    def step(self, groups: list[list[Sample]], version: int | None = None) -> dict[str, float]:
        """One training step on complete groups; `version` (the policy version the weights are at) turns on parity stats."""
        started, lr = time.perf_counter(), self.lr
        rewards = torch.tensor([[s.reward for s in g] for g in groups], dtype=torch.float64)
        flat = flat_groups(rewards)
        if self.loss.filter_flat_groups and not flat.all():
            groups, rewards = [g for g, f in zip(groups, flat) if not f], rewards[~flat]
        advantages = group_advantages(rewards, self.loss.advantage, self.loss.std_normalize).flatten()
        samples = [s for g in groups for s in g]
        regularised = self.loss.kl_coef > 0 or self.loss.entropy_coef > 0
        active = [i for i in range(len(samples)) if regularised or advantages[i] != 0]
        chunks = _split(list(range(len(samples))), self.train.updates_per_step)
        active_set = set(active)
        trained_per_chunk = [[i for i in chunk if i in active_set] for chunk in chunks]
        proximal = self._proximal(samples, trained_per_chunk) if len(chunks) > 1 and self.loss.correction != "none" else {}
        on_policy = {i for i, s in enumerate(samples) if s.version_start == s.version_end == version}
        totals, parity, loss, grad_norm, updates = LossStats(), ParityStats(), 0.0, 0.0, 0
        for chunk, trained in zip(chunks, trained_per_chunk):
            if not trained:
                self._skip_update()
                continue
            norm = Normalizer(sum(len(samples[i].completion_ids) for i in chunk), len(chunk), self.max_tokens)
            # Parity needs log-probs under the pre-step weights: the first update's forward, or the proximal ones.
            compare = on_policy if updates == 0 or proximal else set()
            chunk_loss, stats, chunk_parity, chunk_norm = self._update(samples, advantages, trained, proximal, norm, compare)
            loss, grad_norm, updates = loss + chunk_loss, max(grad_norm, chunk_norm), updates + 1
            totals, parity = totals + stats, parity + chunk_parity
        for _ in range(self.train.updates_per_step - len(chunks)):  # fewer samples than updates: still planned ones
            self._skip_update()
        values = to_numbers([loss, *(getattr(totals, f.name) for f in fields(LossStats))])  # one read from the device
        loss, *sums = self.backend.sum(values)
        totals = LossStats(*sums)
        parity = self._reduce_parity(parity)
        elapsed = time.perf_counter() - started
        per_token = max(totals.tokens, 1)
        return {
            "loss": loss / max(updates, 1),  # each update's loss is a token mean already: their mean, not their sum
            "grad_norm": grad_norm,
            "lr": lr,  # the first update's (the schedule has moved on since)
            "optimizer_steps": updates,
            "is_weight_mean": totals.is_weight_sum / per_token,
            "is_truncated_frac": totals.truncated / per_token,
            "is_masked_frac": totals.masked / per_token,
            "clip_frac": totals.clipped / per_token,
            "kl_mean": totals.kl_sum / per_token,
            "entropy_mean": totals.entropy_sum / per_token,
            "flat_groups": int(flat.sum()),
            "tokens": sum(s.num_tokens for s in samples),
            "completion_tokens": sum(len(s.completion_ids) for s in samples),
            "trained_samples": len(active),
            "train_seconds": elapsed,
            "train_tokens_per_s": sum(samples[i].num_tokens for i in active) / elapsed,
            **parity.metrics(),
        }

    def _skip_update(self) -> None:
        """An update with nothing to learn (only flat groups) still moves the LR schedule on: it is planned
        over `train.steps` x `updates_per_step` updates, and would otherwise end short of its last value."""
        with warnings.catch_warnings():  # torch warns of a schedule stepped before any optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()

    def _reduce_parity(self, parity: ParityStats) -> ParityStats:
        """Every rank's parity stats combined (sums, and the largest difference)."""
        parity = parity.numbers()
        tokens, abs_sum, kl_sum, outside = self.backend.sum([parity.tokens, parity.abs_diff_sum, parity.kl_sum, parity.outside_band])
        (abs_max,) = self.backend.max([parity.abs_diff_max])
        return ParityStats(int(tokens), abs_sum, abs_max, kl_sum, int(outside))

    def _plan(self, samples: list[Sample], indices: list[int]) -> list[list[int]]:
        """This rank's micro-batches of `indices`, padded with [] to the most any rank has."""
        def split(mine: list[int]) -> list[list[int]]:
            if not self.train.micro_batch_tokens:
                size = self.train.micro_batch_size
                return [mine[i : i + size] for i in range(0, len(mine), size)]
            parts, current, used = [], [], 0
            for i in mine:
                if current and used + samples[i].num_tokens > self.train.micro_batch_tokens:
                    parts, current, used = [*parts, current], [], 0
                current, used = [*current, i], used + samples[i].num_tokens
            return [*parts, current] if current else parts

        world = self.backend.world_size
        per_rank = [split(indices[r::world]) for r in range(world)]
        longest = max(len(p) for p in per_rank)
        return per_rank[self.backend.rank] + [[]] * (longest - len(per_rank[self.backend.rank]))

    def _micro_batches(self, samples: list[Sample], advantages: torch.Tensor, indices: list[int]):
        """Yield (the sample indices, their collated micro-batch, weight 0.0 for a filler or 1.0, whether it is the last)."""
        pack = bool(self.train.micro_batch_tokens)
        device = self.backend.device
        plan = self._plan(samples, indices)
        for n, part in enumerate(plan):
            used = part or indices[:1]  # a filler keeps this rank in step with the others' collectives
            batch = collate([samples[i] for i in used], advantages[used], pack=pack).to(device)
            yield part, batch, 1.0 if part else 0.0, n == len(plan) - 1

    @torch.no_grad()
    def _proximal(self, samples: list[Sample], updates: list[list[int]]) -> dict[int, torch.Tensor]:
        """Log-probs under the weights as they are before this step's first update, of each update's samples
        spread over the ranks as that update will spread them: each rank computes the ones it will train."""
        out = {}
        for trained in updates:
            for part, batch, _, _ in self._micro_batches(samples, torch.zeros(len(samples)), trained):
                logprobs, _ = forward_logprobs(self.model, batch, self.temperature)
                out.update({i: logprobs[row].cpu() for row, i in enumerate(part)})
        return out

    def _update(self, samples, advantages, indices, proximal, norm: Normalizer, compare: set[int]) -> tuple[torch.Tensor | float, LossStats, ParityStats, float]:
        """Accumulate gradients over micro-batches of `indices`, then take one clipped optimizer step.

        Samples in `compare` also have their behavior log-probs compared with the pre-step ones (parity).
        """
        total_loss, totals, parity = 0.0, LossStats(), ParityStats()
        for part, batch, weight, last in self._micro_batches(samples, advantages, indices):
            self.backend.reduce_gradients(self.model, now=last)
            logprobs, entropy = forward_logprobs(self.model, batch, self.temperature, entropy=self.loss.entropy_coef > 0)
            if proximal and part:
                prox = _stack_rows([proximal[i] for i in part], logprobs.shape[1]).to(logprobs.device)
            else:
                prox = logprobs.detach()
            reference = None
            if self.reference is not None:
                with torch.no_grad():
                    reference, _ = forward_logprobs(self.reference, batch, self.temperature)
            loss, stats = policy_loss(logprobs, prox, batch.behavior_logprobs, batch.advantages, batch.mask, norm,
                                      self.loss, reference, entropy)  # fmt: skip
            # FSDP averages gradients over ranks; scaling by the world size makes them the batch's sum.
            (loss * weight * self.backend.world_size).backward()
            if part:
                total_loss = total_loss + loss.detach()
                totals += stats
                rows = [r for r, i in enumerate(part) if i in compare]
                parity += parity_stats(prox[rows], batch.behavior_logprobs[rows], batch.mask[rows])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {float(grad_norm)}; refusing to apply the update")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, totals, parity, float(grad_norm)


def forward_logprobs(model: torch.nn.Module, batch: MicroBatch, temperature: float, entropy: bool = False):
    """Per-sequence [B, T] log-probs of the next tokens (and entropies), whatever the row layout.

    The LM head runs only at the positions that predict a completion token (`batch.keep`):
    prompt positions need no logits, and with a large vocabulary the head is most of the cost.
    Other positions read 0; the loss never looks at them (they are outside `batch.mask`).
    """
    rows, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - 1
    targets = batch.input_ids[:, 1:][:, batch.keep]
    kept_logprobs, kept_entropies = _head(model, batch, targets, temperature, entropy)
    logprobs = kept_logprobs.new_zeros((rows, width))
    logprobs[:, batch.keep] = kept_logprobs
    if not entropy:
        return batch.per_sequence(logprobs), None
    entropies = torch.zeros_like(logprobs)
    entropies[:, batch.keep] = kept_entropies
    return batch.per_sequence(logprobs), batch.per_sequence(entropies)


def _head(model: torch.nn.Module, batch: MicroBatch, targets: torch.Tensor, temperature: float, entropy: bool):
    """[B, K] log-probs of `targets` (and entropies) at the kept positions.

    Where the head is a plain linear layer on an unsharded model, it runs over chunks of at
    most `HEAD_CHUNK_BYTES` of logits. glibc then serves every buffer of the head, forward
    and backward, from its heap and reuses it the next step (`keep_freed_memory`), instead of
    mmapping and faulting in the 300 MB pieces of one [B, K, vocab] block each time
    (`bench/e2e.py`'s `train_ms_per_trained_sample`; docs/status.md).
    """
    # No KV cache: training never decodes, and with one the model would not look for packed sequences
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
    if type(model).__name__ not in PLAIN_HEADS or isinstance(model, FSDPModule):  # FSDP: the root's forward unshards
        logits = model(**inputs, logits_to_keep=batch.keep).logits
        return token_logprobs(logits, targets, temperature), token_entropy(logits, temperature) if entropy else None
    hidden = model.model(**inputs).last_hidden_state[:, batch.keep]
    rows = max(1, HEAD_CHUNK_BYTES // (4 * model.lm_head.out_features))
    logprobs, entropies = [], []
    for part, part_targets in zip(hidden.reshape(-1, hidden.shape[-1]).split(rows), targets.reshape(-1).split(rows)):
        logits = model.lm_head(part)
        logprobs.append(token_logprobs(logits, part_targets, temperature))
        if entropy:
            entropies.append(token_entropy(logits, temperature))
    return torch.cat(logprobs).view(targets.shape), torch.cat(entropies).view(targets.shape) if entropy else None


def lr_factor(update: int, train: TrainSection, total: int) -> float:
    """Multiplier of train.lr at optimizer update `update` (0-based): linear warm-up, then constant or cosine."""
    if update < train.warmup_steps:
        return (update + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (update - train.warmup_steps) / max(1, total - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in at most `parts` consecutive runs, none empty, whose sizes differ by one at most: cut by the
    ceiling, 10 samples in 4 updates were 3+3+3+1, a last update on one sample taking a full-size step."""
    parts = min(parts, len(items))
    bounds = [len(items) * k // parts for k in range(parts + 1)] if parts else [0]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _stack_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Right-pad or cut rows computed in other micro-batches to this micro-batch's length."""
    out = torch.zeros((len(rows), length))
    for r, row in enumerate(rows):
        n = min(len(row), length)
        out[r, :n] = row[:n]
    return out

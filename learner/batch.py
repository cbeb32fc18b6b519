"""Turn samples into model inputs, padded or packed, and map the model's log-probs back per sequence.

The loss always sees [B, T] tensors, one row per sequence (position t predicts
token t+1; `mask` marks completion tokens). The forward pass may instead run on
*packed* rows: several sequences concatenated with restarting position ids, so no
compute is spent on padding. A packed row has no attention mask: the model finds the
sequences from where the position ids restart (transformers' packed-sequence
detection) and keeps attention inside each, with whatever attention kernel it runs: a
block-causal mask for SDPA or eager attention (as here on CPU), variable-length
sequences for flash attention on GPUs, never a dense [L, L] mask built here. `gather`
maps each [B, T] position to its place in the flattened forward output either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from protocol.sample import Sample


@dataclass
class MicroBatch:
    input_ids: Tensor  # [R, L]
    attention_mask: Tensor | None  # [R, L] (padded); None when packed (the position ids delimit the sequences)
    position_ids: Tensor | None  # [R, L] when packed
    gather: Tensor  # [B, T] indices into the flattened [R, L-1] next-token outputs
    mask: Tensor  # [B, T]
    behavior_logprobs: Tensor  # [B, T]
    advantages: Tensor  # [B]
    keep: Tensor | None = None  # sorted next-token positions that predict a completion token, any row

    def __post_init__(self) -> None:
        if self.keep is None:  # on the CPU, where collate builds it: on a GPU this would wait for the device
            self.keep = torch.unique(self.gather[self.mask] % (self.input_ids.shape[1] - 1))

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(*(t.to(device) if isinstance(t, Tensor) else t for t in vars(self).values()))

    def per_sequence(self, flat_outputs: Tensor) -> Tensor:
        """[R, L-1] next-token outputs of the forward -> [B, T] aligned with `mask`."""
        return flat_outputs.reshape(-1)[self.gather]


def _per_sequence_targets(samples: list[Sample]) -> tuple[Tensor, Tensor, int]:
    length = max(s.num_tokens for s in samples) - 1
    mask = torch.zeros((len(samples), length), dtype=torch.bool)
    behavior = torch.zeros((len(samples), length), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        mask[row, p - 1 : p + c - 1] = True
        behavior[row, p - 1 : p + c - 1] = torch.from_numpy(s.behavior_logprobs.copy())
    return mask, behavior, length


def _ids(s: Sample) -> Tensor:
    return torch.cat([torch.from_numpy(s.prompt_ids.astype("int64")), torch.from_numpy(s.completion_ids.astype("int64"))])


def collate(samples: list[Sample], advantages: Tensor, pack: bool = False, pad_id: int = 0) -> MicroBatch:
    mask, behavior, length = _per_sequence_targets(samples)
    return (_packed if pack else _padded)(samples, advantages, mask, behavior, length, pad_id)


def _padded(samples, advantages, mask, behavior, length, pad_id) -> MicroBatch:
    input_ids = torch.full((len(samples), length + 1), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), length + 1), dtype=torch.long)
    for row, s in enumerate(samples):
        ids = _ids(s)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
    gather = torch.arange(len(samples) * length).reshape(len(samples), length)
    return MicroBatch(input_ids, attention, None, gather, mask, behavior, advantages)


def _packed(samples, advantages, mask, behavior, length, pad_id) -> MicroBatch:
    pieces = [_ids(s) for s in samples]
    starts = torch.tensor([0, *[len(p) for p in pieces]]).cumsum(0)
    total = int(starts[-1])
    positions = torch.cat([torch.arange(len(p)) for p in pieces])[None]
    # Sequence b's position t (predicting its token t+1) sits at packed output starts[b] + t.
    gather = (starts[:-1, None] + torch.arange(length)[None]).clamp(max=total - 2)
    return MicroBatch(torch.cat(pieces)[None], None, positions, gather, mask, behavior, advantages)


def regroup(samples: list[Sample]) -> list[list[Sample]]:
    """Samples back into their GRPO groups: the broker serves each group's `group_size` samples together.

    Split by position, not by group id: two groups a sender gave one id (a bug, or a hostile
    peer) are two groups of the batch, where merging them made one ragged group that stopped
    the learner's step, and again after every resume (the batch is served again).
    """
    groups, start = [], 0
    while start < len(samples):
        group = samples[start : start + samples[start].group_size]
        if len(group) < group[0].group_size or any(s.group_id != group[0].group_id for s in group):
            raise ValueError(f"batch samples {start}.. do not form a group of {group[0].group_size}: {[s.group_id for s in group]}")
        groups.append(group)
        start += len(group)
    return groups

"""Turn samples into right-padded tensors aligned for next-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from protocol.sample import Sample


@dataclass
class MicroBatch:
    """input_ids/attention_mask: [B, L]. targets, mask, behavior_logprobs: [B, L-1] (position t predicts token t+1)."""

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    mask: Tensor
    behavior_logprobs: Tensor
    advantages: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: list[Sample], advantages: Tensor, pad_id: int = 0) -> MicroBatch:
    length = max(s.num_tokens for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length - 1), dtype=torch.bool)
    behavior = torch.zeros((batch, length - 1), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        input_ids[row, :p] = torch.from_numpy(s.prompt_ids.astype("int64"))
        input_ids[row, p : p + c] = torch.from_numpy(s.completion_ids.astype("int64"))
        attention[row, : p + c] = 1
        mask[row, p - 1 : p + c - 1] = True
        behavior[row, p - 1 : p + c - 1] = torch.from_numpy(s.behavior_logprobs.copy())
    return MicroBatch(input_ids, attention, input_ids[:, 1:], mask, behavior, advantages)

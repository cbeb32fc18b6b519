"""GRPO with off-policy correction, as pure functions on tensors.

Shapes: G groups of n samples; B = G * n sequences; T target positions. Token
tensors are aligned so position t holds the log-probability of token t+1; `mask`
marks completion tokens, and everything else (prompt, padding) contributes nothing.

Three policies meet here. `behavior` produced the tokens (the actor's vLLM, maybe
some versions old); `proximal` is the learner's policy before this update (the
trust-region anchor); `current` is what is being optimised. The loss is the PPO
clipped surrogate of current vs proximal, weighted per token by the truncated
importance weight min(pi_prox / pi_behavior, C) (decoupled PPO with TIS). When
behavior == proximal == current it is exactly the GRPO policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """[G, n] rewards -> [G, n] advantages: reward minus its group mean, optionally over the group std."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    return centered


@dataclass
class LossStats:
    """Sums over completion tokens, so micro-batches add up exactly."""

    is_weight_sum: float = 0.0
    truncated: int = 0
    clipped: int = 0
    tokens: int = 0

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """[B, T, V] logits and [B, T] targets -> [B, T] log p(target), at the sampling temperature."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def grpo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    normalizer: float,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    tis_cap: float = 2.0,
) -> tuple[Tensor, LossStats]:
    """Sum of per-token losses over `mask` divided by `normalizer` (the token count of the whole batch).

    logprobs, proximal_logprobs, behavior_logprobs, mask: [B, T]; advantages: [B].
    Dividing by the global token count, not this micro-batch's, keeps gradient
    accumulation over micro-batches equal to one token-mean over the batch.
    """
    mask = mask.bool()
    # Zero the log-ratios off the mask first, so padding can't produce inf * 0 = NaN gradients.
    ratio = torch.exp(torch.where(mask, logprobs - proximal_logprobs.detach(), 0.0))
    raw_weight = torch.exp(torch.where(mask, proximal_logprobs.detach() - behavior_logprobs, 0.0))
    is_weight = raw_weight.clamp(max=tis_cap)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -is_weight * torch.minimum(unclipped, clipped)
    loss = torch.where(mask, per_token, 0.0).sum() / normalizer
    with torch.no_grad():
        stats = LossStats(
            is_weight_sum=float(is_weight[mask].sum()),
            truncated=int((raw_weight[mask] > tis_cap).sum()),
            clipped=int((clipped < unclipped)[mask].sum()),
            tokens=int(mask.sum()),
        )
    return loss, stats

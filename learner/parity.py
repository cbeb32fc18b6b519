"""Train/inference log-prob parity: how far the engine's behavior log-probs are from the learner's own.

For a sample generated entirely at the learner's current policy version, the two
sides hold the same weights, so their log-probs of the sampled tokens should agree
up to kernel noise. A growing gap means a broken weight sync, a dtype or kernel
mismatch, or a sampler that does not sample what it reports; each silently turns
"on-policy" GRPO into off-policy training. These stats make the gap visible per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RATIO_BAND = (0.5, 2.0)


@dataclass
class ParityStats:
    """Sums over compared completion tokens (and one max), so micro-batches and ranks add up."""

    tokens: int = 0
    abs_diff_sum: float = 0.0
    abs_diff_max: float = 0.0
    kl_sum: float = 0.0
    outside_band: int = 0

    def __add__(self, other: ParityStats) -> ParityStats:
        return ParityStats(
            self.tokens + other.tokens,
            self.abs_diff_sum + other.abs_diff_sum,
            max(self.abs_diff_max, other.abs_diff_max),
            self.kl_sum + other.kl_sum,
            self.outside_band + other.outside_band,
        )

    def metrics(self) -> dict[str, float]:
        per_token = max(self.tokens, 1)
        return {
            "parity_tokens": self.tokens,
            "parity_logprob_diff_mean": self.abs_diff_sum / per_token,
            "parity_logprob_diff_max": self.abs_diff_max,
            "parity_kl": self.kl_sum / per_token,
            "parity_ratio_outside_frac": self.outside_band / per_token,
        }


def parity_stats(learner: Tensor, behavior: Tensor, mask: Tensor) -> ParityStats:
    """Compare [B, T] log-probs of the sampled tokens where `mask` is set.

    The KL is k3's estimate of KL(behavior || learner) from tokens the behavior policy
    sampled: with r = pi_learner / pi_behavior, E[r - 1 - log r] >= 0, zero only when equal.
    """
    log_ratio = (learner.detach().float() - behavior.float())[mask]
    if log_ratio.numel() == 0:
        return ParityStats()
    low, high = RATIO_BAND
    ratio = torch.exp(log_ratio)
    return ParityStats(
        tokens=int(log_ratio.numel()),
        abs_diff_sum=float(log_ratio.abs().sum()),
        abs_diff_max=float(log_ratio.abs().max()),
        kl_sum=float((ratio - 1 - log_ratio).sum()),
        outside_band=int(((ratio < low) | (ratio > high)).sum()),
    )

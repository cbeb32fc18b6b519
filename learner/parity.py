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

from learner.loss import to_numbers

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
            _larger(self.abs_diff_max, other.abs_diff_max),
            self.kl_sum + other.kl_sum,
            self.outside_band + other.outside_band,
        )

    def numbers(self) -> ParityStats:
        """The same values as Python numbers (the per-micro-batch ones are 0-dim tensors), in one read."""
        tokens, abs_sum, abs_max, kl_sum, outside = to_numbers([self.tokens, self.abs_diff_sum, self.abs_diff_max, self.kl_sum, self.outside_band])
        return ParityStats(int(tokens), abs_sum, abs_max, kl_sum, int(outside))

    def metrics(self) -> dict[str, float]:
        s = self.numbers()
        per_token = max(s.tokens, 1)
        return {
            "parity_tokens": s.tokens,
            "parity_logprob_diff_mean": s.abs_diff_sum / per_token,
            "parity_logprob_diff_max": s.abs_diff_max,
            "parity_kl": s.kl_sum / per_token,
            "parity_ratio_outside_frac": s.outside_band / per_token,
        }


def parity_stats(learner: Tensor, behavior: Tensor, mask: Tensor) -> ParityStats:
    """Compare [B, T] log-probs of the sampled tokens where `mask` is set (0-dim tensor results, no sync).

    The KL is k3's estimate of KL(behavior || learner) from tokens the behavior policy
    sampled: with r = pi_learner / pi_behavior, E[r - 1 - log r] >= 0, zero only when equal.
    """
    if mask.numel() == 0:
        return ParityStats()
    low, high = RATIO_BAND
    log_ratio = torch.where(mask, learner.detach().float() - behavior.float(), 0.0)  # 0 off the mask: ratio 1, no KL
    ratio = torch.exp(log_ratio)
    return ParityStats(
        tokens=mask.sum(),
        abs_diff_sum=log_ratio.abs().sum(),
        abs_diff_max=log_ratio.abs().max(),
        kl_sum=(ratio - 1 - log_ratio).sum(),
        outside_band=(~((ratio >= low) & (ratio <= high))).sum(),  # a NaN ratio is outside too
    )


def _larger(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)

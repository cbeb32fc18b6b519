"""The GRPO loss family, as pure functions on tensors.

Shapes: G groups of n samples; B sequences; T target positions. Token tensors are
aligned so position t holds the log-probability of token t+1; `mask` marks the
completion tokens, and nothing else (prompt, padding) ever contributes.

Three policies meet here. `behavior` produced the tokens (the actor's vLLM, maybe
some versions old); `proximal` is the learner's policy before this update, which
anchors the trust region; `current` is what is optimised. Config switches
(`protocol.config.LossSection`) pick:

- advantages: `grpo` (minus the group mean, optionally over the group std),
  `rloo` (minus the mean of the *other* samples), `drgrpo` (minus the mean, no std);
- the ratio current/anchor per token, or per sequence (`sequence`, GSPO: the
  geometric mean of the token ratios), clipped to [1 - clip_low, 1 + clip_high],
  with an optional dual clip `c` bounding the loss of negative advantages;
- the off-policy correction, a per-token weight w from rho = proximal/behavior:
  `none` (anchor the ratio at the behavior policy itself, w = 1), `tis`
  (w = min(rho, C)), `decoupled` (AReaL: w = rho, but tokens with rho > C are
  masked out), `masked` (IcePop: w = rho where rho, or the sequence's geometric
  mean of rho, lies in [mask_low, mask_high], else 0);
- a KL penalty to a reference policy (k1, k2 or k3 estimator), an entropy bonus,
  and the aggregation: `token_mean`, `seq_mean_token_mean`, or
  `seq_mean_token_sum_norm` (Dr.GRPO: token sums over a constant max length).

With behavior == proximal == current every choice reduces to the plain GRPO
policy gradient (with k2/k3 KL, whose gradient vanishes there; k1's does not).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from protocol.config import LossSection

MAX_LOG_RATIO = 20.0
"""Log-ratios (current/anchor, after the sequence mean with `ratio_level: sequence`, and
proximal/behavior) are cut here before exp: beyond 88 float32 overflows, and with
`correction: none` the anchor is the actor's log-prob, which a valid sample may put at -1000;
one such token with a negative advantage made the loss inf and the step refused its update,
again after every resume. Ratios below e^20 are untouched; one beyond keeps a finite loss and
no gradient (it lies far outside any trust region)."""


def group_advantages(rewards: Tensor, kind: str = "grpo", std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """[G, n] rewards -> [G, n] float32 advantages, exactly 0 in a group whose rewards are all equal.

    In float64, and zeroed for flat groups: in float32 the mean of eight rewards of 0.7 leaves
    rounding noise of about 1e-8, which the std normalisation divides by a std of the same size
    and turns into a full-sized advantage of one sign for the whole group.
    """
    wide = rewards.double()
    n = wide.shape[1]
    centered = wide - wide.mean(dim=1, keepdim=True)
    if kind == "rloo":
        advantages = centered * n / (n - 1)  # r_i - mean of the other n - 1
    elif kind == "grpo" and std_normalize:
        advantages = centered / (wide.std(dim=1, keepdim=True) + eps)
    else:
        advantages = centered
    return advantages.masked_fill(flat_groups(rewards).unsqueeze(1), 0.0).float()


def flat_groups(rewards: Tensor) -> Tensor:
    """[G, n] -> [G] bool: groups whose rewards are all equal carry no signal (DAPO dynamic sampling)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """[B, T, V] logits and [B, T] targets -> [B, T] log p(target), at the sampling temperature."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """[B, T, V] -> [B, T] entropy of the sampling distribution."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)  # a masked (-inf) logit adds 0, not 0 * -inf


@dataclass
class Normalizer:
    """Counts over the whole optimizer step, so micro-batches add up to one aggregate."""

    tokens: int
    sequences: int
    max_tokens: int


@dataclass
class LossStats:
    """Sums over completion tokens, so micro-batches add up exactly.

    `policy_loss` fills them with 0-dim tensors, so no micro-batch waits for the GPU;
    the trainer reads them all back at once (`to_numbers`) when the step is done.
    """

    is_weight_sum: float = 0.0
    truncated: int = 0
    masked: int = 0
    clipped: int = 0
    kl_sum: float = 0.0
    entropy_sum: float = 0.0
    tokens: int = 0

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def to_numbers(values: list[float | Tensor]) -> list[float]:
    """Python floats for a mix of numbers and 0-dim tensors, read from the device in one transfer."""
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    if device is None:
        return [float(v) for v in values]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]).tolist()


def correction_weights(proximal: Tensor, behavior: Tensor, mask: Tensor, cfg: LossSection) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token weight w and the truncated / masked-out token flags, all without gradient."""
    log_rho = torch.where(mask, proximal - behavior, 0.0).detach()
    rho = torch.exp(log_rho.clamp(max=MAX_LOG_RATIO))  # a sequence-level mask may keep a token of huge rho
    none = torch.zeros_like(mask)
    if cfg.correction == "none":
        return torch.ones_like(rho), none, none
    if cfg.correction == "tis":
        return rho.clamp(max=cfg.tis_cap), mask & (rho > cfg.tis_cap), none
    if cfg.correction == "decoupled":
        dropped = mask & (rho > cfg.tis_cap)
        return torch.where(dropped, 0.0, rho), none, dropped
    level = rho if cfg.mask_level == "token" else _sequence_mean_exp(log_rho, mask)
    dropped = mask & ((level < cfg.mask_low) | (level > cfg.mask_high))
    return torch.where(dropped, 0.0, rho), none, dropped


def kl_penalty(logprobs: Tensor, reference: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(current || reference) from log-probs of the sampled tokens."""
    x = reference - logprobs
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    return torch.exp(x.clamp(max=MAX_LOG_RATIO)) - x - 1.0  # unclamped, a token 88 nats below the reference gave inf


def policy_loss(
    logprobs: Tensor,
    proximal: Tensor,
    behavior: Tensor,
    advantages: Tensor,
    mask: Tensor,
    norm: Normalizer,
    cfg: LossSection,
    reference: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """The aggregated loss of one micro-batch and its statistics.

    logprobs, proximal, behavior, mask, reference, entropy: [B, T]; advantages: [B].
    `reference` is needed when cfg.kl_coef > 0, `entropy` when cfg.entropy_coef > 0.
    """
    mask = mask.bool()
    anchor = behavior if cfg.correction == "none" else proximal.detach()
    log_ratio = torch.where(mask, logprobs - anchor, 0.0)  # zero off the mask: no inf * 0 = NaN
    level = _sequence_mean(log_ratio, mask) if cfg.ratio_level == "sequence" else log_ratio
    ratio = torch.exp(level.clamp(max=MAX_LOG_RATIO))
    weight, truncated, masked = correction_weights(proximal, behavior, mask, cfg)
    adv = advantages.unsqueeze(-1).to(ratio.dtype)
    unclipped = ratio * adv
    objective = torch.minimum(unclipped, ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv)
    if cfg.dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, cfg.dual_clip * adv), objective)
    per_token = -weight * objective
    kl = None
    if cfg.kl_coef > 0:
        kl = kl_penalty(logprobs, torch.where(mask, reference, logprobs.detach()), cfg.kl_estimator)
    if kl is not None:
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate(torch.where(mask, per_token, 0.0), mask, norm, cfg.aggregation)
    with torch.no_grad():
        stats = LossStats(
            is_weight_sum=torch.where(mask, weight, 0.0).sum(),
            truncated=truncated.sum(),
            masked=masked.sum(),
            clipped=((objective != unclipped) & mask).sum(),
            kl_sum=torch.where(mask, kl, 0.0).sum() if kl is not None else 0.0,
            entropy_sum=torch.where(mask, entropy, 0.0).sum() if entropy is not None else 0.0,
            tokens=mask.sum(),
        )
    return loss, stats


def aggregate(per_token: Tensor, mask: Tensor, norm: Normalizer, how: str) -> Tensor:
    """Reduce masked per-token losses to a scalar whose micro-batch parts sum to the step's aggregate."""
    if how == "token_mean":
        return per_token.sum() / norm.tokens
    if how == "seq_mean_token_mean":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm.sequences
    return per_token.sum() / (norm.sequences * norm.max_tokens)


def _sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over each row's masked tokens, broadcast back to [B, T] (gradient flows)."""
    mean = (values * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return mean.expand_as(values)


def _sequence_mean_exp(log_values: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(_sequence_mean(log_values, mask))

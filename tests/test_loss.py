"""The GRPO loss against an independent per-token reference, and its reduction to plain GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import LossStats, group_advantages, grpo_loss, token_logprobs


def reference_loss(logprobs, proximal, behavior, advantages, mask, normalizer, clip_low, clip_high, cap):
    """Straight from the formula, one token at a time."""
    total = 0.0
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logprobs[b, t] - proximal[b, t])
            weight = min(math.exp(float(proximal[b, t] - behavior[b, t])), cap)
            adv = float(advantages[b])
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            total = total - weight * torch.minimum(ratio * adv, clipped * adv)
    return total / normalizer


def random_inputs(seed: int, batch: int = 4, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(batch, length, generator=gen) * 3).requires_grad_()
    proximal = logprobs.detach() + torch.randn(batch, length, generator=gen) * 0.3
    behavior = proximal + torch.randn(batch, length, generator=gen) * 0.5
    advantages = torch.randn(batch, generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    return logprobs, proximal, behavior, advantages, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("clip_low,clip_high,cap", [(0.2, 0.2, 2.0), (0.1, 0.28, 1.2), (0.2, 0.28, 100.0)])
def test_loss_and_gradient_match_the_reference(seed, clip_low, clip_high, cap):
    logprobs, proximal, behavior, advantages, mask = random_inputs(seed)
    normalizer = float(mask.sum())
    loss, stats = grpo_loss(logprobs, proximal, behavior, advantages, mask, normalizer, clip_low, clip_high, cap)
    (grad,) = torch.autograd.grad(loss, logprobs)
    ref_in = logprobs.detach().clone().requires_grad_()
    ref = reference_loss(ref_in, proximal, behavior, advantages, mask, normalizer, clip_low, clip_high, cap)
    (ref_grad,) = torch.autograd.grad(ref, ref_in)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert stats.tokens == int(mask.sum())
    raw = torch.exp(proximal - behavior)[mask]
    assert stats.truncated == int((raw > cap).sum())
    assert stats.is_weight_sum == pytest.approx(float(raw.clamp(max=cap).sum()), rel=1e-5)


def test_reduces_to_plain_grpo_when_all_policies_agree():
    """behavior == proximal == current: loss = -sum(A * mask) / N and d loss / d logp = -A / N per token."""
    logprobs, _, _, advantages, mask = random_inputs(7)
    normalizer = float(mask.sum())
    same = logprobs.detach()
    loss, stats = grpo_loss(logprobs, same, same, advantages, mask, normalizer)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = -(advantages[:, None] * mask).sum() / normalizer
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, -(advantages[:, None] * mask) / normalizer)
    assert stats.clipped == 0 and stats.truncated == 0
    assert stats.is_weight_sum == pytest.approx(normalizer)


def test_padding_never_contributes():
    logprobs, proximal, behavior, advantages, mask = random_inputs(3)
    base, _ = grpo_loss(logprobs, proximal, behavior, advantages, mask, 10.0)
    (base_grad,) = torch.autograd.grad(base, logprobs)
    garbage_prox = torch.where(mask, proximal, torch.full_like(proximal, 1e4))
    garbage_beh = torch.where(mask, behavior, torch.full_like(behavior, -1e4))
    loss, _ = grpo_loss(logprobs, garbage_prox, garbage_beh, advantages, mask, 10.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, base_grad)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("advantage,ratio,clipped", [
    (1.0, 1.2799, False),   # just inside 1 + clip_high: gradient flows
    (1.0, 1.2801, True),    # just outside: clipped, no gradient
    (-1.0, 0.8001, False),  # just inside 1 - clip_low
    (-1.0, 0.7999, True),
    (1.0, 0.5, False),      # positive advantage, low ratio: the pessimistic side is unclipped
    (-1.0, 1.5, False),     # negative advantage, high ratio: likewise
])
def test_clip_boundaries(advantage, ratio, clipped):
    proximal = torch.tensor([[-1.0]], dtype=torch.float64)
    logprobs = (proximal + math.log(ratio)).requires_grad_()
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = grpo_loss(logprobs, proximal, proximal, torch.tensor([advantage]), mask, 1.0, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert stats.clipped == int(clipped)
    assert (grad.abs().item() == 0.0) == clipped


def test_exactly_at_the_clip_bound_counts_as_unclipped():
    """At ratio == 1 + clip_high both surrogate terms are equal: nothing is clipped away."""
    logprobs = torch.zeros(1, 1, requires_grad=True)
    proximal = torch.zeros(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    _, stats = grpo_loss(logprobs, proximal, proximal, torch.tensor([1.0]), mask, 1.0, clip_low=0.0, clip_high=0.0)
    assert stats.clipped == 0


def test_tis_cap_truncates_at_exactly_c():
    mask = torch.ones(1, 2, dtype=torch.bool)
    proximal = torch.tensor([[0.0, 0.0]])
    behavior = torch.tensor([[-math.log(2.0), -math.log(3.0)]])  # weights 2 (== cap) and 3 (> cap)
    logprobs = proximal.clone().requires_grad_()
    loss, stats = grpo_loss(logprobs, proximal, behavior, torch.tensor([1.0]), mask, 2.0, tis_cap=2.0)
    assert stats.truncated == 1
    assert stats.is_weight_sum == pytest.approx(4.0)
    assert loss.item() == pytest.approx(-(2.0 + 2.0) / 2.0)


def test_bf16_inputs_stay_close_to_fp32():
    logprobs, proximal, behavior, advantages, mask = random_inputs(11, batch=8, length=32)
    full, _ = grpo_loss(logprobs, proximal, behavior, advantages, mask, float(mask.sum()))
    half, _ = grpo_loss(logprobs.bfloat16(), proximal.bfloat16(), behavior.bfloat16(), advantages, mask, float(mask.sum()))
    assert half.float().item() == pytest.approx(full.item(), abs=2e-2)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert (adv[1] == 0).all()  # all-equal groups carry no signal
    torch.testing.assert_close(group_advantages(rewards, std_normalize=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)


def test_token_logprobs_matches_log_softmax_with_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7), expected)


def test_loss_stats_add_up():
    total = LossStats(1.5, 1, 2, 3) + LossStats(0.5, 0, 1, 1)
    assert total == LossStats(2.0, 1, 3, 4)

"""The loss family against an independent per-token reference, and its reduction to plain GRPO."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from learner.loss import (
    MAX_LOG_RATIO,
    LossStats,
    Normalizer,
    flat_groups,
    group_advantages,
    kl_penalty,
    policy_loss,
    to_numbers,
    token_entropy,
    token_logprobs,
)
from protocol.config import LossSection

VARIANTS = [
    {},
    {"correction": "none"},
    {"correction": "tis", "tis_cap": 1.2},
    {"correction": "decoupled", "tis_cap": 1.2},
    {"correction": "masked", "mask_low": 0.7, "mask_high": 1.3},
    {"correction": "masked", "mask_level": "sequence", "mask_low": 0.8, "mask_high": 1.25},
    {"ratio_level": "sequence"},
    {"ratio_level": "sequence", "correction": "none", "aggregation": "seq_mean_token_mean"},
    {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 1.5},
    {"aggregation": "seq_mean_token_mean"},
    {"aggregation": "seq_mean_token_sum_norm"},
    {"kl_coef": 0.1, "kl_estimator": "k1"},
    {"kl_coef": 0.1, "kl_estimator": "k2"},
    {"kl_coef": 0.1, "kl_estimator": "k3", "entropy_coef": 0.01},
]
MAX_TOKENS = 9


def reference_loss(lp, prox, beh, adv, mask, norm, cfg, ref=None, ent=None):
    """Straight from the definitions, one sequence and one token at a time."""
    total = 0.0
    for b in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[b, t]]
        anchor = beh[b] if cfg.correction == "none" else prox[b]
        seq_ratio = torch.exp(sum(lp[b, t] - anchor[t] for t in toks) / len(toks))
        seq_rho = math.exp(sum(float(prox[b, t] - beh[b, t]) for t in toks) / len(toks))
        seq_sum = 0.0
        for t in toks:
            ratio = seq_ratio if cfg.ratio_level == "sequence" else torch.exp(lp[b, t] - anchor[t])
            rho = math.exp(float(prox[b, t] - beh[b, t]))
            if cfg.correction == "none":
                weight = 1.0
            elif cfg.correction == "tis":
                weight = min(rho, cfg.tis_cap)
            elif cfg.correction == "decoupled":
                weight = rho if rho <= cfg.tis_cap else 0.0
            else:
                level = rho if cfg.mask_level == "token" else seq_rho
                weight = rho if cfg.mask_low <= level <= cfg.mask_high else 0.0
            a = float(adv[b])
            obj = torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
            if cfg.dual_clip is not None and a < 0:
                obj = torch.maximum(obj, torch.tensor(cfg.dual_clip * a, dtype=obj.dtype))
            term = -weight * obj
            if cfg.kl_coef > 0:
                x = ref[b, t] - lp[b, t]
                k = {"k1": -x, "k2": 0.5 * x * x, "k3": torch.exp(x) - x - 1}[cfg.kl_estimator]
                term = term + cfg.kl_coef * k
            if cfg.entropy_coef > 0:
                term = term - cfg.entropy_coef * ent[b, t]
            seq_sum = seq_sum + term
        total = total + (seq_sum / len(toks) if cfg.aggregation == "seq_mean_token_mean" else seq_sum)
    if cfg.aggregation == "token_mean":
        return total / norm.tokens
    if cfg.aggregation == "seq_mean_token_mean":
        return total / norm.sequences
    return total / (norm.sequences * norm.max_tokens)


def random_inputs(seed: int, batch: int = 4, length: int = 7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(batch, length, generator=gen, dtype=dtype) * 3).requires_grad_()
    proximal = logprobs.detach() + torch.randn(batch, length, generator=gen, dtype=dtype) * 0.3
    behavior = proximal + torch.randn(batch, length, generator=gen, dtype=dtype) * 0.3
    reference = logprobs.detach() + torch.randn(batch, length, generator=gen, dtype=dtype) * 0.2
    entropy = torch.rand(batch, length, generator=gen, dtype=dtype).requires_grad_()
    advantages = torch.randn(batch, generator=gen, dtype=dtype)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[:, 0] = True  # every sequence has at least one completion token
    return logprobs, proximal, behavior, reference, entropy, advantages, mask


def normalizer(mask) -> Normalizer:
    return Normalizer(tokens=int(mask.sum()), sequences=mask.shape[0], max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_variant_matches_the_reference_in_value_and_gradient(seed, overrides):
    cfg = LossSection(**overrides)
    lp, prox, beh, ref, ent, adv, mask = random_inputs(seed)
    norm = normalizer(mask)
    loss, stats = policy_loss(lp, prox, beh, adv, mask, norm, cfg, ref, ent)
    grads = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    ref_lp, ref_ent = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    expected = reference_loss(ref_lp, prox, beh, adv, mask, norm, cfg, ref, ref_ent)
    expected_grads = torch.autograd.grad(expected, [ref_lp, ref_ent], allow_unused=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-9, atol=1e-12)
    if cfg.entropy_coef > 0:
        torch.testing.assert_close(grads[1], expected_grads[1])
    assert stats.tokens == int(mask.sum())


def plain_grpo_gradient(adv, mask, norm: Normalizer, aggregation: str) -> torch.Tensor:
    """d loss / d logp of the vanilla policy gradient under each aggregation."""
    per_seq = {
        "token_mean": torch.full((mask.shape[0], 1), 1.0 / norm.tokens, dtype=adv.dtype),
        "seq_mean_token_mean": 1.0 / (mask.sum(-1, keepdim=True).to(adv.dtype) * norm.sequences),
        "seq_mean_token_sum_norm": torch.full((mask.shape[0], 1), 1.0 / (norm.sequences * norm.max_tokens), dtype=adv.dtype),
    }[aggregation]
    return -adv[:, None] * mask * per_seq


@pytest.mark.parametrize("overrides", [v for v in VARIANTS if v.get("kl_estimator") != "k1" and "entropy_coef" not in v],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")  # fmt: skip
def test_every_variant_reduces_to_plain_grpo_when_the_policies_agree(overrides):
    cfg = LossSection(**overrides)
    lp, _, _, _, _, adv, mask = random_inputs(5)
    same = lp.detach()
    norm = normalizer(mask)
    loss, stats = policy_loss(lp, same, same, adv, mask, norm, cfg, reference=same)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, plain_grpo_gradient(adv, mask, norm, cfg.aggregation))
    assert stats.clipped == stats.truncated == stats.masked == 0
    assert stats.is_weight_sum == pytest.approx(int(mask.sum()))


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_padding_never_contributes(overrides):
    cfg = LossSection(**overrides)
    lp, prox, beh, ref, ent, adv, mask = random_inputs(3)
    norm = normalizer(mask)
    base, _ = policy_loss(lp, prox, beh, adv, mask, norm, cfg, ref, ent)
    (base_grad,) = torch.autograd.grad(base, lp)

    def junk(x, value):
        return torch.where(mask, x, torch.full_like(x, value))

    loss, _ = policy_loss(lp, junk(prox, 1e4), junk(beh, -1e4), adv, mask, norm, cfg, junk(ref, 1e4), junk(ent.detach(), 1e9))
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(base.item(), rel=1e-9)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    torch.testing.assert_close(grad, base_grad)


def one_token(ratio: float, advantage: float, rho: float = 1.0, **overrides):
    """Loss and stats for a single token with the given current/proximal ratio and proximal/behavior rho."""
    proximal = torch.tensor([[-1.0]], dtype=torch.float64)
    logprobs = (proximal + math.log(ratio)).requires_grad_()
    behavior = proximal - math.log(rho)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, proximal, behavior, torch.tensor([advantage], dtype=torch.float64), mask,
                              Normalizer(1, 1, 1), LossSection(**overrides))  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.item(), grad.item(), stats


@pytest.mark.parametrize("advantage,ratio,clipped", [
    (1.0, 1.28, False), (1.0, 1.2801, True), (-1.0, 0.8, False), (-1.0, 0.7999, True),
    (1.0, 0.5, False), (-1.0, 1.5, False),
])  # fmt: skip
def test_clip_boundaries(advantage, ratio, clipped):
    _, grad, stats = one_token(ratio, advantage, clip_low=0.2, clip_high=0.28)
    assert stats.clipped == int(clipped)
    assert (grad == 0.0) == clipped


def test_dual_clip_bounds_negative_advantages_exactly_at_c():
    loss, grad, stats = one_token(2.999, -1.0, dual_clip=3.0)  # just below c: still the unclipped term
    assert loss == pytest.approx(2.999) and grad != 0 and stats.clipped == 0
    loss, grad, stats = one_token(3.5, -1.0, dual_clip=3.0)  # beyond c: bounded at c * |A|, no gradient
    assert loss == pytest.approx(3.0) and grad == 0 and stats.clipped == 1
    loss, _, _ = one_token(3.5, -1.0)  # without dual clip the loss keeps growing
    assert loss == pytest.approx(3.5)


@pytest.mark.parametrize("rho,truncated,weight", [(2.0, 0, 2.0), (2.0001, 1, 2.0)])
def test_tis_truncates_above_c(rho, truncated, weight):
    loss, _, stats = one_token(1.0, 1.0, rho=rho, correction="tis", tis_cap=2.0)
    assert stats.truncated == truncated and stats.masked == 0
    assert stats.is_weight_sum == pytest.approx(weight) and loss == pytest.approx(-weight)


@pytest.mark.parametrize("rho,masked", [(2.0, 0), (2.0001, 1)])
def test_decoupled_drops_tokens_above_c(rho, masked):
    loss, grad, stats = one_token(1.0, 1.0, rho=rho, correction="decoupled", tis_cap=2.0)
    assert stats.masked == masked and stats.truncated == 0
    assert (grad == 0) == bool(masked)


@pytest.mark.parametrize("rho,masked", [(0.5, 0), (0.4999, 1), (2.0, 0), (2.0001, 1)])
def test_masked_is_keeps_exactly_the_closed_interval(rho, masked):
    _, grad, stats = one_token(1.0, 1.0, rho=rho, correction="masked", mask_low=0.5, mask_high=2.0)
    assert stats.masked == masked
    assert (grad == 0) == bool(masked)


def test_sequence_masking_drops_whole_sequences():
    mask = torch.ones(2, 3, dtype=torch.bool)
    proximal = torch.zeros(2, 3, dtype=torch.float64)
    behavior = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.0, -0.3]], dtype=torch.float64)  # geo-mean rho e^1, e^0.1
    lp = proximal.clone().requires_grad_()
    cfg = LossSection(correction="masked", mask_level="sequence", mask_low=0.5, mask_high=2.0)
    loss, stats = policy_loss(lp, proximal, behavior, torch.tensor([1.0, 1.0], dtype=torch.float64), mask,
                              Normalizer(6, 2, 3), cfg)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)
    assert stats.masked == 3
    assert (grad[0] == 0).all() and (grad[1] != 0).all()


def test_bf16_inputs_stay_close_to_fp32():
    lp, prox, beh, _, _, adv, mask = random_inputs(11, batch=8, length=32, dtype=torch.float32)
    norm = normalizer(mask)
    for cfg in (LossSection(), LossSection(ratio_level="sequence", correction="masked")):
        full, _ = policy_loss(lp, prox, beh, adv, mask, norm, cfg)
        half, _ = policy_loss(lp.bfloat16(), prox.bfloat16(), beh.bfloat16(), adv, mask, norm, cfg)
        assert half.float().item() == pytest.approx(full.item(), abs=2e-2)


def test_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, 0.0, 0.0]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    grpo = group_advantages(rewards)
    torch.testing.assert_close(grpo[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert (grpo[1] == 0).all()
    drgrpo = group_advantages(rewards, "drgrpo")
    torch.testing.assert_close(drgrpo[2], torch.tensor([2.0, 0.0, -1.0, -1.0]))
    torch.testing.assert_close(group_advantages(rewards, "grpo", std_normalize=False), drgrpo)
    rloo = group_advantages(rewards, "rloo")
    torch.testing.assert_close(rloo[2], torch.tensor([3.0 - 1 / 3, 1.0 - 1.0, 0.0 - 4 / 3, 0.0 - 4 / 3]))
    assert flat_groups(rewards).tolist() == [False, True, False]


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("value, n", [(0.7, 8), (1000.1, 3), (1.2, 8), (0.1, 16)])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(kind, value, n):
    """Found by a helper's hunt: in float32 the group mean of 8 x 0.7 left noise of about 1e-8, which the std
    normalisation blew up to +0.056 for every sample, so flat groups were trained at a full learning rate."""
    rewards = torch.tensor([[value] * n, [0.0] * (n - 1) + [1.0]], dtype=torch.float64)
    advantages = group_advantages(rewards, kind)
    assert advantages.dtype == torch.float32 and (advantages[0] == 0).all() and advantages[1].abs().sum() > 0


def test_token_logprobs_and_entropy_at_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    logp = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7), logp.gather(-1, targets[..., None])[..., 0])
    torch.testing.assert_close(token_entropy(logits, 0.7), -(logp.exp() * logp).sum(-1))


def test_a_masked_logit_and_a_token_far_below_the_reference_stay_finite():
    """Found by a review: a -inf logit made the entropy 0 * -inf = NaN; k3's exp(reference - logp) overflowed to inf
    once a sampled token lay some 88 nats below the reference, and the update was refused on every resume."""
    logits = torch.tensor([[[0.0, 1.0, -math.inf]]])
    torch.testing.assert_close(token_entropy(logits), token_entropy(logits[..., :2]))
    logprobs = torch.tensor([-95.0, -11.0, -1.0], requires_grad=True)
    kl = kl_penalty(logprobs, torch.tensor([-1.0, -1.0, -1.0]), "k3")
    kl.sum().backward()
    kl = kl.detach()
    assert torch.isfinite(kl).all() and torch.isfinite(logprobs.grad).all() and kl[2] == 0
    assert float(kl[1]) == pytest.approx(math.exp(10) - 11, rel=1e-6)  # within the clamp: the estimator as it is


def test_loss_stats_add_up():
    total = LossStats(1.5, 1, 2, 3, 0.5, 1.0, 4) + LossStats(0.5, 0, 1, 1, 0.25, 2.0, 1)
    assert total == LossStats(2.0, 1, 3, 4, 0.75, 3.0, 5)


def test_loss_stats_stay_on_the_device_until_read_once():
    """The stats are 0-dim tensors (no per-micro-batch read from a GPU); `to_numbers` reads a mix exactly."""
    lp, prox, beh, ref, ent, adv, mask = random_inputs(0)
    _, stats = policy_loss(lp, prox, beh, adv, mask, normalizer(mask), LossSection(kl_coef=0.1, entropy_coef=0.01), ref, ent)
    values = [getattr(stats, f.name) for f in fields(LossStats)]
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values)
    assert to_numbers([*values, 2.5]) == [float(v) for v in values] + [2.5]
    assert to_numbers([1, 2.5]) == [1.0, 2.5]


@pytest.mark.parametrize("overrides", [{"correction": "none"}, {"correction": "none", "ratio_level": "sequence"}, {}])
def test_a_token_the_actor_found_near_impossible_keeps_the_loss_and_gradient_finite(overrides):
    """float32, as the learner trains: the actor's log-prob of -1000 (finite, so valid on the wire) against the
    learner's -0.1 is a log-ratio of ~1000; exp overflowed to inf and a negative advantage made the loss inf."""
    logprobs = torch.tensor([[-0.1, -0.5]], requires_grad=True)
    behavior = torch.tensor([[-1000.0, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = policy_loss(logprobs, behavior.clone(), behavior, torch.tensor([-1.0]), mask, Normalizer(2, 1, 2),
                          LossSection(**overrides))  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    per_sequence = math.exp(MAX_LOG_RATIO)  # the mean log-ratio (~500), cut, for both tokens
    per_token = (math.exp(MAX_LOG_RATIO) + 1) / 2
    assert loss.item() == pytest.approx(per_sequence if overrides.get("ratio_level") else per_token, rel=1e-5)


def test_the_cap_leaves_a_sequence_ratio_of_balanced_token_ratios_alone():
    """A review: cut per token before the sequence mean, log-ratios +30 and -30 (a sequence ratio of 1) became a
    ratio of e^-5."""
    logprobs = torch.tensor([[-1.0, -31.0]], requires_grad=True)
    behavior = torch.tensor([[-31.0, -1.0]])
    loss, _ = policy_loss(logprobs, behavior, behavior, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                          Normalizer(2, 1, 2), LossSection(correction="none", ratio_level="sequence"))  # fmt: skip
    assert loss.item() == pytest.approx(-1.0)


def test_a_huge_rho_kept_by_a_sequence_level_mask_stays_finite():
    """A review: IcePop's sequence-level mask kept a token of log-rho +100 (the others balance it), whose weight
    exp(100) overflowed float32."""
    proximal = torch.tensor([[-0.5] * 5])
    behavior = proximal - torch.tensor([[100.0, -25.0, -25.0, -25.0, -25.0]])
    logprobs = proximal.clone().requires_grad_()
    loss, stats = policy_loss(logprobs, proximal, behavior, torch.tensor([-1.0]), torch.ones(1, 5, dtype=torch.bool),
                              Normalizer(5, 1, 5), LossSection(correction="masked", mask_level="sequence",
                                                               mask_low=0.5, mask_high=2.0))  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert stats.masked == 0 and torch.isfinite(loss) and torch.isfinite(grad).all()

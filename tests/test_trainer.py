"""Learner steps on the tiny model: the update moves the policy toward rewarded samples; checkpoints reload."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner import trainer as trainer_module
from learner.backend import Backend
from learner.batch import collate
from learner.loss import Normalizer, group_advantages, policy_loss, token_logprobs
from learner.main import batch_metrics, load_model
from learner.trainer import Trainer, forward_logprobs, lr_factor
from protocol.config import load_config
from protocol.sample import Sample
from protocol.wire import MAX_ABS_REWARD
from tests.helpers import make_groups


def sequence_logprob(model, s: Sample) -> float:
    ids = torch.from_numpy(np.concatenate([s.prompt_ids, s.completion_ids]).astype(np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(s.prompt_ids) - 1 : -1], -1)
    return float(logp.gather(-1, torch.from_numpy(s.completion_ids.astype(np.int64))[:, None]).sum())


@pytest.mark.parametrize("updates", [1, 2])
def test_step_raises_logprob_of_rewarded_samples(tiny_model_dir, updates):
    torch.manual_seed(0)
    config = load_config(None, ["train.lr=0.01", f"train.updates_per_step={updates}", "train.micro_batch_size=3"])
    model = load_model(tiny_model_dir)
    groups = make_groups(model)
    before = {s.seq: sequence_logprob(model, s) for g in groups for s in g}
    metrics = Trainer(model, config).step(groups)
    after = {s.seq: sequence_logprob(model, s) for g in groups for s in g}
    good = [after[s.seq] - before[s.seq] for g in groups for s in g if s.reward == 1.0]
    bad = [after[s.seq] - before[s.seq] for g in groups for s in g if s.reward == 0.0]
    assert good and bad and np.mean(good) > np.mean(bad)
    assert metrics["optimizer_steps"] == updates
    assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # behavior == proximal here
    assert metrics["completion_tokens"] == 2 * 4 * 6


def test_the_logged_loss_is_a_mean_over_updates_not_their_sum(tiny_model_dir):
    """Found by a helper's hunt: with U updates per step the logged loss was U times the loss (U token means added)."""
    model = load_model(tiny_model_dir)
    groups = make_groups(model, num_groups=4, seed=3)
    for group in groups:  # every group has a signal, so every update trains
        for i, s in enumerate(group):
            s.reward = float(i % 2)
    losses = {}
    for updates in (1, 2, 4):
        config = load_config(None, ["train.lr=1e-12", "train.warmup_steps=0", "loss.correction=none", "loss.entropy_coef=0.1",
                                    f"train.updates_per_step={updates}", "train.micro_batch_size=16"])  # fmt: skip
        metrics = Trainer(load_model(tiny_model_dir), config).step(groups, 0)
        assert metrics["optimizer_steps"] == updates
        losses[updates] = metrics["loss"]
    assert losses[2] == pytest.approx(losses[1], rel=0.05) and losses[4] == pytest.approx(losses[1], rel=0.05), losses  # lr 1e-12: one model


def test_zero_advantage_groups_are_skipped_without_changing_the_update(tiny_model_dir):
    """The trainer skips a flat group's forward pass; a full forward over every sample gives the same weights."""
    config = load_config(None, ["train.lr=0.01"])
    model_a, model_b = load_model(tiny_model_dir), load_model(tiny_model_dir)
    groups = make_groups(model_a)
    flat = make_groups(model_a, num_groups=1, seed=1)[0]
    for s in flat:
        s.reward = 1.0
    batch = [*groups, flat]
    metrics = Trainer(model_a, config).step(batch)
    assert metrics["trained_samples"] == 8

    samples = [s for g in batch for s in g]
    rewards = torch.tensor([[s.reward for s in g] for g in batch])
    mb = collate(samples, group_advantages(rewards).flatten())
    logits = model_b(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    logprobs = mb.per_sequence(token_logprobs(logits, mb.input_ids[:, 1:]))
    norm = Normalizer(sum(len(s.completion_ids) for s in samples), len(samples), config.sampling.max_tokens)
    loss, _ = policy_loss(logprobs, logprobs.detach(), mb.behavior_logprobs, mb.advantages, mb.mask, norm, config.loss)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)  # same token-mean normaliser
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model_b.parameters(), config.train.grad_clip)
    torch.optim.AdamW(model_b.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay).step()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-4, atol=1e-6)


def test_a_flat_group_of_eight_rewards_of_0_7_is_not_trained(tiny_model_dir):
    """Found by a helper's hunt: the float32 mean of 8 x 0.7 left noise that std normalisation blew up to an
    advantage of +0.056 for all eight, so the group moved the weights by a full learning rate."""
    model = load_model(tiny_model_dir)
    groups = make_groups(model, num_groups=1, n=8)
    for s in groups[0]:
        s.reward = 0.7
    before = [p.detach().clone() for p in model.parameters()]
    metrics = Trainer(model, load_config(None, ["train.lr=0.01"])).step(groups)
    assert metrics["flat_groups"] == 1 and metrics["trained_samples"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_step_with_nothing_to_learn_still_moves_the_lr_schedule_on(tiny_model_dir):
    """Found by a helper's hunt: the schedule moved only with applied updates, so every step of flat groups pushed
    the warm-up and the cosine later, and a run ended before its schedule did."""
    config = load_config(None, ["train.lr=0.01", "train.warmup_steps=4", "train.steps=8"])
    model = load_model(tiny_model_dir)
    flat = make_groups(model, num_groups=1, n=4)
    for s in flat[0]:
        s.reward = 1.0
    skipping, training = Trainer(model, config), Trainer(load_model(tiny_model_dir), config)
    assert skipping.step(flat)["optimizer_steps"] == 0 and training.step(make_groups(model))["optimizer_steps"] == 1
    assert skipping.lr == training.lr == pytest.approx(0.01 * 2 / 4)
    # a review: with fewer samples than updates per step (filtered flat groups), the missing updates count too
    config = load_config(None, ["train.lr=0.01", "train.warmup_steps=32", "train.steps=8", "train.updates_per_step=8",
                                "loss.filter_flat_groups=true"])  # fmt: skip
    few = Trainer(load_model(tiny_model_dir), config)
    assert few.step([*make_groups(model, num_groups=1, n=4), *flat])["optimizer_steps"] == 4  # 4 samples left
    assert few.lr == pytest.approx(0.01 * 9 / 32)  # the ninth update of the warm-up comes next


def test_updates_of_a_step_share_its_samples_evenly_and_the_step_logs_the_lr_it_trained_with(tiny_model_dir):
    """Found by a review: 10 samples in 4 updates were cut 3+3+3+1 (the last a full-size step on one sample), 5 in 4
    were 2+2+1 and an update of nothing; and the logged lr was read after the schedule moved on, one update ahead."""
    assert [len(c) for c in trainer_module._split(list(range(10)), 4)] == [2, 3, 2, 3]
    model = load_model(tiny_model_dir)
    groups = make_groups(model, num_groups=1, n=5)
    groups[0][0].reward = 1.0 - groups[0][1].reward  # a signal in the group whatever the draw
    config = load_config(None, ["train.lr=0.01", "train.warmup_steps=8", "train.updates_per_step=4"])
    trainer = Trainer(model, config)
    sizes: list[int] = []
    update = trainer._update

    def noting_its_size(samples, advantages, trained, *rest):
        sizes.append(len(trained))
        return update(samples, advantages, trained, *rest)

    trainer._update = noting_its_size
    metrics = trainer.step(groups)
    assert metrics["optimizer_steps"] == 4 and sorted(sizes) == [1, 1, 1, 2]
    assert metrics["lr"] == pytest.approx(0.01 / 8) and trainer.lr == pytest.approx(0.01 * 5 / 8)


@pytest.mark.parametrize("advantage", ["drgrpo", "rloo"])
def test_rewards_at_the_wires_bound_train_finitely_without_std_normalisation(tiny_model_dir, advantage):
    """Found by a review: advantages then have the rewards' size, and at the first bound, 1e30 (even 1e20), the gradient norm
    overflowed, so the step raised (and again after every resume)."""
    model = load_model(tiny_model_dir)
    groups = make_groups(model, num_groups=1, n=4)
    for s, reward in zip(groups[0], [MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, MAX_ABS_REWARD]):
        s.reward = reward
    metrics = Trainer(model, load_config(None, [f"loss.advantage={advantage}"])).step(groups)
    assert math.isfinite(metrics["grad_norm"]) and math.isfinite(metrics["loss"]) and metrics["trained_samples"] == 4


def test_non_finite_gradients_refuse_the_update(tiny_model_dir):
    model = load_model(tiny_model_dir)
    groups = make_groups(model)
    groups[0][0].behavior_logprobs[:] = -1e30  # an absurd behavior policy: exp overflows
    config = load_config(None, ["loss.tis_cap=1e38"])
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, config)
    groups[0][0].reward = float("inf")
    with pytest.raises(FloatingPointError):
        trainer.step(groups)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batch_metrics():
    def s(reward, version, correct):
        return Sample(np.ones(2, np.int32), np.ones(3, np.int32), np.zeros(3, np.float32), reward, "g", 2, 0,
                      version, version, "a", "i", 0, metadata={"correct": correct})  # fmt: skip

    metrics = batch_metrics([[s(1.0, 3, True), s(0.0, 1, False)]], version=4)
    assert metrics == {"reward_mean": 0.5, "accuracy": 0.5, "completion_len_mean": 3.0, "samples": 2,
                       "lag_mean": 2.0, "lag_max": 3, "lag_counts": [0, 1, 0, 1]}  # fmt: skip


def test_filter_flat_groups_drops_them_from_the_step_and_counts_them(tiny_model_dir):
    model = load_model(tiny_model_dir)
    groups = make_groups(model)
    flat = make_groups(model, num_groups=1, seed=1)[0]
    for s in flat:
        s.reward = 0.0
    kept = Trainer(model, load_config(None, ["loss.filter_flat_groups=true"])).step([*groups, flat])
    assert kept["flat_groups"] == 1 and kept["completion_tokens"] == 2 * 4 * 6
    counted = Trainer(model, load_config(None, [])).step([*groups, flat])
    assert counted["flat_groups"] == 1 and counted["completion_tokens"] == 3 * 4 * 6


def test_kl_is_measured_against_the_initial_weights(tiny_model_dir):
    model = load_model(tiny_model_dir)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, load_config(None, ["loss.kl_coef=0.1", "loss.entropy_coef=0.01", "train.lr=0.01"]))
    groups = make_groups(model)
    first = trainer.step(groups)
    second = trainer.step(groups)
    assert first["kl_mean"] == pytest.approx(0.0, abs=1e-9)  # the policy still is the reference
    assert second["kl_mean"] > 1e-6
    assert first["entropy_mean"] > 0
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.reference.parameters()))


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant", 2, [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", 0, [1.0, 0.5 * (1 + math.cos(math.pi / 5)) * 0.9 + 0.1, None, None, None]),
    ("cosine", 1, [1.0, 1.0, None, None, None]),
])  # fmt: skip
def test_lr_schedule(schedule, warmup, expected):
    train = load_config(None, [f"train.lr_schedule={schedule}", f"train.warmup_steps={warmup}", "train.min_lr_ratio=0.1"]).train
    factors = [lr_factor(u, train, total=5) for u in range(5)]
    for got, want in zip(factors, expected):
        if want is not None:
            assert got == pytest.approx(want)
    if schedule == "cosine":
        assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))  # never rises after warm-up
        assert lr_factor(5, train, total=5) == pytest.approx(0.1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_logprobs(tiny_model_dir, attention):
    """Packing sequences into one row (restarting positions, no mask: the model keeps attention inside each
    sequence, whichever kernel it runs) changes no log-prob."""
    model = load_model(tiny_model_dir, attention)
    assert model.config._attn_implementation == attention
    samples = [s for g in make_groups(model, num_groups=2) for s in g]
    samples[1].completion_ids = samples[1].completion_ids[:2]
    samples[1].behavior_logprobs = samples[1].behavior_logprobs[:2]
    advantages = torch.zeros(len(samples))
    padded, packed = collate(samples, advantages), collate(samples, advantages, pack=True)
    assert packed.input_ids.shape == (1, sum(s.num_tokens for s in samples))  # no padding at all
    with torch.no_grad():
        lp_padded, ent_padded = forward_logprobs(model, padded, 1.0, entropy=True)
        lp_packed, ent_packed = forward_logprobs(model, packed, 1.0, entropy=True)
    assert torch.equal(padded.mask, packed.mask)
    torch.testing.assert_close(lp_packed[packed.mask], lp_padded[padded.mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_packed[packed.mask], ent_padded[padded.mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pack", [False, True])
def test_logits_only_at_completion_positions_give_the_full_forwards_logprobs(tiny_model_dir, pack):
    """The LM head runs only where a completion token is predicted; the log-probs are those of a full forward."""
    model = load_model(tiny_model_dir)
    samples = [s for g in make_groups(model, num_groups=2) for s in g]
    batch = collate(samples, torch.zeros(len(samples)), pack=pack)
    computed = []  # positions the head ran at, per call (it runs over chunks of positions)
    hook = model.lm_head.register_forward_hook(lambda module, args, out: computed.append(out.shape[:-1].numel()))
    with torch.no_grad():
        logprobs, _ = forward_logprobs(model, batch, 1.0)
    hook.remove()
    expected = torch.tensor([sequence_logprob(model, s) for s in samples])
    torch.testing.assert_close((logprobs * batch.mask).sum(dim=1), expected, atol=1e-4, rtol=0)
    completion_tokens = sum(len(s.completion_ids) for s in samples)
    assert sum(computed) < batch.input_ids.numel() - batch.input_ids.shape[0]  # fewer positions than the rows hold
    if pack:  # one row: exactly one position per completion token
        assert sum(computed) == completion_tokens


@pytest.mark.parametrize("pack", [False, True])
def test_the_head_in_chunks_gives_the_one_piece_logprobs_entropies_and_gradients(tiny_model_dir, pack, monkeypatch):
    """Chunks of 3 positions against the whole [B, K, vocab] block at once (`logits_to_keep`), forward and backward."""
    results = []
    for chunked in (True, False):
        model = load_model(tiny_model_dir)
        samples = [s for g in make_groups(model, num_groups=2) for s in g]
        batch = collate(samples, torch.zeros(len(samples)), pack=pack)
        monkeypatch.setattr(trainer_module, "HEAD_CHUNK_BYTES", 3 * 4 * model.lm_head.out_features)
        monkeypatch.setattr(trainer_module, "PLAIN_HEADS", trainer_module.PLAIN_HEADS if chunked else frozenset())
        calls = []
        hook = model.lm_head.register_forward_hook(lambda module, args, out, calls=calls: calls.append(out.shape[:-1].numel()))
        logprobs, entropies = forward_logprobs(model, batch, 0.7, entropy=True)
        (logprobs * batch.mask).sum().backward()
        hook.remove()
        results.append((logprobs.detach(), entropies.detach(), model.lm_head.weight.grad, model.model.layers[0].self_attn.q_proj.weight.grad, calls))
    (lp, ent, head_grad, layer_grad, calls), (lp1, ent1, head_grad1, layer_grad1, calls1) = results
    assert len(calls1) == 1 and len(calls) > 1 and max(calls) <= 3 and sum(calls) == sum(calls1)
    # float32 noise only: matmuls over 3 rows and over the whole block round differently, and the head's
    # gradient adds up its chunks in another order. On an AMD EPYC (2026-11-27) log-probs near -10 differed by
    # up to 9.5e-6 and the head's gradient (largest entry 6.8) by 6.2e-5; 1e-6 had held on earlier machines.
    torch.testing.assert_close(lp, lp1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent, ent1, atol=1e-6, rtol=1e-5)
    for got, want in ((head_grad, head_grad1), (layer_grad, layer_grad1)):
        torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("budget", [40, 1000])
def test_token_budget_micro_batches_give_the_same_step(tiny_model_dir, budget):
    padded_model, packed_model = load_model(tiny_model_dir), load_model(tiny_model_dir)
    groups = make_groups(padded_model, num_groups=3)
    padded = Trainer(padded_model, load_config(None, ["train.lr=0.01", "train.micro_batch_size=5"])).step(groups)
    packed = Trainer(packed_model, load_config(None, ["train.lr=0.01", f"train.micro_batch_tokens={budget}"])).step(groups)
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-6)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert packed["tokens"] == padded["tokens"]


def test_activation_checkpointing_changes_memory_not_results(tiny_model_dir):
    from learner.backend import Backend

    plain_model, ckpt_model = load_model(tiny_model_dir), load_model(tiny_model_dir)
    groups = make_groups(plain_model)
    config = load_config(None, ["train.lr=0.01"])
    checkpointed = load_config(None, ["train.lr=0.01", "learner.activation_checkpointing=true"])
    backend = Backend(checkpointed.learner)
    plain = Trainer(plain_model, config).step(groups)
    ckpt = Trainer(backend.wrap(ckpt_model), checkpointed, backend=backend).step(groups)
    assert ckpt_model.is_gradient_checkpointing
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    for a, b in zip(plain_model.parameters(), ckpt_model.parameters()):
        torch.testing.assert_close(a, b)


def test_a_sharded_trainer_needs_its_kl_reference_passed(tiny_model_dir):
    """A deep copy of a sharded model is no sharded reference: under FSDP the caller passes `wrap_frozen`'s."""
    backend = Backend()
    backend.world_size = 2  # what FSDPBackend reports; the check needs nothing else
    config = load_config(None, ["loss.kl_coef=0.1"])
    with pytest.raises(ValueError, match="wrap_frozen"):
        Trainer(load_model(tiny_model_dir), config, backend=backend)
    assert Trainer(load_model(tiny_model_dir), config).reference is not None  # one process: a copy will do

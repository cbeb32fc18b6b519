"""Log-prob parity: exact statistics, the trainer's per-step metrics, and the parity command on a real vLLM engine."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from actors.engine import VLLMEngine
from actors.tasks import make_task
from learner.main import load_model
from learner.parity import ParityStats, parity_stats
from learner.trainer import Trainer
from protocol.config import load_config
from scripts.parity import compare, generate, why_failed
from tests.conftest import ROOT
from tests.helpers import make_groups

TINY = ["model.path=builtin:tiny-random", "model.max_model_len=128", "sampling.max_tokens=12", "task.name=token_range"]


def test_parity_stats_are_exact():
    learner = torch.tensor([[0.0, -1.0, -2.0, 5.0]])
    behavior = torch.tensor([[0.0, -1.5, -2.0 - math.log(3), 9.0]])  # the last token is masked out
    mask = torch.tensor([[True, True, True, False]])
    m = parity_stats(learner, behavior, mask).metrics()
    assert m["parity_tokens"] == 3
    assert m["parity_logprob_diff_mean"] == pytest.approx((0.5 + math.log(3)) / 3)
    assert m["parity_logprob_diff_max"] == pytest.approx(math.log(3))
    assert m["parity_kl"] == pytest.approx((math.exp(0.5) - 1.5 + 3 - 1 - math.log(3)) / 3)
    assert m["parity_ratio_outside_frac"] == pytest.approx(1 / 3)  # ratio 3 > 2; 1.65 is inside


def test_parity_stats_add_up_over_micro_batches():
    gen = torch.Generator().manual_seed(0)
    learner, behavior = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    whole = parity_stats(learner, behavior, mask)
    parts = parity_stats(learner[:2], behavior[:2], mask[:2]) + parity_stats(learner[2:], behavior[2:], mask[2:])
    assert parts.tokens == whole.tokens and parts.outside_band == whole.outside_band
    assert parts.abs_diff_sum == pytest.approx(whole.abs_diff_sum) and parts.kl_sum == pytest.approx(whole.kl_sum)
    assert parts.abs_diff_max == whole.abs_diff_max
    assert parity_stats(learner, behavior, torch.zeros_like(mask)) == ParityStats()


@pytest.fixture
def model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir)


def on_policy_step(model, groups, version, *overrides):
    config = load_config(None, ["loss.entropy_coef=0.01", "train.lr=0.01", *overrides])  # entropy: every sample trains
    return Trainer(model, config).step(groups, version)


def test_trainer_compares_on_policy_samples(model):
    groups = make_groups(model)
    metrics = on_policy_step(model, groups, 0)
    assert metrics["parity_tokens"] == metrics["completion_tokens"] == 2 * 4 * 6
    assert metrics["parity_logprob_diff_max"] < 1e-4 and metrics["parity_kl"] < 1e-8
    assert metrics["parity_ratio_outside_frac"] == 0.0


def test_trainer_skips_samples_of_other_versions(model):
    groups = make_groups(model)
    assert on_policy_step(model, groups, 1)["parity_tokens"] == 0  # generated at version 0, learner is at 1
    groups[0][0].version_end = 1  # spanned an update: not comparable either
    assert on_policy_step(model, groups, 0)["parity_tokens"] == 2 * 4 * 6 - 6


def test_trainer_flags_a_wrong_behavior_logprob(model):
    groups = make_groups(model)
    groups[1][2].behavior_logprobs[3] += 1.0  # the engine claims e times the learner's probability
    metrics = on_policy_step(model, groups, 0)
    assert metrics["parity_logprob_diff_max"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["parity_ratio_outside_frac"] == pytest.approx(1 / 48)
    assert metrics["parity_kl"] == pytest.approx((math.exp(-1) - 1 + 1) / 48, abs=1e-5)


@pytest.mark.parametrize("correction, compared", [("tis", 48), ("none", 24)])
def test_several_updates_compare_only_pre_step_logprobs(model, correction, compared):
    """With two updates, the second half is compared only when proximal log-probs were recomputed before any update."""
    metrics = on_policy_step(model, make_groups(model), 0, "train.updates_per_step=2", f"loss.correction={correction}")
    assert metrics["parity_tokens"] == compared
    assert metrics["parity_logprob_diff_max"] < 1e-4


@pytest.mark.slow
def test_parity_flags_a_weight_corrupted_on_the_engine_only(tiny_model_dir):
    config = load_config(None, TINY)
    engine = VLLMEngine(tiny_model_dir, config, seed=0)
    task = make_task(config.task, _tokenizer(tiny_model_dir), seed=0)
    learner = load_model(tiny_model_dir).eval()
    clean = sum(compare(learner, generate(engine, task, 3, 4), 1.0), ParityStats()).metrics()
    assert clean["parity_tokens"] == 3 * 4 * 12
    assert clean["parity_logprob_diff_mean"] < 1e-4 and clean["parity_ratio_outside_frac"] == 0.0

    corrupted = load_model(tiny_model_dir).state_dict()
    corrupted["model.layers.1.mlp.down_proj.weight"] = corrupted["model.layers.1.mlp.down_proj.weight"] * 4.0
    engine.load_weights(corrupted)
    flagged = sum(compare(learner, generate(engine, task, 3, 4), 1.0), ParityStats()).metrics()
    assert flagged["parity_logprob_diff_mean"] > 100 * max(clean["parity_logprob_diff_mean"], 1e-5)
    assert flagged["parity_kl"] > 1e-3


def test_non_finite_logprobs_fail_the_check(model):
    """Found by a helper's hunt: a NaN mean compares false with the tolerance, so NaN engine log-probs passed."""
    groups = make_groups(model)
    for s in groups[0]:
        s.behavior_logprobs = s.behavior_logprobs * float("nan")
    stats = sum(compare(model.eval(), groups, 1.0), ParityStats()).metrics()
    assert stats["parity_ratio_outside_frac"] == pytest.approx(len(groups[0]) / sum(map(len, groups)))  # NaN ratios lie outside
    assert "not finite" in why_failed(stats, tolerance=0.01)
    assert why_failed({**stats, "parity_tokens": 0}, 0.01) == "no tokens were compared"
    clean = sum(compare(model.eval(), groups[1:], 1.0), ParityStats()).metrics()
    assert why_failed(clean, tolerance=10.0) is None and "> tolerance" in why_failed(clean, tolerance=0.0)


@pytest.mark.slow
def test_parity_command_prints_the_table_and_passes(tiny_model_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "launch.py"), "--role", "parity", "--prompts", "2", *TINY, f"run.dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engine vs learner log-probs" in done.stdout and "parity ok" in done.stdout
    strict = subprocess.run([*cmd, "--tolerance", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=_env(tmp_path))
    assert strict.returncode == 1 and "parity check failed" in strict.stdout


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _env(tmp_path):
    import os

    return {**os.environ, "TMPDIR": str(tmp_path), "VLLM_RPC_BASE_PATH": str(tmp_path)}

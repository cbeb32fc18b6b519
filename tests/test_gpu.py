"""GPU checks of the learner (skipped without CUDA): FSDP2 on one GPU with bf16 mixed precision."""

from __future__ import annotations

import pytest
import torch

from learner.backend import FSDPBackend, make_backend
from learner.main import load_model
from learner.trainer import Trainer
from protocol.buckets import Assembler
from protocol.config import load_config
from tests.helpers import make_groups
from tests.test_weights import assert_same

pytestmark = pytest.mark.gpu


@pytest.fixture
def one_rank(monkeypatch) -> FSDPBackend:
    """The backend a learner alone on a GPU gets: FSDP2 of one rank (no rendezvous) with bf16 parameters."""
    backend = alone_on_the_gpu(monkeypatch, [])
    yield backend
    backend.close()


def alone_on_the_gpu(monkeypatch, overrides: list[str]) -> FSDPBackend:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    backend = make_backend(load_config(None, overrides).learner)
    assert isinstance(backend, FSDPBackend) and backend.world_size == 1 and backend.device.type == "cuda"
    return backend


def test_a_learner_without_mixed_precision_still_trains_on_the_gpu(tiny_model_dir, monkeypatch):
    """Found by a review: a one-process learner's backend kept every tensor on the CPU, GPU or not."""
    backend = alone_on_the_gpu(monkeypatch, ["learner.mixed_precision=false"])
    try:
        model = backend.wrap(load_model(tiny_model_dir))
        metrics = Trainer(model, load_config(None, []), backend=backend).step(make_groups(load_model(tiny_model_dir)))
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    finally:
        backend.close()


def test_sharding_moves_the_model_to_the_gpu_block_by_block(tiny_model_dir, one_rank, monkeypatch):
    """`wrap` moved the whole model to the GPU before `fully_shard`, so with N ranks each GPU briefly held all of it.
    Now FSDP moves each block as it shards it: the GPU holds the blocks sharded so far, and in the end everything."""
    import torch.distributed.fsdp as fsdp

    model = load_model(tiny_model_dir)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    held_before: list[int] = []  # GPU bytes allocated as each fully_shard call begins
    shard = fsdp.fully_shard

    def noting_what_the_gpu_holds(module, **kwargs):
        held_before.append(torch.cuda.memory_allocated())
        return shard(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", noting_what_the_gpu_holds)
    base = torch.cuda.memory_allocated()
    model = one_rank.wrap(model)
    assert len(held_before) == len(model.model.layers) + 1
    assert held_before[0] - base < block_bytes  # nothing of the model on the GPU before the first block is sharded
    assert held_before[-1] - base < model_bytes  # nor all of it before the root (embeddings, head) is
    assert all(t.device.type == "cuda" for t in (*model.parameters(), *model.buffers()))
    assert torch.isfinite(torch.tensor(Trainer(model, load_config(None, []), backend=one_rank).step(make_groups(load_model(tiny_model_dir)))["loss"]))


def test_fsdp_bf16_step_on_one_gpu(tiny_model_dir, one_rank):
    config = load_config(None, ["train.lr=0.01", "train.micro_batch_size=3"])  # several micro-batches
    model = load_model(tiny_model_dir)
    groups = make_groups(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = one_rank.wrap(model)
    computed: list[torch.dtype] = []
    model.model.layers[0].register_forward_hook(lambda _module, _inputs, out: computed.append((out[0] if isinstance(out, tuple) else out).dtype))
    metrics = Trainer(model, config, backend=one_rank).step(groups)
    assert computed and set(computed) == {torch.bfloat16}
    after = one_rank.full_state_dict(model)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())


def test_fsdp_gathers_straight_into_the_cuda_ipc_buffer(tiny_model_dir, one_rank, endpoints):
    """The learner's publish path on a GPU: each gathered parameter lands in the IPC buffer it is served
    from (no CPU copy), and the served buckets pass their device checksums and equal the CPU gather."""
    from learner.gpu_weights import CudaIpcWeightServer

    server = CudaIpcWeightServer(endpoints["weights"], 1 << 16)
    try:
        model = one_rank.wrap(load_model(tiny_model_dir))
        expected = {k: v.clone() for k, v in one_rank.full_state_dict(model).items()}
        views = one_rank.full_state_dict(model, server.stage)
        assert all(v.is_cuda and v.dtype == torch.float32 for v in views.values())
        server.publish(1, views)
        latest = server._latest
        assert latest.flat.data_ptr() == server._buffers[0].tensor.data_ptr() and len(latest.buckets) > 1
        assembler = Assembler(latest.manifest)  # verifies each bucket's sum64
        for index, bucket in enumerate(latest.buckets):
            assembler.add(index, bucket)
        got = {k: v.cpu() for k, v in assembler.state_dict().items()}
        assert_same(got, expected)
    finally:
        server.close()

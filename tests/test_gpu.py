"""GPU checks of the learner (skipped without CUDA): FSDP2 on one GPU with bf16 mixed precision."""

from __future__ import annotations

import pytest
import torch

from learner.backend import FSDPBackend
from learner.main import load_model
from learner.trainer import Trainer
from protocol.config import load_config
from protocol.transport import free_port
from tests.helpers import make_groups

pytestmark = pytest.mark.gpu


def test_fsdp_bf16_step_on_one_gpu(tiny_model_dir, monkeypatch):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    config = load_config(None, ["train.lr=0.01", "learner.mixed_precision=true"])
    backend = FSDPBackend(config.learner)
    try:
        model = load_model(tiny_model_dir)
        groups = make_groups(model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model = backend.wrap(model)
        metrics = Trainer(model, config, backend=backend).step(groups)
        after = backend.full_state_dict(model)
        assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())
    finally:
        backend.close()

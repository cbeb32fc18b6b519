"""Shared fixtures: free ports, the tiny built-in model, GPU skipping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from protocol.transport import free_ports

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def endpoints() -> dict[str, str]:
    broker, weights = free_ports(2)
    return {"broker": f"127.0.0.1:{broker}", "weights": f"127.0.0.1:{weights}"}


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from protocol.models import resolve_model

    return resolve_model("builtin:tiny-random")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

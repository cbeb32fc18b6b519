"""GPU weight transports, bit-exact (need CUDA: skipped here, UNVERIFIED until run on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from protocol.errors import WeightTransferError
from tests.conftest import ROOT
from tests.test_weights import assert_same, state

pytestmark = pytest.mark.gpu
SENDER = """
import sys, time
from learner.gpu_weights import {cls}
from tests.test_weights import state
server = {cls}(sys.argv[1], 1 << 16{extra})
server.publish(1, state(1, 256))
print("published", flush=True)
time.sleep(120)
"""


def start(cls: str, endpoint: str, extra: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SENDER.format(cls=cls, extra=extra), endpoint], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "published"
    return proc


def test_cuda_ipc_round_trip_is_bit_exact(endpoints):
    from actors.gpu_weights import CudaIpcWeightClient

    sender = start("CudaIpcWeightServer", endpoints["weights"])
    client = CudaIpcWeightClient(endpoints["weights"], "gpu-actor", timeout_s=30)
    try:
        version, weights = client.fetch(have=0)
        assert version == 1 and all(t.is_cuda for t in weights.values())
        assert_same({k: v.cpu() for k, v in weights.items()}, state(1, 256))
    finally:
        client.close()
        sender.kill()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL group of learner + actor needs two GPUs")
def test_nccl_broadcast_is_bit_exact(endpoints):
    from actors.gpu_weights import NcclWeightClient

    sender = start("NcclWeightServer", endpoints["weights"], ", actors=1")
    torch.cuda.set_device(1)
    client = NcclWeightClient(endpoints["weights"], "gpu-actor", timeout_s=60)
    try:
        version, weights = client.fetch(have=0)
        assert version == 1
        assert_same({k: v.cpu() for k, v in weights.items()}, state(1, 256))
    finally:
        client.close()
        sender.kill()


def test_nccl_bucket_broadcast_on_one_rank_round_trips():
    """The cupy calls of the NCCL path (communicator, per-bucket broadcast on torch's stream) and device checksums."""
    from cupy.cuda import nccl

    from learner.gpu_weights import stage_on_gpu
    from protocol.buckets import Assembler
    from protocol.gpu import broadcast_buckets

    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    staged = stage_on_gpu(1, state(1, 256), 1 << 16)
    assert len(staged.buckets) > 1
    broadcast_buckets(comm, staged.buckets)
    assembler = Assembler(staged.manifest)
    for index, bucket in enumerate(staged.buckets):
        assembler.add(index, bucket)
    assert_same({k: v.cpu() for k, v in assembler.state_dict().items()}, state(1, 256))
    staged.buckets[0][:8] += 1  # a flipped byte on the device is caught by sum64
    with pytest.raises(WeightTransferError, match="corrupted"):
        Assembler(staged.manifest).add(0, staged.buckets[0])

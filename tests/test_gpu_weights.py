"""GPU weight transports, bit-exact (need CUDA: skipped on CPU machines; passed on an H100, docs/gpu.md)."""

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
import sys
from learner.gpu_weights import {cls}
from tests.test_weights import state
server = {cls}(sys.argv[1], 1 << 16{extra})
for line in sys.stdin:  # one version to publish per line
    server.publish(int(line), state(int(line), 256))
    print("published", flush=True)
"""


def start(cls: str, endpoint: str, extra: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SENDER.format(cls=cls, extra=extra), endpoint], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    publish(proc, 1)
    return proc


def publish(proc: subprocess.Popen, version: int) -> None:
    proc.stdin.write(f"{version}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "published"


def test_cuda_ipc_round_trips_are_bit_exact_across_versions(endpoints):
    """Versions 1-3: the learner's two buffers are each mapped once and rewritten in turn."""
    from actors.gpu_weights import CudaIpcWeightClient

    sender = start("CudaIpcWeightServer", endpoints["weights"])
    client = CudaIpcWeightClient(endpoints["weights"], "gpu-actor", timeout_s=30)
    try:
        for version in (1, 2, 3):
            if version > 1:
                publish(sender, version)
            got, weights = client.fetch(have=version - 1)
            assert got == version and all(t.is_cuda for t in weights.values())
            assert_same({k: v.cpu() for k, v in weights.items()}, state(version, 256))
        assert len(client._mapped) == 2
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

"""GPU weight transports, bit-exact (`gpu` tests need CUDA: skipped on CPU machines; passed on an H100, docs/gpu.md).

One test runs on every machine: the GPU senders' staging logic with host memory standing in for the
device (and `sum64` in Triton's interpreter), since the real device path can only run on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from protocol.errors import WeightTransferError
from protocol.weights import unique_tensors
from tests.conftest import ROOT
from tests.test_weights import assert_same, state

SENDER = """
import sys
from learner.gpu_weights import {cls}
from tests.test_gpu_weights import staged_copy
from tests.test_weights import state
server = {cls}(sys.argv[1], 1 << 16{extra})
for line in sys.stdin:  # one version to publish per line
    weights = state(int(line), 256)
    server.publish(int(line), staged_copy(server, weights) if {staged} else weights)
    print("published", flush=True)
"""
STAND_IN = """
import torch
from learner.gpu_weights import GpuWeightServer
from protocol.buckets import Assembler
from protocol.transport import free_port
from tests.test_gpu_weights import staged_copy
from tests.test_weights import assert_same, state

class HostMemoryStandIn(GpuWeightServer):
    def _device_flat(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def _reply_body(self, published):
        return {"mode": "stand-in"}

def served(server, version):
    latest = server._latest
    assembler = Assembler(latest.manifest)  # checks every bucket's sum64 against the eager definition
    for index, bucket in enumerate(latest.buckets):
        assembler.add(index, bucket)
    assert latest.manifest.version == version and latest.manifest.checksum == "sum64"
    return latest, assembler.state_dict()

server = HostMemoryStandIn(f"127.0.0.1:{free_port()}", 1 << 12)
views = staged_copy(server, state(1, 256))
server.publish(1, views)
latest, got = served(server, 1)
assert len(latest.buckets) > 1 and all(got[k].data_ptr() == views[k].data_ptr() for k in got)  # served from the staged buckets
assert_same(got, state(1, 256))
server.publish(2, state(2, 256))  # not the staged views: copied into buckets of its own
latest, got = served(server, 2)
assert_same(got, state(2, 256))
views = staged_copy(server, state(3, 256))
try:
    server.publish(3, {**state(3, 256), "model.norm.weight": views["model.norm.weight"]})
    raise AssertionError("publish took some staged views but not all")
except ValueError:
    pass
server.close()
print("ok")
"""

IPC_TURNS = """
import itertools
import torch
import learner.gpu_weights as gpu_weights
from protocol.buckets import Assembler, bucket_views
from protocol.transport import free_port
from tests.test_gpu_weights import staged_copy
from tests.test_weights import assert_same, state

class HostMemoryIpcBuffer:  # stands in for a cudaMalloc'd buffer and its IPC handle
    names = itertools.count()

    def __init__(self, nbytes):
        self.nbytes, self.tensor, self.handle = nbytes, torch.zeros(nbytes, dtype=torch.uint8), next(self.names)

    def free(self):
        pass

gpu_weights.IpcBuffer = HostMemoryIpcBuffer
torch.cuda.synchronize = lambda: None
server = gpu_weights.CudaIpcWeightServer(f"127.0.0.1:{free_port()}", 1 << 12)

def served(want):
    latest = server._latest
    buffer = next(b for b in server._buffers if b.handle == latest.reply["handle"])
    assembler = Assembler(latest.manifest)  # what an actor does with the buffer the reply names
    for index, bucket in enumerate(bucket_views(buffer.tensor[: latest.manifest.total_bytes], latest.manifest)):
        assembler.add(index, bucket)
    assert_same(assembler.state_dict(), want)
    return buffer.handle

handles = []
server.publish(1, state(1, 256))
handles.append(served(state(1, 256)))
server.publish(2, staged_copy(server, state(2, 256)))
handles.append(served(state(2, 256)))
staged_copy(server, state(3, 256))
server.publish(3, state(4, 256))  # not the staged views: copied into the same next buffer
handles.append(served(state(4, 256)))
staged_copy(server, state(5, 256))
server.publish(5, staged_copy(server, state(5, 256)))  # staged twice: the second is published
handles.append(served(state(5, 256)))
assert handles == [0, 1, 0, 1], handles  # two buffers in turn, never the one being served
server.close()
print("ok")
"""


def staged_copy(server, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a sharded learner does: ask `stage` for the next version's tensors and write each into its view."""
    unique = unique_tensors(weights)  # tied tensors are asked for once, under their first name
    views = server.stage({name: (t.dtype, tuple(t.shape)) for name, t in unique.items()})
    for name, view in views.items():
        view.copy_(unique[name])
    return {name: views.get(name, views["model.embed_tokens.weight"]) for name in weights}


def test_staged_versions_are_served_from_their_buckets_host_memory_stand_in():
    """`stage` then `publish` serves the staged buckets without a copy, with correct `sum64`s; other tensors are copied;
    some staged views but not all are refused. Host memory stands in for the device here (no GPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", STAND_IN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_cuda_ipc_versions_go_into_its_two_buffers_in_turn_host_memory_stand_in():
    """Copied, staged, staged then not used, staged twice: each reply names the buffer its version was written to,
    and the next version goes into the other. Host memory stands in for the IPC buffers here (no GPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", IPC_TURNS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def start(cls: str, endpoint: str, extra: str = "", staged: bool = False) -> subprocess.Popen:
    script = SENDER.format(cls=cls, extra=extra, staged=staged)
    proc = subprocess.Popen([sys.executable, "-c", script, endpoint], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    publish(proc, 1)
    return proc


def publish(proc: subprocess.Popen, version: int) -> None:
    proc.stdin.write(f"{version}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "published"


def test_an_nccl_actor_that_gave_up_waiting_is_not_counted_for_the_broadcast():
    """Found by a helper's hunt (reading only; needs two GPUs): an actor that gave up waiting stayed on the list,
    so the broadcast started without it and held the learner and every other actor for good."""
    from learner.gpu_weights import Waiter, still_waiting

    now = 10_000.0
    waiting = {b"a": Waiter(1, 5, now - 1.0), b"b": Waiter(7, 5, now + 1.0), b"c": Waiter(2, 4, now + 500.0)}
    assert still_waiting(waiting, now) == {b"b": Waiter(7, 5, now + 1.0), b"c": Waiter(2, 4, now + 500.0)}


@pytest.mark.gpu
@pytest.mark.parametrize("staged", [False, True], ids=["published", "staged"])
def test_cuda_ipc_round_trips_are_bit_exact_across_versions(endpoints, staged):
    """Versions 1-3: the learner's two buffers are each mapped once and rewritten in turn, whether the
    weights were copied in by `publish` or written into the views `stage` handed out (a sharded learner)."""
    from actors.gpu_weights import CudaIpcWeightClient

    sender = start("CudaIpcWeightServer", endpoints["weights"], staged=staged)
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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

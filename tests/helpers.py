"""Sample and group builders, wire helpers, a peer played by a ROUTER in a thread, and role processes, shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from protocol.errors import ProtocolError
from protocol.sample import Sample
from protocol.transport import bind_router, free_port
from protocol.wire import decode, encode, encode_samples, per_sample_columns, samples_from
from tests.conftest import ROOT

# the vocabulary size the wire tests validate tokens against, and a sample's metadata fields in wire order
VOCAB = 100
META_FIELDS = [
    "reward",
    "group_id",
    "group_size",
    "index",
    "version_start",
    "version_end",
    "actor_id",
    "incarnation",
    "seq",
    "finish_reason",
    "metadata",
]


def make_sample(**overrides) -> Sample:
    """A valid sample (3 prompt tokens, 2 completion tokens); any field can be overridden."""
    fields = dict(
        prompt_ids=np.array([1, 2, 3], dtype=np.int32),
        completion_ids=np.array([4, 5], dtype=np.int32),
        behavior_logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        reward=1.0,
        group_id="g0",
        group_size=4,
        index=0,
        version_start=0,
        version_end=0,
        actor_id="a",
        incarnation="i0",
        seq=0,
        finish_reason="stop",
        metadata={},
    )
    fields.update(overrides)
    return Sample(**fields)


def make_wire_sample(**overrides) -> Sample:
    """`make_sample` with non-default versions, ids and metadata, so that every field is exercised on the wire."""
    return make_sample(**{**dict(group_size=4, version_start=1, version_end=2, actor_id="actor-0", incarnation="inc-0", metadata={"task": "arithmetic", "ground_truth": 7}), **overrides})


def over_wire(frames: list) -> list[bytes]:
    """What a receiver gets: independent byte strings, nothing shared with the sender."""
    return [bytes(f) for f in frames]


def raise_reason(frames: list, **kwargs) -> str:
    """The reason of the ProtocolError that decoding `frames` raises."""
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kwargs)
    return info.value.reason


def assert_same_sample(got: Sample, want: Sample) -> None:
    """`got` is `want`: arrays bit-exact with the same dtype and shape, metadata equal and of the same type."""
    assert isinstance(got, Sample)
    for name in ("prompt_ids", "completion_ids", "behavior_logprobs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name  # bit-exact, NaN-safe
    for name in META_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
        assert type(getattr(got, name)) is type(getattr(want, name)), name


def relay(samples: list[Sample], patch: Callable[[dict[str, list]], None] | None = None, vocab_size=VOCAB) -> list:
    """Encode, send, let `patch` tamper with the metadata columns, re-encode, send, validate."""
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    if patch is not None:
        body["samples"] = per_sample_columns(body["samples"], len(samples))
        patch(body["samples"])
        _, body, arrays = decode(over_wire(encode("samples", body, arrays)))
    return samples_from(body, arrays, vocab_size)


def v1_message(sample: Sample) -> list[bytes]:
    """A schema version 1 samples message (one metadata map and three frames per sample, CRC-32)."""
    meta = {name: getattr(sample, name) for name in META_FIELDS}
    arrays = [sample.prompt_ids, sample.completion_ids, sample.behavior_logprobs]
    crc = 0
    for a in arrays:
        crc = zlib.crc32(a.tobytes(), crc)
    header = {"v": 1, "type": "samples", "body": {"samples": [meta]}, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays], "crc": crc}
    return [msgpack.packb(header, use_bin_type=True), *(a.tobytes() for a in arrays)]


def make_groups(model, num_groups: int = 2, n: int = 4, length: int = 6, seed: int = 0):
    """Samples drawn from the model itself, rewarded by whether their first token is even."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        prompt = torch.randint(0, 1000, (5,), generator=gen)
        group = []
        for i in range(n):
            completion = torch.randint(0, 1000, (length,), generator=gen)
            ids = torch.cat([prompt, completion])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, 4:-1], -1).gather(-1, completion[:, None])[:, 0]
            group.append(Sample(
                prompt_ids=prompt.numpy().astype(np.int32), completion_ids=completion.numpy().astype(np.int32),
                behavior_logprobs=logp.numpy().astype(np.float32), reward=float(completion[0] % 2 == 0),
                group_id=f"g{g}", group_size=n, index=i, version_start=0, version_end=0,
                actor_id="a", incarnation="x", seq=g * n + i, metadata={"correct": bool(completion[0] % 2 == 0)},
            ))  # fmt: skip
        groups.append(group)
    return groups


def start_role(role: str, run_dir: Path, endpoints: dict[str, str], *extra: str, name: str = "") -> subprocess.Popen:
    """`launch.py --role role` on configs/tiny.yaml (10 steps) with `extra` arguments; output in <run_dir>/<name or role>.log."""
    log = (run_dir / f"{name or role}.log").open("ab")
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", role, "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoints['broker']}", f"endpoints.weights={endpoints['weights']}",
        "train.steps=10", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(run_dir)})


@contextmanager
def role_processes(*processes: subprocess.Popen) -> Iterator[list[subprocess.Popen]]:
    """A test's role processes, as a list it may add to; any still running when the block ends (a failed
    assertion) is killed, so no test leaves a role behind."""
    running = list(processes)
    try:
        yield running
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()


def finish_run(run_dir: Path, learner: subprocess.Popen, *others: subprocess.Popen) -> None:
    """The learner trains its last step and exits 0; then the other roles, told to stop, exit 0 by themselves."""
    assert learner.wait(timeout=300) == 0, (run_dir / "learner.log").read_text()[-3000:]
    assert [p.wait(timeout=60) for p in others] == [0] * len(others)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@contextmanager
def router_in_thread(answer: Callable[[zmq.Socket, bytes, str, dict], None]) -> Iterator[str]:
    """A real ROUTER in a thread that plays a peer: each request is decoded and handed to
    `answer(router, identity, kind, body)`, in order. Yields the endpoint; stopped and closed after."""
    endpoint = f"127.0.0.1:{free_port()}"
    router, stop = bind_router(endpoint, 1 << 24), threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(20):
                identity, *frames = router.recv_multipart()
                kind, body, _ = decode(frames)
                answer(router, identity, kind, body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join()
        router.close(linger=0)

"""The CPU weight channels (tcp stream, same-host shm) between real processes and sockets.

Bit-exact state dicts after every sync, the newest version for late joiners, no
/dev/shm files left behind (also after kill -9), and a sender killed mid-stream
leaves the receiver with its old weights, a counted failure, and a clean catch-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import protocol.shm
from actors.weights import WeightClient, make_weight_receiver
from learner.weights import WeightServer, make_weight_sender
from protocol.buckets import Manifest, as_bytes
from protocol.config import load_config
from protocol.errors import RoleFailed, WeightTransferError
from protocol.shm import PREFIX, SHM_DIR
from protocol.weights import resolve_transport
from tests.conftest import ROOT

SENDER = """
import sys, time, torch
from learner.weights import WeightServer
from tests.test_weights import state
server = WeightServer(sys.argv[1], bucket_bytes=int(sys.argv[2]), shm=sys.argv[3] == "shm")
server.publish(int(sys.argv[4]), state(int(sys.argv[4]), int(sys.argv[5])))
print("published", flush=True)
time.sleep(600)
"""


def state(seed: int, width: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(50, width, generator=gen)
    return {
        "model.embed_tokens.weight": embed,
        "model.layers.0.mlp.weight": torch.randn(width * 4, width, generator=gen),
        "model.norm.weight": torch.randn(width, generator=gen),
        "lm_head.weight": embed,  # tied: the same storage, sent once
        "model.half": torch.randn(3, 4, generator=gen).bfloat16(),
    }


def assert_same(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(received) == set(expected) - {"lm_head.weight"}
    for name, tensor in received.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def refused(client: WeightClient, reason: str) -> WeightTransferError:
    """The error of a fetch that must fail with `reason`, the first failure the client counts."""
    with pytest.raises(WeightTransferError) as err:
        client.fetch(have=0)
    assert err.value.reason == reason and client.failures == {reason: 1}
    return err.value


def assert_fetches(client: WeightClient, version: int) -> None:
    """The next fetch brings `version`, whole."""
    got, weights = client.fetch(have=0)
    assert got == version
    assert_same(weights, state(version))


def our_segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}-*"))


def start_sender(endpoint: str, mode: str, version: int, width: int, bucket_bytes: int = 1 << 16) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SENDER, endpoint, str(bucket_bytes), mode, str(version), str(width)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "published"
    return proc


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_sync_is_bit_exact_and_the_newest_version_wins(endpoints, mode):
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=mode == "shm")
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    try:
        assert client.fetch(have=0) is None  # nothing published yet
        server.publish(1, state(1))
        version, weights = client.fetch(have=0)
        assert version == 1
        assert_same(weights, state(1))
        server.publish(2, state(2))
        server.publish(3, state(3))  # an actor that was away catches up in one transfer
        version, weights = client.fetch(have=1)
        assert version == 3
        assert_same(weights, state(3))
        assert client.fetch(have=3) is None
        assert server.served == {"shm": 2 if mode == "shm" else 0, "stream": 0 if mode == "shm" else 2}
        late = WeightClient(endpoints["weights"], "late-actor", timeout_s=10)
        version, weights = late.fetch(have=0)  # a new actor gets the current version at once
        late.close()
        assert version == 3
        assert_same(weights, state(3))
    finally:
        client.close()
        server.close()


def test_a_shm_learner_removes_the_segments_a_killed_learner_left(endpoints, caplog, tmp_path, monkeypatch):
    """The sender's part of tests/test_shm.py's orphan case: a learner restarted after its process group was
    killed (tracker and all) frees the memory the killed one held."""
    monkeypatch.setattr(protocol.shm, "SHM_DIR", tmp_path)
    orphan = tmp_path / f"{PREFIX}1-0123"  # no sender holds its lock
    orphan.write_bytes(bytes(1 << 20))
    server = WeightServer(endpoints["weights"], shm=True)
    server.close()
    assert not orphan.exists() and "removed 1 MiB of weight segments" in caplog.text


def views_of(mapping, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor lies inside `mapping` (a reader's view of a segment, not a copy)."""
    start = as_bytes(mapping.map).data_ptr()
    return all(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + len(mapping.map) for t in tensors.values())


def test_shm_readers_load_in_place_and_a_leased_segment_is_never_rewritten(endpoints):
    """Two segments in turn; a reader verifies a version where it lies and holds a lease until it has loaded it.
    Until 2026-11-28 (eleventh session) readers copied every version out into a buffer of their own first."""
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    try:
        server.publish(1, state(1))
        first = our_segments(os.getpid())
        _, v1 = client.fetch(have=0)
        assert views_of(client._mapped[first[0]], v1) and client._buffer.numel() == 0  # no copy of the model
        server.publish(2, state(2))
        both = our_segments(os.getpid())
        assert len(first) == 1 and len(both) == 2 and set(first) < set(both)
        server.publish(3, state(3))  # version 1's segment is leased: given up, version 3 goes to a fresh one
        now = our_segments(os.getpid())
        assert len(now) == 2 and first[0] not in now
        assert_same(v1, state(1))  # what the reader holds is untouched
        client.release()
        assert first[0] not in client._mapped  # given up by the learner: its memory goes with the views
        version, v3 = client.fetch(have=1)
        assert version == 3
        assert_same(v3, state(3))
        client.release()
        for version in (4, 5):  # released: both segments are written in turn again, no new one
            server.publish(version, state(version))
            assert our_segments(os.getpid()) == now
        assert_same(client.fetch(have=3)[1], state(5))
        assert len(client._mapped) == 1  # versions 3 and 5 share one; version 1's, given up, was let go at release
    finally:
        client.close()
        server.close()
    assert our_segments(os.getpid()) == []


def test_a_segment_rewritten_before_the_reader_leases_it_is_refused_and_the_next_fetch_is_clean(endpoints, monkeypatch):
    """A learner publishing twice between its reply and the reader's lease is writing into the segment the reply
    named: the lease is refused (`superseded`), the reader keeps its weights and gets the newest version next."""
    import actors.weights as actor_weights

    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    real_mapping, raced = actor_weights.Mapping, []

    def mapping_then_two_publishes(name, size):
        if not raced:
            raced.append(name)
            server.publish(3, state(3))  # into the other segment
            server.stage({"w": (torch.float32, (8,))})  # claims the segment the reply named, for version 4
        return real_mapping(name, size)

    try:
        server.publish(1, state(1))
        server.publish(2, state(2))  # the client maps neither yet
        monkeypatch.setattr(actor_weights, "Mapping", mapping_then_two_publishes)
        refused(client, "superseded")
        assert_fetches(client, 3)
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_a_version_published_without_waiting_arrives_exactly_while_it_is_packed(endpoints, mode):
    """The learner publishes with wait=False and settles before its optimizer step changes the tensors."""
    live = {f"layer{i}": torch.full((1 << 15,), float(i)) for i in range(48)}  # 6 MB in 48 buckets
    server = WeightServer(endpoints["weights"], bucket_bytes=1 << 17, shm=mode == "shm")
    client = WeightClient(endpoints["weights"], "actor", shm=mode == "shm")
    try:
        for version in (1, 2, 3):
            expected = {name: tensor.clone() for name, tensor in live.items()}
            server.publish(version, live, wait=False)
            got_version, got = client.fetch(version - 1)  # asks while the packer may still run
            server.settle()
            for tensor in live.values():
                tensor.add_(1.0)  # the next optimizer step
            assert got_version == version and all(torch.equal(got[name], expected[name]) for name in live)
        assert server.served == {"shm": 3, "stream": 0} if mode == "shm" else {"shm": 0, "stream": 3}
    finally:
        client.close()
        server.close()


def specs_of(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in weights.items() if name != "lm_head.weight"}


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_weights_written_into_staged_buffers_are_served_from_there_without_a_copy(endpoints, mode):
    """What a sharded learner does: ask for `stage`, gather each tensor into its view, publish the views."""
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=mode == "shm")
    client = WeightClient(endpoints["weights"], "actor", timeout_s=10, shm=mode == "shm")
    try:
        for version in (1, 2, 3):
            expected = state(version)
            views = server.stage(specs_of(expected))
            for name, view in views.items():
                view.copy_(expected[name])
            views["lm_head.weight"] = views["model.embed_tokens.weight"]  # a tied alias, as the gather returns it
            server.publish(version, views, wait=False)
            served = server._latest.flat
            assert all(served.data_ptr() <= v.data_ptr() < served.data_ptr() + served.numel() for v in views.values())
            got_version, got = client.fetch(have=version - 1)
            server.settle()
            assert got_version == version
            assert_same(got, expected)
        if mode == "shm":
            assert len(our_segments(os.getpid())) == 2  # staged versions take the two segments in turn, as publish does
        other = state(4)
        views = server.stage(specs_of(other))
        with pytest.raises(ValueError, match="not exactly them"):  # packing would copy the buffer onto itself
            server.publish(4, {**other, "model.norm.weight": views["model.norm.weight"]})
        server.publish(4, other)  # not the staged views: copied as usual, the staged buffer reused
        assert_same(client.fetch(have=3)[1], other)
    finally:
        client.close()
        server.close()
    assert our_segments(os.getpid()) == []


def test_empty_tensors_are_sent_each_and_never_taken_for_ties(endpoints):
    """Found by a helper's hunt: ties were found by data_ptr, which is 0 for every empty tensor, so the second
    empty tensor was dropped, and publishing staged views of two empty tensors raised."""
    server = WeightServer(endpoints["weights"], bucket_bytes=256)
    client = WeightClient(endpoints["weights"], "actor", timeout_s=10)
    try:
        weights = {"a.empty": torch.empty(0, 4), "w": torch.randn(8), "b.empty": torch.empty(3, 0)}
        server.publish(1, weights)
        assert_same(client.fetch(have=0)[1], weights)
        views = server.stage(specs_of(weights))
        views["w"].copy_(torch.arange(8.0))
        server.publish(2, views)
        assert_same(client.fetch(have=1)[1], {**weights, "w": torch.arange(8.0)})
    finally:
        client.close()
        server.close()


def test_a_weight_server_that_cannot_listen_says_so_at_once(endpoints):
    """Found by a helper's hunt: the bind error only ended the server's thread, so a learner whose port a stale
    learner still held published into the void while its actors got the stale learner's weights."""
    first = WeightServer(endpoints["weights"], bucket_bytes=256)
    try:
        with pytest.raises(RoleFailed, match="cannot listen on"):
            WeightServer(endpoints["weights"], bucket_bytes=256)
    finally:
        first.close()


def test_an_actor_that_cannot_open_the_learners_segments_falls_back_to_streams(endpoints, monkeypatch):
    """Found by a helper's hunt: a container with its own /dev/shm on the learner's host (same host id) was answered
    `shm` forever and never got weights. Its private /dev/shm is faked by making every open fail."""
    import actors.weights as actor_weights

    def private_shm(name, size):
        raise WeightTransferError("shm_unavailable", f"segment {name}: No such file or directory")

    monkeypatch.setattr(actor_weights, "Mapping", private_shm)
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor", timeout_s=10, shm=True)
    try:
        server.publish(1, state(1))
        for _ in range(actor_weights.SHM_TRIES):
            with pytest.raises(WeightTransferError, match="shm_unavailable"):
                client.fetch(have=0)
        assert_same(client.fetch(have=0)[1], state(1))
        assert server.served["stream"] == 1 and not client.shm
    finally:
        client.close()
        server.close()


def test_the_padding_between_tensors_is_sent_as_zeros(endpoints):
    """Found by a helper's hunt: the tcp buffer came from torch.empty, so the learner's stale heap went out on the wire."""
    server = WeightServer(endpoints["weights"], bucket_bytes=1024)
    try:
        for _ in range(8):  # freed heap of the buffer's size, full of ones, for torch.empty to hand back
            torch.full((1024,), 255, dtype=torch.uint8)
        server.publish(1, {"a": torch.full((3,), -1.0), "b": torch.full((5,), -1.0)})
        flat = server._latest.flat
        assert flat[12:64].eq(0).all() and flat[64 + 20 :].eq(0).all()  # offsets are multiples of 64 bytes
    finally:
        server.close()


def test_segments_missed_now_and_then_keep_the_actor_on_shm(endpoints, monkeypatch):
    """Only misses in a row mean a private /dev/shm: fetches from the other, mapped segment in between count as
    successes (a review found they did not, so scattered misses added up to a switch to streams)."""
    import actors.weights as actor_weights

    real_mapping, unlucky = actor_weights.Mapping, []

    def mapping(name, size):
        if name in unlucky:
            raise WeightTransferError("shm_unavailable", f"segment {name}: superseded")
        return real_mapping(name, size)

    monkeypatch.setattr(actor_weights, "Mapping", mapping)
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor", timeout_s=10, shm=True)
    try:
        server.publish(1, state(1))
        assert_same(client.fetch(have=0)[1], state(1))  # the first segment, mapped
        for version in range(2, 2 + 2 * actor_weights.SHM_TRIES, 2):
            server.publish(version, state(version))  # the second segment, which this actor never opens
            unlucky.append(server._latest.segment.name)
            with pytest.raises(WeightTransferError, match="shm_unavailable"):
                client.fetch(have=version - 1)
            server.publish(version + 1, state(version + 1))  # the first again: served from its mapping
            assert_same(client.fetch(have=version - 1)[1], state(version + 1))
        assert client.shm and server.served["stream"] == 0
    finally:
        client.close()
        server.close()


def test_a_remote_actor_gets_a_stream_even_from_a_shm_sender(endpoints):
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "remote-actor", timeout_s=10)
    client.host = "some-other-host/boot"
    try:
        server.publish(1, state(1))
        assert_same(client.fetch(have=0)[1], state(1))
        assert server.served == {"shm": 0, "stream": 1}
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_torn_bytes_are_rejected_and_the_next_version_arrives_clean(endpoints, mode):
    """What a stream or segment overwritten by a later publish looks like: a bucket whose bytes no longer match."""
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=mode == "shm")
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    try:
        server.publish(1, state(1))
        server._latest.buckets[1][3] ^= 0xFF
        refused(client, "checksum")
        server.publish(2, state(2))  # the rest of the broken stream is still queued: it must be skipped
        assert_fetches(client, 2)
    finally:
        client.close()
        server.close()


def test_a_manifest_larger_than_memory_is_a_named_failure_not_a_crash(endpoints):
    """Found by a review: allocating the buffer for it raised torch's RuntimeError, which stopped the actor."""
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    try:
        with pytest.raises(WeightTransferError) as err:
            client._slots(Manifest(1, [], [1 << 62]))
        assert err.value.reason == "bad_manifest" and "cannot hold" in err.value.detail
    finally:
        client.close()


def test_sender_killed_mid_stream_leaves_old_weights_and_the_actor_catches_up_later(endpoints):
    endpoint, width = endpoints["weights"], 2048  # ~67 MB in 64 KiB buckets: far more than socket buffers hold
    client = WeightClient(endpoint, "actor-test", timeout_s=2)
    current = (0, {k: v.clone() for k, v in state(0, width).items()})
    sender = start_sender(endpoint, "tcp", 1, width)
    seen: list[int] = []

    def kill_after_first_bucket(done: int, total: int) -> None:
        seen.append(total)
        if done == 1:
            os.kill(sender.pid, signal.SIGKILL)
            sender.wait()

    try:
        with pytest.raises(WeightTransferError) as err:
            current = client.fetch(current[0], progress=kill_after_first_bucket) or current
        assert err.value.reason == "incomplete"
        assert client.failures == {"incomplete": 1}
        assert len(seen) < seen[0]  # it really was cut off part-way
        assert current[0] == 0
        assert_same({k: v for k, v in current[1].items() if k != "lm_head.weight"}, state(0, width))
        sender = start_sender(endpoint, "tcp", 2, width)  # a restarted learner publishes again
        current = client.fetch(current[0])
        assert current[0] == 2
        assert_same(current[1], state(2, width))
    finally:
        sender.kill()
        sender.wait()
        client.close()


def test_shm_sender_killed_leaves_no_segment_and_readers_keep_their_copy(endpoints):
    sender = start_sender(endpoints["weights"], "shm", 1, 64)
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10)
    try:
        assert our_segments(sender.pid)  # version 1 (and perhaps already the spare for version 2)
        version, weights = client.fetch(have=0)
        assert version == 1
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait()
        deadline = time.monotonic() + 10
        while our_segments(sender.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # the sender's resource tracker unlinks what its dead owner registered
        assert our_segments(sender.pid) == []
        assert_same(weights, state(1, 64))
    finally:
        sender.kill()
        sender.wait()
        client.close()


def test_auto_picks_shm_on_loopback_and_tcp_across_hosts(endpoints):
    config = load_config(None, [f"endpoints.weights={endpoints['weights']}", "learner.weight_bucket_mb=2"])
    sender, receiver = make_weight_sender(config), make_weight_receiver(config, "actor-test")
    assert sender.shm and sender.bucket_bytes == 2 << 20 and receiver.shm
    sender.close()
    receiver.close()
    assert resolve_transport("auto", "127.0.0.1:5556") == "shm"
    assert resolve_transport("auto", "localhost:5556") == "shm"
    assert resolve_transport("auto", "10.0.0.7:5556") == "tcp"
    assert resolve_transport("auto", "0.0.0.0:5556") == "tcp"  # bound on every interface: actors may be remote
    assert resolve_transport("tcp", "127.0.0.1:5556") == "tcp"
    assert load_config(None).learner.weight_transport == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_transports_are_refused_without_cuda():
    with pytest.raises(WeightTransferError) as err:
        resolve_transport("nccl", "127.0.0.1:5556")
    assert err.value.reason == "no_cuda"


def test_a_full_dev_shm_sends_the_version_as_a_stream_instead_of_stopping_the_learner(endpoints, monkeypatch):
    """Found by a review: a leased spare is given up for a fresh segment, and a small /dev/shm (Docker's 64 MB)
    refusing it raised out of `publish`; and (a second review) a version streamed once left every other version
    streamed for good. A refusing /dev/shm is stood in for by a Segment that raises ENOSPC the first time."""
    import errno

    import learner.weights as learner_weights

    class FullOnce(learner_weights.Segment):
        refused = 0

        def __init__(self, size: int) -> None:
            if not FullOnce.refused:
                FullOnce.refused = 1
                raise OSError(errno.ENOSPC, "No space left on device")
            super().__init__(size)

    monkeypatch.setattr(learner_weights, "Segment", FullOnce)
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10, shm=True)
    try:
        for version in range(1, 6):
            server.publish(version, state(version))
            assert_same(client.fetch(have=version - 1)[1], state(version))
            client.release()
        assert server.served == {"shm": 4, "stream": 1} and client.shm
    finally:
        client.close()
        server.close()


def test_without_ofd_locks_the_learner_streams_and_the_actor_asks_for_streams(endpoints, monkeypatch):
    """Found by a review: a claim that raised (Linux before 3.15, some sandboxes) stopped the learner in `publish`, and a
    lease that raised reset the reader's count of misses, so it never switched to streams. Both are stood in for."""
    import actors.weights as actor_weights
    import learner.weights as learner_weights

    class Unlockable(learner_weights.Segment):
        def claim(self) -> bool:
            raise WeightTransferError("shm_unavailable", "cannot lock a weight segment: Invalid argument")

    class Unleasable(actor_weights.Mapping):
        def lease(self) -> bool:
            raise WeightTransferError("shm_unavailable", "cannot lock a weight segment: Invalid argument")

    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=10, shm=True)
    try:
        monkeypatch.setattr(learner_weights, "Segment", Unlockable)
        server.publish(1, state(1))
        assert not server.shm and our_segments(os.getpid()) == []
        assert_same(client.fetch(have=0)[1], state(1))
        monkeypatch.undo()
        monkeypatch.setattr(actor_weights, "Mapping", Unleasable)
        server.shm = True
        server.publish(2, state(2))
        for _ in range(actor_weights.SHM_TRIES):
            with pytest.raises(WeightTransferError) as err:
                client.fetch(have=1)
            assert err.value.reason == "shm_unavailable"
        assert not client.shm
        assert_same(client.fetch(have=1)[1], state(2))
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_a_version_whose_packing_failed_is_refused_at_once_not_after_the_actors_timeout(endpoints, monkeypatch, mode):
    """From the tenth session's list of things left alone: the learner logged the failure and said nothing, so each actor
    waited its whole timeout (60 s in a run) for a reply or bucket that would never come. Packing fails here on the
    second bucket (a stand-in for, say, a tensor that cannot be read)."""
    import learner.weights as learner_weights

    real_pack, packed = learner_weights.pack_bucket, []

    def second_bucket_fails(*args):
        if packed:
            raise RuntimeError("cannot read the tensor")
        packed.append(1)
        return real_pack(*args)

    monkeypatch.setattr(learner_weights, "pack_bucket", second_bucket_fails)
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=mode == "shm")
    client = WeightClient(endpoints["weights"], "actor-test", timeout_s=30, shm=mode == "shm")
    try:
        server.publish(1, state(1), wait=False)
        started = time.monotonic()
        assert "packing it failed" in refused(client, "refused").detail
        assert time.monotonic() - started < 5
        with pytest.raises(RuntimeError, match="cannot read"):
            server.settle()  # the learner hears of it too, before its next step
        monkeypatch.undo()
        server.publish(2, state(2))
        assert_fetches(client, 2)
    finally:
        client.close()
        server.close()


def test_the_weight_router_has_an_unbounded_send_queue_before_it_binds(endpoints, monkeypatch):
    """A peer connecting between the bind and the option kept ZeroMQ's default queue of 1000 messages, and a stream
    of more buckets than that would lose some (noticed in the tenth session)."""
    import zmq

    import learner.weights as learner_weights

    real_bind, at_bind = learner_weights.bind_router, []

    def recording(endpoint, max_bytes, arm=None):
        def armed(socket):
            arm(socket)
            at_bind.append(socket.getsockopt(zmq.SNDHWM))

        return real_bind(endpoint, max_bytes, armed)

    monkeypatch.setattr(learner_weights, "bind_router", recording)
    WeightServer(endpoints["weights"], bucket_bytes=256).close()
    assert at_bind == [0]


def test_a_reader_lets_go_of_a_segment_the_learner_gave_up_for_another_readers_lease(endpoints):
    """Found by a review: only the segment a reader itself leased was let go; one given up for another actor's
    lease stayed mapped (its memory pinned) until a third segment pushed it out."""
    server = WeightServer(endpoints["weights"], bucket_bytes=256, shm=True)
    slow, other = (WeightClient(endpoints["weights"], name, timeout_s=10, shm=True) for name in ("slow-actor", "actor"))
    try:
        server.publish(1, state(1))
        slow.fetch(have=0)  # and keeps its lease
        other.fetch(have=0)
        other.release()
        first = list(other._mapped)
        server.publish(2, state(2))
        server.publish(3, state(3))  # the first segment is leased by the slow actor: given up
        other.release()
        assert first[0] not in other._mapped
        assert_fetches(other, 3)
    finally:
        slow.close()
        other.close()
        server.close()

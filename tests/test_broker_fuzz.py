"""Hostile input against a real broker over a real socket, generated with hypothesis.

More than 10k malformed, truncated, oversized, wrong-version, NaN, wrong-dtype,
out-of-vocabulary and duplicate messages, interleaved with good samples. Each bad
message must get the NACK its defect calls for (an ERROR reply naming the reason, or
the sample listed as rejected with the reason); the broker's per-reason counters must
equal exactly what was sent; every good sample is acknowledged and served exactly once.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broker.server import Broker
from protocol import messages as m
from protocol.config import load_config
from protocol.sample import Sample
from protocol.transport import free_port, tcp
from protocol.wire import decode, encode
from tests.helpers import make_sample

VOCAB = 1000
MAX_BYTES = 64 << 10
EXAMPLES = 1100
PER_EXAMPLE = 10  # bad messages per example: 11k in all


def good_group(first_seq: int) -> list[Sample]:
    return [make_sample(actor_id="good", group_id=f"g{first_seq}", group_size=2, index=i, seq=first_seq + i) for i in range(2)]


def bad_sample(seq: int, **overrides) -> Sample:
    return make_sample(**{"actor_id": "bad", "group_id": f"b{seq}", "seq": seq, **overrides})


ARRAYS = ("prompt_ids", "completion_ids", "behavior_logprobs")


def samples_message(samples: list[Sample], actor: str, body: dict | None = None) -> list[bytes]:
    """Like encode_samples (schema 3: metadata columns, each array kind concatenated, then the (4, n) layout), but
    prompts are not shared and each array is sent with the dtype it has (encode_samples would convert);
    `body` overrides body fields."""
    arrays = [np.concatenate([getattr(s, name) for s in samples]) for name in ARRAYS]
    lengths = [[len(getattr(s, name)) for s in samples] for name in ARRAYS]
    layout = np.array([np.cumsum([0, *lengths[0][:-1]]), *lengths], dtype="<i4")
    body = {"actor_id": actor, "incarnation": "i0", "samples": _columns(samples), **(body or {})}
    return [bytes(f) for f in encode(m.SAMPLES, body, [*arrays, layout])]


def _meta(sample: Sample) -> dict:
    return {k: getattr(sample, k) for k in Sample.__slots__ if k not in ARRAYS}


def _columns(samples: list[Sample]) -> dict[str, list]:
    metas = [_meta(s) for s in samples]
    return {name: [meta[name] for meta in metas] for name in metas[0]}


def header(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def pick(draw, low: int, high: int) -> int:
    """An int in [low, high] drawn independently of the range, so replayed examples draw the same way."""
    return low + draw(st.integers(0, 1 << 30)) % (high - low + 1)


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    return [msgpack.packb({**header(frames), **changes}, use_bin_type=True), *frames[1:]]


@st.composite
def bad_message(draw, seq: int) -> tuple[list[bytes], str, list[str]]:
    """(frames, 'error' or 'rejected', reasons): a message with exactly one defect (that a wrong-dtype frame
    costs each sample of the message is shown by two samples in those messages: two rejections)."""
    base = samples_message([bad_sample(seq)], "bad")
    kind = draw(st.sampled_from([
        "garbage", "truncated_header", "dropped_frame", "truncated_array", "oversized", "version", "foreign_dtype",
        "checksum", "unknown_type", "nan_logprob", "positive_logprob", "nan_reward", "wide_ids", "float_ids",
        "out_of_vocab", "negative_id", "length_mismatch", "empty", "missing_field", "bad_index", "extra_field",
        "bad_lengths", "stray_prompt_span", "short_column", "v1_layout",
    ]))  # fmt: skip
    if kind in ("wide_ids", "float_ids"):
        return samples_message([_bad_field(draw, kind, seq), _bad_field(draw, kind, seq)], "bad"), "rejected", ["bad_dtype"] * 2
    if kind in _REASON:
        return samples_message([_bad_field(draw, kind, seq)], "bad"), "rejected", [_REASON[kind]]
    frames, reason = _bad_message(draw, kind, seq, base)
    return frames, "error", [reason]


def _bad_message(draw, kind: str, seq: int, base: list[bytes]) -> tuple[list[bytes], str]:
    if kind == "garbage":
        return [b"\xc1" + draw(st.binary(max_size=64))], "bad_header"
    if kind == "truncated_header":
        return [base[0][: pick(draw, 1, len(base[0]) - 1)], *base[1:]], "bad_header"
    if kind == "dropped_frame":
        return base[: pick(draw, 1, len(base) - 1)], "frame_count"
    if kind == "truncated_array":
        i = pick(draw, 1, len(base) - 1)
        return [*base[:i], base[i][: pick(draw, 0, len(base[i]) - 1)], *base[i + 1 :]], "bad_shape"
    if kind == "oversized":
        chunk = np.zeros(draw(st.integers(MAX_BYTES // 2 + 1, MAX_BYTES - 1024)), dtype="|u1")
        return [bytes(f) for f in encode(m.SAMPLES, {"actor_id": "bad"}, [chunk, chunk])], "too_large"
    if kind == "version":
        version = draw(st.sampled_from([0, 1, 2, 4, -1, 1 << 40, "3", 3.0, None, True]))
        return with_header(base, v=version), "schema_version"
    if kind == "foreign_dtype":
        specs = header(base)["arrays"]
        specs[0][0] = draw(st.sampled_from(["<f8", "<i2", "|O", "<U4", ">i4", "V8", ""]))
        return with_header(base, arrays=specs), "bad_dtype"
    if kind == "checksum":
        i = pick(draw, 1, len(base) - 1)
        at = pick(draw, 0, len(base[i]) - 1)
        flipped = bytearray(base[i])
        flipped[at] ^= draw(st.integers(1, 255))
        return [*base[:i], bytes(flipped), *base[i + 1 :]], "checksum"
    if kind == "unknown_type":
        return with_header(base, type=draw(st.text(min_size=1, max_size=8).filter(lambda t: t not in vars(m).values()))), "unknown_type"
    sample = bad_sample(seq)
    if kind == "bad_lengths":  # the lengths disagree with the frames: which bytes are whose is unknown
        offset = draw(st.sampled_from([-3, -2, -1, 1, 2, 5]))  # the prompt holds 3 tokens
        layout = np.array([[0], [len(sample.prompt_ids) + offset], [2], [2]], dtype="<i4")
        arrays = [sample.prompt_ids, sample.completion_ids, sample.behavior_logprobs, layout]
        body = {"actor_id": "bad", "incarnation": "i0", "samples": _columns([sample])}
        return [bytes(f) for f in encode(m.SAMPLES, body, arrays)], "bad_shape"
    if kind == "stray_prompt_span":  # an empty prompt whose span starts past the (empty) prompt frame
        layout = np.array([[draw(st.integers(1, 2**31 - 1))], [0], [2], [2]], dtype="<i4")
        arrays = [sample.prompt_ids[:0], sample.completion_ids, sample.behavior_logprobs, layout]
        body = {"actor_id": "bad", "incarnation": "i0", "samples": _columns([sample])}
        return [bytes(f) for f in encode(m.SAMPLES, body, arrays)], "bad_shape"
    if kind == "short_column":
        field = draw(st.sampled_from(["seq", "reward", "metadata", "group_id"]))
        return samples_message([sample], "bad", {"samples": {**_columns([sample]), field: []}}), "frame_count"
    # v1_layout: a list of per-sample maps under the current version number
    return samples_message([sample], "bad", {"samples": [_meta(sample)]}), "frame_count"


_REASON = {
    "nan_logprob": "bad_logprobs", "positive_logprob": "bad_logprobs", "nan_reward": "bad_reward", "wide_ids": "bad_dtype",
    "float_ids": "bad_dtype", "out_of_vocab": "token_out_of_vocab", "negative_id": "token_out_of_vocab",
    "length_mismatch": "length_mismatch", "empty": "empty_sequence", "missing_field": "bad_sample", "bad_index": "bad_sample",
    "extra_field": "bad_sample",
}  # fmt: skip


def _bad_field(draw, kind: str, seq: int) -> Sample:
    if kind in ("nan_logprob", "positive_logprob"):
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf])) if kind == "nan_logprob" else draw(st.floats(0.01, 1e30))
        return bad_sample(seq, behavior_logprobs=np.array([-0.5, value], dtype=np.float32))
    if kind == "nan_reward":
        return bad_sample(seq, reward=draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])))
    if kind == "wide_ids":
        return bad_sample(seq, completion_ids=np.array([4, 5], dtype=np.int64))
    if kind == "float_ids":
        return bad_sample(seq, prompt_ids=np.array([1.0, 2.0], dtype=np.float32))
    if kind == "out_of_vocab":
        return bad_sample(seq, completion_ids=np.array([4, draw(st.integers(VOCAB, 2**31 - 1))], dtype=np.int32))
    if kind == "negative_id":
        return bad_sample(seq, prompt_ids=np.array([draw(st.integers(-(2**31), -1)), 2], dtype=np.int32))
    if kind == "length_mismatch":
        return bad_sample(seq, behavior_logprobs=np.full(draw(st.sampled_from([1, 3, 7])), -0.5, dtype=np.float32))
    if kind == "empty":
        return bad_sample(seq, completion_ids=np.array([], dtype=np.int32), behavior_logprobs=np.array([], dtype=np.float32))
    if kind == "missing_field":
        return bad_sample(seq, group_id=draw(st.sampled_from([None, 3, b"x"])))
    if kind == "bad_index":
        return bad_sample(seq, index=draw(st.sampled_from([-1, 4, 100])))
    return bad_sample(seq, metadata=draw(st.dictionaries(st.text(max_size=3), st.integers(-1000, 1000), max_size=2)), finish_reason=7)


class Peer:
    """A raw DEALER: sends any frames at all and reads the one reply."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(tcp(endpoint))

    def ask(self, frames: list[bytes]) -> tuple[str, dict]:
        self.socket.send_multipart(frames)
        assert self.socket.poll(10_000), "the broker stopped answering"
        kind, body, _ = decode(self.socket.recv_multipart())
        return kind, body


def start_broker(tmp_path: Path) -> tuple[Broker, threading.Event, threading.Thread, str]:
    endpoint = f"127.0.0.1:{free_port()}"
    shm = Path("/dev/shm")
    wal_dir = (shm if shm.is_dir() else tmp_path) / f"streamrl-fuzz-{endpoint.rpartition(':')[2]}"  # fsync in RAM: fast
    config = load_config(None, [
        f"run.dir={tmp_path}", f"endpoints.broker={endpoint}", f"broker.wal_dir={wal_dir}", "sampling.group_size=2",
        f"broker.max_message_bytes={MAX_BYTES}", "broker.credits_per_actor=100000", "broker.max_policy_lag=0",
    ])  # fmt: skip
    server = Broker(config, VOCAB)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    return server, stop, thread, endpoint


def test_hostile_input_is_nacked_by_reason_counted_exactly_and_good_traffic_flows(tmp_path):
    server, stop, thread, endpoint = start_broker(tmp_path)
    peer = Peer(endpoint)
    expected: Counter[str] = Counter()
    sent_good: list[int] = []
    served: list[int] = []
    state = {"seq": 0, "bad_seq": 0, "batch": None, "bad": 0, "duplicates": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])  # fmt: skip
    @given(st.data())
    def exchange(data):
        for _ in range(PER_EXAMPLE):
            frames, outcome, reasons = data.draw(bad_message(state["bad_seq"]))
            state["bad_seq"] += 1
            kind, body = peer.ask(frames)
            if outcome == "error":
                assert (kind, [body["reason"]]) == (m.ERROR, reasons)
            else:
                assert kind == m.ACK and body["acked"] == [] and [r[1] for r in body["rejected"]] == reasons
            expected.update(reasons)
            state["bad"] += len(reasons)
            if data.draw(st.booleans()):  # good traffic in between: a new group, or a resent old one
                resend = data.draw(st.booleans()) and bool(sent_good)
                first = sent_good[2 * pick(data.draw, 0, len(sent_good) // 2 - 1)] if resend else state["seq"]
                kind, body = peer.ask(samples_message(good_group(first), "good"))
                assert kind == m.ACK and body["acked"] == [first, first + 1] and body["rejected"] == []
                if resend:
                    state["duplicates"] += 2
                else:
                    sent_good.extend([first, first + 1])
                    state["seq"] += 2
        drain()

    def drain():
        while True:
            kind, body = peer.ask(encode(m.GET_BATCH, {"groups": 1, "policy_version": 0, "ack_batch": state["batch"]}))
            if kind == m.NOT_READY:
                return
            state["batch"] = body["batch_id"]
            served.extend(body["samples"]["seq"])

    try:
        exchange()
        stats = peer.ask(encode(m.STATS))[1]
    finally:
        stop.set()
        thread.join(10)
        for path in server.log.wal.dir.glob("*"):
            path.unlink()
        server.log.wal.dir.rmdir()
    assert not thread.is_alive() and state["bad"] >= 10_000
    assert stats["rejected_by_reason"] == dict(expected) and stats["rejected"] == state["bad"]
    assert stats["duplicates"] == state["duplicates"] and stats["accepted"] == len(sent_good)
    assert sorted(served) == sorted(sent_good) and len(served) == len(set(served))
    assert len(expected) >= 12  # every kind of defect was exercised

"""Unit tests for protocol/wire.py: encode/decode round trips and every rejection path."""

from __future__ import annotations

import math
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import xxhash

from protocol.errors import ProtocolError
from protocol.sample import Sample
from protocol.wire import SAMPLE_FRAMES, SCHEMA_VERSION, decode, encode, encode_samples, samples_from
from tests import helpers

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
    return helpers.make_sample(**{**dict(group_size=4, version_start=1, version_end=2, actor_id="actor-0", incarnation="inc-0", metadata={"task": "arithmetic", "ground_truth": 7}), **overrides})


def over_wire(frames: list) -> list[bytes]:
    """What a receiver gets: independent byte strings, nothing shared with the sender."""
    return [bytes(f) for f in frames]


def header_frame(specs: list, checksum: int = 0, **fields) -> bytes:
    header = {"v": SCHEMA_VERSION, "type": "t", "body": {}, "arrays": specs, "xxh3": checksum, **fields}
    return msgpack.packb(header, use_bin_type=True)


def raise_reason(frames: list, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kwargs)
    return info.value.reason


def assert_same_sample(got: Sample, want: Sample) -> None:
    assert isinstance(got, Sample)
    for name in ("prompt_ids", "completion_ids", "behavior_logprobs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name  # bit-exact, NaN-safe
    for name in META_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
        assert type(getattr(got, name)) is type(getattr(want, name)), name


# --------------------------------------------------------------------------- round trips


def test_encode_decode_round_trip_all_dtypes():
    arrays = [
        np.arange(12, dtype="<i4").reshape(3, 4) - 6,
        np.array([-0.0, 1.5, np.float32(1e-42), -np.inf, np.nan], dtype="<f4"),
        np.array([2**40, -(2**40)], dtype="<i8"),
        np.frombuffer(b"\x00\x7f\x80\xff", dtype="|u1"),
        np.zeros((0,), dtype="<i4"),
    ]
    body = {"rid": 7, "nested": {"a": [1, 2.5, "x"], "b": None}, "blob": b"\x00\x01"}
    frames = encode("samples", body, arrays)
    assert len(frames) == 1 + len(arrays)
    kind, got_body, got = decode(over_wire(frames))
    assert kind == "samples"
    assert got_body == body
    assert len(got) == len(arrays)
    for a, b in zip(got, arrays, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_encode_decode_without_arrays_or_body():
    frames = encode("ping")
    assert len(frames) == 1
    assert decode(over_wire(frames)) == ("ping", {}, [])


def test_encode_converts_big_endian_and_non_contiguous_arrays():
    big = np.array([1, -2, 300000], dtype=">i4")
    strided = np.arange(10, dtype="<f4")[::2]
    _, _, (a, b) = decode(over_wire(encode("t", {}, [big, strided])))
    assert a.dtype.str == "<i4" and a.tolist() == [1, -2, 300000]
    assert b.dtype.str == "<f4" and b.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_encode_refuses_dtype_outside_the_allowed_set():
    with pytest.raises(ProtocolError) as info:
        encode("t", {}, [np.zeros(3, dtype=np.float64)])
    assert info.value.reason == "bad_dtype"


def test_header_checksum_covers_all_array_bytes():
    arrays = [np.arange(5, dtype="<i4"), np.ones(3, dtype="<f4")]
    header = msgpack.unpackb(encode("t", {}, arrays)[0], raw=False)
    assert header["v"] == SCHEMA_VERSION == 2
    assert header["arrays"] == [["<i4", [5]], ["<f4", [3]]]
    assert header["xxh3"] == xxhash.xxh3_64_intdigest(arrays[0].tobytes() + arrays[1].tobytes())


def test_samples_round_trip_bit_exact_with_metadata():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        n_prompt, n_completion = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        logprobs = -rng.exponential(2.0, n_completion).astype(np.float32)
        logprobs[0] = -0.0
        samples.append(
            make_sample(
                prompt_ids=rng.integers(0, VOCAB, n_prompt, dtype=np.int32),
                completion_ids=rng.integers(0, VOCAB, n_completion, dtype=np.int32),
                behavior_logprobs=logprobs,
                reward=float(rng.normal()) if i != 3 else 2,
                group_id=f"g{i // 2}",
                index=i % 2,
                group_size=2,
                version_start=i,
                version_end=i + 1,
                actor_id=f"actor-{i % 2}",
                incarnation="abc",
                seq=100 + i,
                finish_reason="stop" if i % 2 else "length",
                metadata={"task": "arithmetic", "ground_truth": i, "score": 0.5, "flag": bool(i % 2)} if i else {},
            )
        )
    frames = encode_samples("samples", samples, extra={"rid": 42, "rate": 1.5})
    assert len(frames) == 1 + SAMPLE_FRAMES  # whatever the sample count
    kind, body, arrays = decode(over_wire(frames))
    assert kind == "samples"
    assert body["rid"] == 42 and body["rate"] == 1.5
    out = samples_from(body, arrays, VOCAB)
    assert len(out) == len(samples)
    for got, want in zip(out, samples, strict=True):
        assert_same_sample(got, want)
    assert out[1].metadata == {"task": "arithmetic", "ground_truth": 1, "score": 0.5, "flag": True}
    assert out[3].reward == 2 and out[0].key == ("actor-0", "abc", 100)


def test_samples_round_trip_without_vocab_check():
    big = make_sample(completion_ids=np.array([10**6, 7], dtype=np.int32))
    (got,) = samples_from(*decode(over_wire(encode_samples("samples", [big])))[1:], vocab_size=None)
    assert_same_sample(got, big)


def test_finite_rewards_whose_sum_overflows_are_accepted():
    samples = [make_sample(seq=i, index=i, reward=1e308) for i in range(2)]  # the column's sum is inf, each reward finite
    out = relay(samples)
    assert [s.reward for s in out] == [1e308, 1e308]


def test_array_parts_of_any_shape_or_type_are_sent_flat():
    """The one-call concatenation needs 1-D parts; lists, a column-shaped array and other dtypes still arrive as the flat sequence."""
    odd = [
        make_sample(seq=0, index=0, prompt_ids=[5, 6], completion_ids=[7, 8], behavior_logprobs=[-0.5, -1.0]),
        make_sample(seq=1, index=1, prompt_ids=np.array([[9], [10]], I32), completion_ids=np.array([11], np.int64)),
    ]
    odd[1].behavior_logprobs = np.array([-0.25])  # float64 goes as float32
    _, body, arrays = decode(over_wire(encode_samples("samples", odd)))
    assert arrays[0].tolist() == [5, 6, 9, 10] and arrays[1].tolist() == [7, 8, 11]
    assert arrays[2].tolist() == [-0.5, -1.0, -0.25] and arrays[3].tolist() == [[2, 2], [2, 1], [2, 1]]


def test_empty_samples_message():
    kind, body, arrays = decode(over_wire(encode_samples("samples", [])))
    assert (kind, len(arrays)) == ("samples", SAMPLE_FRAMES)
    assert all(column == [] for column in body["samples"].values()) and arrays[3].shape == (3, 0)
    assert samples_from(body, arrays, VOCAB) == []


# --------------------------------------------------------------------------- message-level rejections


def test_reject_empty_frame_list():
    assert raise_reason([]) == "empty"


def test_reject_too_large():
    frames = over_wire(encode("t", {}, [np.zeros(100, dtype="<i4")]))
    total = sum(len(f) for f in frames)
    assert decode(frames, max_bytes=total)[0] == "t"  # the limit itself is allowed
    assert raise_reason(frames, max_bytes=total - 1) == "too_large"
    assert raise_reason(frames, max_bytes=1) == "too_large"


@pytest.mark.parametrize(
    "first",
    [
        b"\xc1\xff\x00garbage",  # 0xc1 is never used by msgpack
        b"\x81",  # a map that ends too early
        msgpack.packb({"v": 1}) + b"\x01",  # trailing bytes
        b"",
        msgpack.packb({1: 2}),  # non-string map key
    ],
    ids=["garbage", "truncated", "trailing", "empty-header", "int-key"],
)
def test_reject_header_that_is_not_msgpack(first):
    assert raise_reason([first]) == "bad_header"


@pytest.mark.parametrize("value", [[1, 2, 3], 5, "v", None, b"\x00"], ids=["list", "int", "str", "nil", "bin"])
def test_reject_header_that_is_not_a_map(value):
    assert raise_reason([msgpack.packb(value, use_bin_type=True)]) == "bad_header"


@pytest.mark.parametrize(
    "fields",
    [{"type": 5}, {"type": None}, {"body": [1]}, {"body": None}, {"arrays": {}}, {"arrays": None}],
)
def test_reject_header_with_bad_fields(fields):
    assert raise_reason([header_frame([], **fields)]) == "bad_header"


@pytest.mark.parametrize("version", [0, 1, SCHEMA_VERSION + 1, "2", None])
def test_reject_schema_version(version):
    frames = over_wire(encode("t", {}, [np.arange(3, dtype="<i4")]))
    header = msgpack.unpackb(frames[0], raw=False)
    header["v"] = version
    frames[0] = msgpack.packb(header)
    assert raise_reason(frames) == "schema_version"


def test_reject_missing_schema_version():
    header = {"type": "t", "body": {}, "arrays": [], "xxh3": 0}
    assert raise_reason([msgpack.packb(header)]) == "schema_version"


def test_reject_frame_count():
    frames = over_wire(encode("t", {}, [np.arange(3, dtype="<i4"), np.arange(2, dtype="<i4")]))
    assert raise_reason(frames[:2]) == "frame_count"  # header lists 2 arrays, 1 frame follows
    assert raise_reason(frames[:1]) == "frame_count"
    assert raise_reason(frames + [b"\x00" * 4]) == "frame_count"  # one frame too many


@pytest.mark.parametrize(
    "spec",
    [["<f8", [1]], [">i4", [2]], ["float32", [2]], ["<i4"], "<i4", ["<i4", 2], ["<i4", [2], "extra"]],
    ids=["float64", "big-endian", "name", "short", "str", "shape-not-list", "long"],
)
def test_reject_bad_dtype_spec(spec):
    data = b"\x00" * 8
    assert raise_reason([header_frame([spec], checksum=xxhash.xxh3_64_intdigest(data)), data]) == "bad_dtype"


@pytest.mark.parametrize(
    "shape, nbytes",
    [([3], 8), ([2, 3], 20), ([], 8), ([-1], 4), ([-2, -2], 16), ([1.5], 4), (["2"], 8)],
    ids=["short", "2d-short", "scalar", "negative", "two-negative", "float-dim", "str-dim"],
)
def test_reject_bad_shape(shape, nbytes):
    data = b"\x01" * nbytes
    assert raise_reason([header_frame([["<i4", shape]], checksum=xxhash.xxh3_64_intdigest(data)), data]) == "bad_shape"


def test_reject_checksum_flipped_byte():
    arrays = [np.arange(4, dtype="<i4"), np.array([-0.5, -1.0], dtype="<f4")]
    frames = over_wire(encode("t", {"k": 1}, arrays))
    assert decode(frames)[1] == {"k": 1}
    for frame_index in (1, 2):
        for byte_index in (0, len(frames[frame_index]) - 1):
            bad = list(frames)
            flipped = bytearray(bad[frame_index])
            flipped[byte_index] ^= 0x01
            bad[frame_index] = bytes(flipped)
            assert raise_reason(bad) == "checksum", (frame_index, byte_index)


def test_reject_checksum_wrong_or_missing_in_header():
    frames = over_wire(encode("t", {}, [np.arange(4, dtype="<i4")]))
    header = msgpack.unpackb(frames[0], raw=False)
    header["xxh3"] ^= 1
    assert raise_reason([msgpack.packb(header), frames[1]]) == "checksum"
    del header["xxh3"]
    assert raise_reason([msgpack.packb(header), frames[1]]) == "checksum"


def test_reject_checksum_swapped_frames():
    # each frame is well formed on its own, but the order is part of what the checksum protects
    frames = over_wire(encode("t", {}, [np.arange(4, dtype="<i4"), np.arange(4, 8, dtype="<i4")]))
    assert raise_reason([frames[0], frames[2], frames[1]]) == "checksum"


@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (2, 0, 3)])
def test_encode_zero_size_multi_dim_array(shape):
    _, _, (got,) = decode(over_wire(encode("t", {}, [np.zeros(shape, dtype="<f4")])))
    assert got.shape == shape


def test_encode_zero_dim_array_keeps_its_shape():
    _, _, (got,) = decode(over_wire(encode("t", {}, [np.array(5, dtype="<i4")])))
    assert got.shape == ()
    assert got.item() == 5


def test_reject_unhashable_dtype_spec():
    data = b"\x00" * 4
    assert raise_reason([header_frame([[["<i4"], [1]]], checksum=xxhash.xxh3_64_intdigest(data)), data]) == "bad_dtype"


# --------------------------------------------------------------------------- samples_from: whole-message errors


def two_samples() -> tuple[dict, list[np.ndarray]]:
    _, body, arrays = decode(over_wire(encode_samples("samples", [make_sample(seq=0), make_sample(seq=1, index=1)])))
    return body, arrays


def resent(body: dict, arrays: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    """Re-encode a tampered body and arrays and send them again (the checksum is then right)."""
    return decode(over_wire(encode("samples", body, arrays)))[1:]


def whole_message_reason(body: dict, arrays: list[np.ndarray]) -> str:
    with pytest.raises(ProtocolError) as info:
        samples_from(*resent(body, arrays), VOCAB)
    return info.value.reason


def test_samples_from_needs_a_map_of_columns_and_four_arrays():
    body, arrays = two_samples()
    v1_layout = [{name: column[i] for name, column in body["samples"].items()} for i in range(2)]  # a list of per-sample maps
    for bad_body, bad_arrays in [
        ({}, arrays),
        ({"samples": "x"}, arrays),
        ({"samples": v1_layout}, arrays),
        (body, arrays[:-1]),
        (body, arrays + arrays[:1]),
    ]:
        assert whole_message_reason(bad_body, bad_arrays) == "frame_count"


@pytest.mark.parametrize("column", [[0], [0, 1, 2], [], 5, "01", {"0": 0, "1": 1}, None], ids=["short", "long", "empty", "int", "str", "map", "nil"])
@pytest.mark.parametrize("name", ["seq", "metadata", "unexpected"])
def test_column_of_the_wrong_length_or_type_is_a_whole_message_error(name, column):
    body, arrays = two_samples()
    body["samples"][name] = column
    assert whole_message_reason(body, arrays) == "frame_count"


def test_lengths_must_match_the_frame_sizes():
    body, arrays = two_samples()
    assert [len(a) for a in arrays[:3]] == [6, 4, 4] and arrays[3].tolist() == [[3, 3], [2, 2], [2, 2]]
    for row, col, delta in [(0, 0, 1), (1, 1, -1), (2, 0, 5), (0, 1, -3)]:
        lengths = arrays[3].copy()
        lengths[row, col] += delta
        assert whole_message_reason(body, [*arrays[:3], lengths]) == "bad_shape", (row, col, delta)
    for frame in range(3):  # one token more or less in a frame than the lengths say
        longer = list(arrays)
        longer[frame] = np.concatenate([arrays[frame], arrays[frame][:1]])
        assert whole_message_reason(body, longer) == "bad_shape", frame
        shorter = list(arrays)
        shorter[frame] = arrays[frame][:-1]
        assert whole_message_reason(body, shorter) == "bad_shape", frame


def test_negative_lengths_are_a_whole_message_error_even_when_the_sums_match():
    body, arrays = two_samples()
    lengths = arrays[3].copy()
    lengths[0] = [7, -1]  # still sums to the 6 prompt tokens
    assert whole_message_reason(body, [*arrays[:3], lengths]) == "bad_shape"


@pytest.mark.parametrize(
    "lengths",
    [
        np.array([[3, 3], [2, 2], [2, 2]], dtype="<i8"),
        np.array([[3, 3], [2, 2], [2, 2]], dtype="<f4"),
        np.array([[3, 3], [2, 2]], dtype="<i4"),
        np.array([3, 3, 2, 2, 2, 2], dtype="<i4"),
        np.array([[3, 3, 0], [2, 2, 0], [2, 2, 0]], dtype="<i4"),  # three samples' lengths for two samples' columns
    ],
    ids=["i8", "f4", "two-rows", "flat", "three-samples"],
)
def test_lengths_array_of_the_wrong_dtype_or_shape(lengths):
    body, arrays = two_samples()
    expected = "frame_count" if lengths.shape == (3, 3) else "bad_shape"  # the columns then have the wrong length
    assert whole_message_reason(body, [*arrays[:3], lengths]) == expected


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_two_dimensional_data_frame_is_a_whole_message_error(frame):
    body, arrays = two_samples()
    arrays[frame] = arrays[frame].reshape(2, -1)
    assert whole_message_reason(body, arrays) == "bad_shape"


def v1_message(sample: Sample) -> list[bytes]:
    """A schema version 1 samples message (one metadata map and three frames per sample, CRC-32)."""
    import zlib

    meta = {name: getattr(sample, name) for name in META_FIELDS}
    arrays = [sample.prompt_ids, sample.completion_ids, sample.behavior_logprobs]
    crc = 0
    for a in arrays:
        crc = zlib.crc32(a.tobytes(), crc)
    header = {"v": 1, "type": "samples", "body": {"samples": [meta]}, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays], "crc": crc}
    return [msgpack.packb(header, use_bin_type=True), *(a.tobytes() for a in arrays)]


def test_v1_message_is_refused_by_schema_version():
    frames = v1_message(make_sample())
    assert raise_reason(frames) == "schema_version"
    header = msgpack.unpackb(frames[0], raw=False)  # a v1 layout claiming to be v2 is refused, never misread
    header["v"], header["xxh3"] = SCHEMA_VERSION, xxhash.xxh3_64_intdigest(b"".join(frames[1:]))
    _, body, arrays = decode([msgpack.packb(header, use_bin_type=True), *frames[1:]])
    with pytest.raises(ProtocolError) as info:
        samples_from(body, arrays, VOCAB)
    assert info.value.reason == "frame_count"


# --------------------------------------------------------------------------- samples_from: per-sample errors


def relay(samples: list[Sample], patch: Callable[[dict[str, list]], None] | None = None, vocab_size=VOCAB) -> list:
    """Encode, send, let `patch` tamper with the metadata columns, re-encode, send, validate."""
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    if patch is not None:
        patch(body["samples"])
        _, body, arrays = decode(over_wire(encode("samples", body, arrays)))
    return samples_from(body, arrays, vocab_size)


def set_field(name, value):
    """Set sample 1's value of field `name` (a column that is not there gets good values for the others)."""

    def patch(columns):
        columns.setdefault(name, [1] * len(columns["seq"]))[1] = value

    return patch


def del_field(name):
    def patch(columns):
        del columns[name]

    return patch


NAN, INF = float("nan"), float("inf")
F32 = np.float32
I32 = np.int32

# (id, overrides for the bad sample, metadata patch applied on the wire, expected reason)
PER_SAMPLE_CASES = [
    # bad_sample: wrong types
    ("group_id-int", {"group_id": 5}, None, "bad_sample"),
    ("reward-str", {"reward": "1.0"}, None, "bad_sample"),
    ("reward-none", {"reward": None}, None, "bad_sample"),
    ("group_size-float", {"group_size": 4.0}, None, "bad_sample"),
    ("actor_id-bytes", {"actor_id": b"actor-0"}, None, "bad_sample"),
    ("metadata-list", {"metadata": ["task"]}, None, "bad_sample"),
    ("finish_reason-none", {"finish_reason": None}, None, "bad_sample"),
    # bad_sample: bool where int expected
    ("index-bool", {"index": True}, None, "bad_sample"),
    ("group_size-bool", {"group_size": True}, None, "bad_sample"),
    ("version_start-bool", {"version_start": False}, None, "bad_sample"),
    ("version_end-bool", {"version_end": True}, None, "bad_sample"),
    # bad_sample: ranges
    ("index-eq-group_size", {"index": 4, "group_size": 4}, None, "bad_sample"),
    ("index-gt-group_size", {"index": 9, "group_size": 4}, None, "bad_sample"),
    ("index-negative", {"index": -1}, None, "bad_sample"),
    ("group_size-zero", {"index": 0, "group_size": 0}, None, "bad_sample"),
    ("versions-reversed", {"version_start": 3, "version_end": 2}, None, "bad_sample"),
    ("version_start-negative", {"version_start": -1, "version_end": 0}, None, "bad_sample"),
    ("length_mismatch-longer", {"behavior_logprobs": np.array([-1, -1, -1], F32)}, None, "length_mismatch"),
    ("length_mismatch-shorter", {"behavior_logprobs": np.array([-1], F32)}, None, "length_mismatch"),
    ("length_mismatch-empty-logprobs", {"behavior_logprobs": np.array([], F32)}, None, "length_mismatch"),
    (
        "empty-completion",
        {"completion_ids": np.array([], I32), "behavior_logprobs": np.array([], F32)},
        None,
        "empty_sequence",
    ),
    ("empty-prompt", {"prompt_ids": np.array([], I32)}, None, "empty_sequence"),
    ("logprobs-nan", {"behavior_logprobs": np.array([-0.5, NAN], F32)}, None, "bad_logprobs"),
    ("logprobs-posinf", {"behavior_logprobs": np.array([INF, -0.5], F32)}, None, "bad_logprobs"),
    ("logprobs-neginf", {"behavior_logprobs": np.array([-INF, -0.5], F32)}, None, "bad_logprobs"),
    ("logprobs-positive", {"behavior_logprobs": np.array([-0.5, 0.5], F32)}, None, "bad_logprobs"),
    ("reward-nan", {"reward": NAN}, None, "bad_reward"),
    ("reward-inf", {"reward": INF}, None, "bad_reward"),
    ("reward-neginf", {"reward": -INF}, None, "bad_reward"),
    ("completion-eq-vocab", {"completion_ids": np.array([4, VOCAB], I32)}, None, "token_out_of_vocab"),
    ("prompt-gt-vocab", {"prompt_ids": np.array([VOCAB + 50, 1], I32)}, None, "token_out_of_vocab"),
    ("prompt-negative", {"prompt_ids": np.array([1, -1, 2], I32)}, None, "token_out_of_vocab"),
    ("completion-negative", {"completion_ids": np.array([-5, 1], I32)}, None, "token_out_of_vocab"),
]


@pytest.mark.parametrize(
    "overrides, patch, reason", [c[1:] for c in PER_SAMPLE_CASES], ids=[c[0] for c in PER_SAMPLE_CASES]
)
def test_per_sample_error_in_slot_with_seq(overrides, patch, reason):
    good_before = make_sample(seq=10, index=0)
    bad = make_sample(**{"seq": 11, "index": 1, **overrides})
    good_after = make_sample(seq=12, index=2, group_id="g1", reward=-0.25)
    out = relay([good_before, bad, good_after], patch)
    assert len(out) == 3
    assert isinstance(out[1], ProtocolError)
    assert out[1].reason == reason
    assert out[1].seq == 11
    assert_same_sample(out[0], good_before)
    assert_same_sample(out[2], good_after)


@pytest.mark.parametrize("name", META_FIELDS)
def test_missing_column_fails_every_sample_by_name(name):
    out = relay([make_sample(seq=10), make_sample(seq=11, index=1), make_sample(seq=12, index=2)], del_field(name))
    assert [e.reason for e in out] == ["bad_sample"] * 3
    assert [e.seq for e in out] == ([None] * 3 if name == "seq" else [10, 11, 12])
    assert all(name in e.detail for e in out)


@pytest.mark.parametrize("name", META_FIELDS)
def test_per_sample_missing_value_in_slot(name):
    good = make_sample(seq=10)
    out = relay([good, make_sample(seq=11, index=1), make_sample(seq=12, index=2)], set_field(name, None))
    assert isinstance(out[1], ProtocolError)
    assert out[1].reason == "bad_sample"
    assert out[1].seq == (None if name == "seq" else 11)
    assert name in out[1].detail
    assert_same_sample(out[0], good)
    assert isinstance(out[2], Sample) and out[2].seq == 12


def test_per_sample_seq_of_wrong_type_is_still_reported():
    out = relay([make_sample(seq=10), make_sample(seq=11)], set_field("seq", "eleven"))
    assert isinstance(out[0], Sample)
    assert (out[1].reason, out[1].seq) == ("bad_sample", "eleven")


def test_negative_seq_in_slot():
    out = relay([make_sample(seq=10), make_sample(seq=11, index=1), make_sample(seq=12, index=2)], set_field("seq", -3))
    assert [type(x).__name__ for x in out] == ["Sample", "ProtocolError", "Sample"]
    assert (out[1].reason, out[1].seq) == ("bad_sample", -3)


@pytest.mark.parametrize("frame, dtype", [(0, "<i8"), (0, "<f4"), (1, "<i8"), (1, "|u1"), (2, "<i4"), (2, "<i8")])
def test_data_frame_of_the_wrong_dtype_fails_every_sample_in_its_slot(frame, dtype):
    samples = [make_sample(seq=1), make_sample(seq=2, index=1), make_sample(seq=3, index=2, group_id=5)]
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    arrays[frame] = arrays[frame].astype(dtype)
    out = samples_from(*resent(body, arrays), VOCAB)
    # the metadata defect of sample 3 comes first, as for a single sample; the others are bad_dtype
    assert [(e.reason, e.seq) for e in out] == [("bad_dtype", 1), ("bad_dtype", 2), ("bad_sample", 3)]


def test_boundary_values_are_accepted():
    edge = make_sample(
        prompt_ids=np.array([0, VOCAB - 1], I32),
        completion_ids=np.array([VOCAB - 1], I32),
        behavior_logprobs=np.array([0.0], F32),
        index=3,
        group_size=4,
        version_start=5,
        version_end=5,
        reward=-1e300,
    )
    (got,) = relay([edge])
    assert_same_sample(got, edge)


def test_every_sample_bad_but_message_survives():
    samples = [
        make_sample(seq=0, reward=NAN),
        make_sample(seq=1, completion_ids=np.array([VOCAB, 1], I32)),
        make_sample(seq=2, behavior_logprobs=np.array([1.0, -1.0], F32)),
    ]
    out = relay(samples)
    assert [(e.reason, e.seq) for e in out] == [("bad_reward", 0), ("token_out_of_vocab", 1), ("bad_logprobs", 2)]
    assert all(isinstance(e, ProtocolError) for e in out)
    assert math.isnan(samples[0].reward)  # the sender's objects are untouched


def test_good_sample_next_to_bad_one_is_intact():
    rng = np.random.default_rng(1)
    good = make_sample(
        prompt_ids=rng.integers(0, VOCAB, 300, dtype=np.int32),
        completion_ids=rng.integers(0, VOCAB, 257, dtype=np.int32),
        behavior_logprobs=-rng.random(257, dtype=np.float32),
        seq=5,
        index=2,
        metadata={"task": "token_range", "n": 3},
    )
    bad = make_sample(seq=6, behavior_logprobs=np.array([-0.1, NAN], F32))
    out = relay([bad, good, bad])
    assert [type(x).__name__ for x in out] == ["ProtocolError", "Sample", "ProtocolError"]
    assert_same_sample(out[1], good)
    assert out[0].seq == out[2].seq == 6


@pytest.mark.parametrize("key", ["unexpected", "prompt_ids"])
def test_unknown_column_fails_every_sample(key):
    out = relay([make_sample(seq=10), make_sample(seq=11, index=1)], set_field(key, 1))
    assert [(e.reason, e.seq) for e in out] == [("bad_sample", 10), ("bad_sample", 11)]
    assert all(key in e.detail for e in out)


def test_many_samples_with_scattered_defects_each_named():
    rng = np.random.default_rng(2)
    samples, expected = [], []
    for i in range(200):
        n_prompt, n_completion = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        fields = dict(
            prompt_ids=rng.integers(0, VOCAB, n_prompt, dtype=np.int32),
            completion_ids=rng.integers(0, VOCAB, n_completion, dtype=np.int32),
            behavior_logprobs=-rng.random(n_completion, dtype=np.float32),
            seq=i,
            index=i % 4,
        )
        kind = i % 7
        if kind == 1:
            fields["completion_ids"][-1] = VOCAB + i
        elif kind == 2:
            fields["behavior_logprobs"][0] = NAN
        elif kind == 3:
            fields["prompt_ids"] = np.array([], I32)
        elif kind == 4:
            fields["behavior_logprobs"] = np.append(fields["behavior_logprobs"], F32(-1))
        elif kind == 5:
            fields["reward"] = INF
        samples.append(make_sample(**fields))
        expected.append([None, "token_out_of_vocab", "bad_logprobs", "empty_sequence", "length_mismatch", "bad_reward", None][kind])
    out = relay(samples)
    assert [None if isinstance(x, Sample) else x.reason for x in out] == expected
    assert all(x.seq == i for i, x in enumerate(out))
    for got, want in zip(out, samples, strict=True):
        if isinstance(got, Sample):
            assert_same_sample(got, want)


def test_received_samples_are_views_into_the_frames():
    _, body, arrays = decode(over_wire(encode_samples("samples", [make_sample(seq=0), make_sample(seq=1, index=1)])))
    out = samples_from(body, arrays, VOCAB)
    for s in out:
        assert np.shares_memory(s.prompt_ids, arrays[0]) and np.shares_memory(s.completion_ids, arrays[1])
        assert np.shares_memory(s.behavior_logprobs, arrays[2])

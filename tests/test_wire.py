"""Unit tests for protocol/wire.py: encode/decode round trips and every message-level rejection."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import xxhash

from protocol.errors import ProtocolError
from protocol.sample import Sample
from protocol.wire import MAX_ABS_REWARD, SAMPLE_FRAMES, SCHEMA_VERSION, decode, encode, encode_samples, samples_from
from tests.helpers import (
    VOCAB,
    assert_same_sample,
    over_wire,
    raise_reason,
    relay,
)
from tests.helpers import make_wire_sample as make_sample


def header_frame(specs: list, checksum: int = 0, **fields) -> bytes:
    header = {"v": SCHEMA_VERSION, "type": "t", "body": {}, "arrays": specs, "xxh3": checksum, **fields}
    return msgpack.packb(header, use_bin_type=True)


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
    assert header["v"] == SCHEMA_VERSION == 3
    assert header["arrays"] == [["<i4", [5]], ["<f4", [3]]]
    assert header["xxh3"] == xxhash.xxh3_64_intdigest(arrays[0].tobytes() + arrays[1].tobytes())


def test_headers_are_the_bytes_msgpack_would_pack_and_a_str_subclass_goes_as_its_str():
    """Headers are packed by msgspec since 2026-11-28 (eleventh session); peers and logs written before read them alike.
    numpy.str_ (a dataset's strings, say) and numpy.float64 subclass str and float, which msgpack packed as such and
    msgspec alone refuses."""
    body = {"rid": 7, "actor_id": "a", "reward": [0.5, -1.0, 2], "ok": [True, False, None], "blob": b"\x00\xff",
            "nested": {"k": [{"x": 1}], "big": 2**64 - 1, "neg": -(2**63)}, "tuple": (1, 2)}  # fmt: skip
    expected = {"v": SCHEMA_VERSION, "type": "t", "body": body, "arrays": [], "xxh3": xxhash.xxh3_64_intdigest(b"")}
    assert encode("t", body)[0] == msgpack.packb(expected, use_bin_type=True)
    assert decode(encode("t", {"task": np.str_("gsm8k"), "reward": np.float64(0.5)}))[1] == {"task": "gsm8k", "reward": 0.5}
    with pytest.raises(TypeError, match="int64"):  # as with msgpack: no caller sends numpy scalars
        encode("t", {"seq": np.int64(1)})


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


def test_rewards_within_the_bound_whose_sum_exceeds_it_are_accepted():
    samples = [make_sample(seq=i, index=i, reward=-MAX_ABS_REWARD) for i in range(3)]  # the quick check sums |reward|
    out = relay(samples)
    assert [s.reward for s in out] == [-MAX_ABS_REWARD] * 3


def test_array_parts_of_any_shape_or_type_are_sent_flat():
    """The one-call concatenation needs 1-D parts; lists, a column-shaped array and other dtypes still arrive as the flat sequence."""
    odd = [
        make_sample(seq=0, index=0, prompt_ids=[5, 6], completion_ids=[7, 8], behavior_logprobs=[-0.5, -1.0]),
        make_sample(seq=1, index=1, prompt_ids=np.array([[9], [10]], np.int32), completion_ids=np.array([11], np.int64)),
    ]
    odd[1].behavior_logprobs = np.array([-0.25])  # float64 goes as float32
    _, body, arrays = decode(over_wire(encode_samples("samples", odd)))
    assert arrays[0].tolist() == [5, 6, 9, 10] and arrays[1].tolist() == [7, 8, 11]
    assert arrays[2].tolist() == [-0.5, -1.0, -0.25] and arrays[3].tolist() == [[0, 2], [2, 2], [2, 1], [2, 1]]


def test_a_shared_prompt_is_sent_once_and_received_as_one_view():
    """The samples of a group share their prompt object: it crosses the wire once and arrives as one shared view."""
    prompt = np.arange(1, 6, dtype=np.int32)
    group = [make_sample(seq=i, index=i, prompt_ids=prompt, completion_ids=np.array([i + 7], np.int32), behavior_logprobs=np.array([-1.0], np.float32)) for i in range(4)]
    other = make_sample(seq=4, index=0, group_id="g1", prompt_ids=prompt.copy())  # equal but not the same object: sent again
    frames = encode_samples("samples", [*group, other, group[0]])
    _, body, arrays = decode(over_wire(frames))
    assert arrays[0].tolist() == [1, 2, 3, 4, 5] * 2
    assert arrays[3][:2].tolist() == [[0, 0, 0, 0, 5, 0], [5] * 6]
    out = samples_from(body, arrays, VOCAB)
    for got, want in zip(out, [*group, other, group[0]], strict=True):
        assert_same_sample(got, want)
    assert all(s.prompt_ids is out[0].prompt_ids for s in out[1:4]) and out[4].prompt_ids is not out[0].prompt_ids
    assert np.shares_memory(out[5].prompt_ids, arrays[0][:5])  # a later sample of the first prompt: its own view, same bytes


def test_an_out_of_vocab_token_in_a_shared_prompt_fails_every_sample_that_shares_it():
    bad_prompt = np.array([3, VOCAB, 4], np.int32)
    samples = [make_sample(seq=0), *(make_sample(seq=i, index=i, prompt_ids=bad_prompt) for i in (1, 2)), make_sample(seq=3)]
    out = relay(samples)
    assert [None if isinstance(x, Sample) else (x.reason, x.seq) for x in out] == [None, ("token_out_of_vocab", 1), ("token_out_of_vocab", 2), None]


def test_columns_of_one_value_of_one_type_are_sent_once():
    samples = [make_sample(seq=i, index=i % 2, version_start=1, version_end=2, reward=1.0, metadata={"k": 1}) for i in range(3)]
    samples[2].version_end = 2.0  # equal to 2 but a float: the column goes value by value, and the float is refused
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    columns = body["samples"]
    assert columns["version_start"] == [1] and columns["actor_id"] == ["actor-0"] and columns["group_id"] == ["g0"]
    assert columns["version_end"] == [2, 2, 2.0] and columns["seq"] == [0, 1, 2] and columns["reward"] == [1.0] * 3
    assert columns["metadata"] == [{"k": 1}] * 3  # never folded: each sample gets its own map
    out = samples_from(body, arrays, VOCAB)
    assert_same_sample(out[0], samples[0]) and assert_same_sample(out[1], samples[1])
    assert (out[2].reason, out[2].seq) == ("bad_sample", 2)


def test_empty_samples_message():
    kind, body, arrays = decode(over_wire(encode_samples("samples", [])))
    assert (kind, len(arrays)) == ("samples", SAMPLE_FRAMES)
    assert all(column == [] for column in body["samples"].values()) and arrays[3].shape == (4, 0)
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


def test_reject_a_header_over_its_limit_before_unpacking_it():
    """A header of a million empty maps (a byte each, some 64 MB as Python objects) is refused by its size."""
    empty = xxhash.xxh3_64().intdigest()  # the checksum of no array bytes
    frames = [msgpack.packb({"v": SCHEMA_VERSION, "type": "t", "body": {"x": [{}] * 1_000_000}, "arrays": [], "xxh3": empty})]
    size = len(frames[0])
    assert decode(frames, max_header_bytes=size)[0] == "t"  # the limit itself is allowed
    assert raise_reason(frames, max_header_bytes=size - 1) == "header_too_large"


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
    [([3], 8), ([2, 3], 20), ([], 8), ([-1], 4), ([-2, -2], 16), ([1.5], 4), (["2"], 8),
     ([0, 2**63], 0), ([0, 2**31 - 1, 2**31 - 1], 0), ([1] * 65, 4)],
    ids=["short", "2d-short", "scalar", "negative", "two-negative", "float-dim", "str-dim",
         "empty-but-huge", "empty-but-too-big-for-numpy", "65-dims"],
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

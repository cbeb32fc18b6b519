"""Unit tests for protocol/wire.py's samples_from: whole-message errors and per-sample errors."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import xxhash

from protocol.errors import ProtocolError
from protocol.sample import Sample
from protocol.wire import (
    MAX_ABS_REWARD,
    SCHEMA_VERSION,
    decode,
    encode,
    encode_samples,
    per_sample_columns,
    samples_from,
)
from tests.helpers import META_FIELDS, VOCAB, assert_same_sample, over_wire, raise_reason, relay, v1_message
from tests.helpers import make_wire_sample as make_sample

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
    columns = per_sample_columns(body["samples"], 2)
    v1_layout = [{name: column[i] for name, column in columns.items()} for i in range(2)]  # a list of per-sample maps
    for bad_body, bad_arrays in [
        ({}, arrays),
        ({"samples": "x"}, arrays),
        ({"samples": v1_layout}, arrays),
        (body, arrays[:-1]),
        (body, arrays + arrays[:1]),
    ]:
        assert whole_message_reason(bad_body, bad_arrays) == "frame_count"


@pytest.mark.parametrize("column", [[0], [0, 1, 2], [], 5, "01", {"0": 0, "1": 1}, None], ids=["one", "long", "empty", "int", "str", "map", "nil"])
@pytest.mark.parametrize("name", ["seq", "metadata", "unexpected"])
def test_column_of_the_wrong_length_or_type_is_a_whole_message_error(name, column):
    body, arrays = two_samples()
    body["samples"][name] = column
    assert whole_message_reason(body, arrays) == "frame_count"


def test_column_of_one_value_applies_to_every_sample():
    body, arrays = two_samples()
    assert body["samples"]["actor_id"] == ["actor-0"] and body["samples"]["version_end"] == [2]  # the same for both: sent once
    assert body["samples"]["seq"] == [0, 1]
    body["samples"]["finish_reason"] = ["stop"]
    out = samples_from(*resent(body, arrays), VOCAB)
    assert [(s.seq, s.actor_id, s.version_end, s.finish_reason) for s in out] == [(0, "actor-0", 2, "stop"), (1, "actor-0", 2, "stop")]


def test_equal_values_of_other_types_are_not_folded_into_one():
    """1 == 1.0 == True: folded, a mistyped version would arrive as the first sample's int and pass. Strings equal to a
    str are strs (numpy.str_ too, which goes as its str), so a str column folds without a look at each type."""
    samples = [make_sample(seq=0), make_sample(seq=1, index=1, version_start=1.0), make_sample(seq=2, index=2, version_start=True)]
    samples[2].actor_id = np.str_("actor-0")  # a plain str first: the column folds without a look at the types
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    assert body["samples"]["version_start"] == [1, 1.0, True] and body["samples"]["actor_id"] == ["actor-0"]
    out = samples_from(body, arrays, VOCAB)
    assert isinstance(out[0], Sample) and out[0].actor_id == "actor-0"
    assert [err.reason for err in out[1:]] == ["bad_sample", "bad_sample"]


@pytest.mark.parametrize("name", ["seq", "index", "reward", "metadata"])
def test_only_the_fields_an_encoder_folds_may_come_as_one_value(name):
    """One seq for all would make duplicates, one metadata map would be one dict shared by every sample."""
    body, arrays = two_samples()
    body["samples"][name] = body["samples"][name][:1]
    assert whole_message_reason(body, arrays) == "frame_count"


def test_column_of_one_value_for_no_samples():
    _, empty, no_arrays = decode(over_wire(encode_samples("samples", [])))
    empty["samples"]["seq"] = [0]
    assert whole_message_reason(empty, no_arrays) == "frame_count"


def test_layout_must_match_the_frame_sizes():
    body, arrays = two_samples()
    assert [len(a) for a in arrays[:3]] == [6, 4, 4] and arrays[3].tolist() == [[0, 3], [3, 3], [2, 2], [2, 2]]
    for row, col, delta in [(0, 1, 1), (0, 1, -1), (0, 0, 1), (1, 0, 1), (1, 1, -1), (2, 0, 5), (3, 1, -1)]:
        layout = arrays[3].copy()
        layout[row, col] += delta
        assert whole_message_reason(body, [*arrays[:3], layout]) == "bad_shape", (row, col, delta)
    for frame in range(3):  # one token more or less in a frame than the layout says
        longer = list(arrays)
        longer[frame] = np.concatenate([arrays[frame], arrays[frame][:1]])
        assert whole_message_reason(body, longer) == "bad_shape", frame
        shorter = list(arrays)
        shorter[frame] = arrays[frame][:-1]
        assert whole_message_reason(body, shorter) == "bad_shape", frame


@pytest.mark.parametrize(
    "starts, lengths",
    [([0, 0], [3, 3]), ([0, 2], [3, 4]), ([0, 3], [3, 6]), ([0, 6], [6, 1]), ([0, 4], [3, 2]), ([0, 0], [3, 6])],
    ids=["tokens-of-nobody", "overlap", "outside", "outside-after-shared", "gap", "one-start-two-lengths"],
)
def test_prompt_spans_must_tile_the_prompt_frame(starts, lengths):
    """Every prompt token belongs to some sample, once: no span outside, no overlap, nothing unaccounted for."""
    body, arrays = two_samples()
    layout = arrays[3].copy()
    layout[:2] = [starts, lengths]
    assert whole_message_reason(body, [*arrays[:3], layout]) == "bad_shape"


@pytest.mark.parametrize("start", [4, 7, 2**31 - 1])
def test_an_empty_prompt_must_not_start_past_the_prompt_frame(start):
    """It holds no token, but a span pointing outside the frame is malformed (and used to crash the owner search)."""
    body, arrays = two_samples()
    arrays = [a.copy() for a in arrays]
    arrays[0] = arrays[0][:3].copy()
    arrays[0][2] = VOCAB  # a bad token in sample 0's prompt: its owner is searched over every span
    arrays[3][:2] = [[0, start], [3, 0]]
    assert whole_message_reason(body, arrays) == "bad_shape"


def test_an_empty_prompt_at_the_frame_end_fails_only_its_own_sample():
    body, arrays = two_samples()
    arrays = [a.copy() for a in arrays]
    arrays[0] = arrays[0][:3].copy()
    arrays[0][2] = VOCAB
    arrays[3][:2] = [[0, 3], [3, 0]]
    out = samples_from(*resent(body, arrays), VOCAB)
    assert [(e.reason, e.seq) for e in out] == [("token_out_of_vocab", 0), ("empty_sequence", 1)]


def test_samples_sharing_a_prompt_share_its_view_beside_an_empty_prompt():
    prompt = np.array([1, 2, 3], np.int32)
    samples = [make_sample(seq=0, prompt_ids=prompt), make_sample(seq=1, index=1, prompt_ids=np.array([], np.int32)), make_sample(seq=2, index=2, prompt_ids=prompt)]
    _, body, arrays = decode(over_wire(encode_samples("samples", samples)))
    first, empty, third = samples_from(body, arrays, VOCAB)
    assert first.prompt_ids is third.prompt_ids and first.prompt_ids.tolist() == [1, 2, 3]
    assert (empty.reason, empty.seq) == ("empty_sequence", 1)


def test_prompt_spans_that_tile_in_any_order_are_accepted():
    body, arrays = two_samples()
    arrays = [a.copy() for a in arrays]
    arrays[0][:] = [1, 2, 3, 7, 8, 9]
    arrays[3][:2] = [[3, 0], [3, 3]]  # sample 0 takes the second prompt
    first, second = samples_from(*resent(body, arrays), VOCAB)
    assert first.prompt_ids.tolist() == [7, 8, 9] and second.prompt_ids.tolist() == [1, 2, 3]
    arrays[3][:2] = [[0, 0], [6, 6]]  # one six-token prompt for both
    first, second = samples_from(*resent(body, arrays), VOCAB)
    assert first.prompt_ids.tolist() == second.prompt_ids.tolist() == [1, 2, 3, 7, 8, 9]


def test_negative_values_are_a_whole_message_error_even_when_the_sums_match():
    body, arrays = two_samples()
    layout = arrays[3].copy()
    layout[2:] = [[5, -1], [5, -1]]  # still sums to the 4 completion tokens and log-probs
    assert whole_message_reason(body, [*arrays[:3], layout]) == "bad_shape"
    layout = arrays[3].copy()
    layout[0] = [0, -3]
    assert whole_message_reason(body, [*arrays[:3], layout]) == "bad_shape"


@pytest.mark.parametrize(
    "layout",
    [
        np.array([[0, 3], [3, 3], [2, 2], [2, 2]], dtype="<i8"),
        np.array([[0, 3], [3, 3], [2, 2], [2, 2]], dtype="<f4"),
        np.array([[3, 3], [2, 2], [2, 2]], dtype="<i4"),  # schema 2's (3, n) lengths
        np.array([0, 3, 3, 3, 2, 2, 2, 2], dtype="<i4"),
        np.array([[0, 3, 6], [3, 3, 0], [2, 2, 0], [2, 2, 0]], dtype="<i4"),  # three samples' layout for two samples' columns
    ],
    ids=["i8", "f4", "three-rows", "flat", "three-samples"],
)
def test_layout_array_of_the_wrong_dtype_or_shape(layout):
    body, arrays = two_samples()
    expected = "frame_count" if layout.shape == (4, 3) else "bad_shape"  # the columns then have the wrong length
    assert whole_message_reason(body, [*arrays[:3], layout]) == expected


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_two_dimensional_data_frame_is_a_whole_message_error(frame):
    body, arrays = two_samples()
    arrays[frame] = arrays[frame].reshape(2, -1)
    assert whole_message_reason(body, arrays) == "bad_shape"


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
    ("reward-beyond-float32", {"reward": 1e39}, None, "bad_reward"),  # finite, but inf once the learner trains on it
    ("reward-huge-negative", {"reward": -3e38}, None, "bad_reward"),  # two of these overflowed a float32 group mean
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
        reward=-MAX_ABS_REWARD,
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


def test_a_group_size_other_than_the_runs_costs_its_samples_when_the_run_gives_one():
    """Found by a helper's hunt: a group completed at its own claimed size, and one of another size stopped the
    learner's step; the broker gives the run's size (ingest and replay alike)."""
    samples = [make_sample(seq=0, index=0, group_size=2), make_sample(seq=1, index=1, group_size=4)]
    body, arrays = decode(over_wire(encode_samples("samples", samples)))[1:]
    assert all(isinstance(s, Sample) for s in samples_from(body, arrays, VOCAB))
    first, second = samples_from(body, arrays, VOCAB, group_size=4)
    assert (first.reason, first.seq, first.detail) == ("bad_sample", 0, "group_size is not the run's 4")
    assert isinstance(second, Sample) and second.group_size == 4

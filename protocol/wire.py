"""Wire encoding: one msgpack header frame, then raw little-endian array frames.

Nothing that crosses the wire is pickled. The header lists each array's dtype and
shape and an xxh3-64 checksum over the array bytes (all frames, in order); `decode`
checks all of it, so a bad message is a named `ProtocolError` and never a crash or a
silently wrong tensor. Arrays are received with `np.frombuffer`, so large frames are
not copied.

Samples travel columnar (schema version 2): whatever the sample count, a samples
message has four array frames (`SAMPLE_FRAMES`): every prompt's token ids
concatenated (<i4), every completion's (<i4), every behaviour log-prob (<f4), and a
<i4 array of shape (3, n) with each sample's prompt, completion and log-prob lengths.
The per-sample metadata is the body's `samples` map of columns, one list per field
(`{"seq": [...], "reward": [...], ...}`). Validation runs over the whole message at
once; see `samples_from` for which defects cost one sample and which the message.
"""

from __future__ import annotations

import math
import operator
from operator import attrgetter
from typing import Any

import msgpack
import numpy as np
import xxhash

from protocol.errors import ProtocolError
from protocol.sample import Sample

SCHEMA_VERSION = 2
ALLOWED_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4"), "<i8": np.dtype("<i8"), "|u1": np.dtype("|u1")}
SAMPLE_FRAMES = 4  # prompt ids, completion ids, log-probs (each all samples concatenated), lengths (3, n)
_I4, _F4 = np.dtype("<i4"), np.dtype("<f4")
_INT, _STR = frozenset({int}), frozenset({str})
_SAMPLE_FIELDS: dict[str, frozenset[type]] = {  # exact types: msgpack decodes to exactly these, and bool is no int
    "reward": frozenset({int, float}),
    "group_id": _STR,
    "group_size": _INT,
    "index": _INT,
    "version_start": _INT,
    "version_end": _INT,
    "actor_id": _STR,
    "incarnation": _STR,
    "seq": _INT,
    "finish_reason": _STR,
    "metadata": frozenset({dict}),
}
_FIELD_NAMES = tuple(_SAMPLE_FIELDS)
_meta_of = attrgetter(*_FIELD_NAMES)


def encode(kind: str, body: dict[str, Any] | None = None, arrays: list[np.ndarray] = ()) -> list[bytes | memoryview]:
    """Frames for a message of type `kind` with a msgpack `body` and raw `arrays`."""
    frames: list[bytes | memoryview] = []
    specs = []
    digest = xxhash.xxh3_64()
    for array in arrays:
        array = np.asarray(array)
        if array.dtype.str[0] not in "<|" or not array.flags.c_contiguous:  # astype costs even when it copies nothing
            array = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
        if array.dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError("bad_dtype", f"cannot send dtype {array.dtype.str}")
        view = memoryview(array.reshape(-1)).cast("B")
        digest.update(view)
        specs.append([array.dtype.str, list(array.shape)])
        frames.append(view)
    header = {"v": SCHEMA_VERSION, "type": kind, "body": body or {}, "arrays": specs, "xxh3": digest.intdigest()}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: list[bytes | memoryview], max_bytes: int = 1 << 30) -> tuple[str, dict[str, Any], list[np.ndarray]]:
    """Parse and verify a message; return (type, body, arrays) or raise ProtocolError."""
    if not frames:
        raise ProtocolError("empty", "message has no frames")
    frames = [memoryview(f) for f in frames]  # bytes and zmq.Frame alike, without copying
    total = sum(f.nbytes for f in frames)
    if total > max_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes exceeds the limit of {max_bytes}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_header", f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a map")
    if type(header.get("v")) is not int or header["v"] != SCHEMA_VERSION:
        raise ProtocolError("schema_version", f"schema version {header.get('v')!r}, expected {SCHEMA_VERSION}")
    kind, body, specs = header.get("type"), header.get("body"), header.get("arrays")
    if not isinstance(kind, str) or not isinstance(body, dict) or not isinstance(specs, list):
        raise ProtocolError("bad_header", "header needs type (str), body (map) and arrays (list)")
    if len(specs) != len(frames) - 1:
        raise ProtocolError("frame_count", f"header lists {len(specs)} arrays but {len(frames) - 1} frames follow")
    arrays = [_array(spec, frame) for spec, frame in zip(specs, frames[1:])]
    digest = xxhash.xxh3_64()
    for frame in frames[1:]:
        digest.update(frame)
    if digest.intdigest() != header.get("xxh3"):
        raise ProtocolError("checksum", "array bytes do not match the header's xxh3 checksum")
    return kind, body, arrays


def _array(spec: Any, frame: memoryview) -> np.ndarray:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and spec[0] in ALLOWED_DTYPES):
        raise ProtocolError("bad_dtype", f"array spec {spec!r} is not [allowed dtype, shape]")
    if not isinstance(spec[1], list):
        raise ProtocolError("bad_dtype", f"array spec {spec!r} is not [allowed dtype, shape]")
    dtype, shape = ALLOWED_DTYPES[spec[0]], spec[1]
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError("bad_shape", f"shape {shape!r} is not a list of non-negative ints")
    if math.prod(shape) * dtype.itemsize != frame.nbytes:
        raise ProtocolError("bad_shape", f"shape {shape} of {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, frame has {frame.nbytes}")
    array = np.frombuffer(frame, dtype=dtype)
    return array if len(shape) == 1 else array.reshape(shape)


def encode_samples(kind: str, samples: list[Sample], extra: dict[str, Any] | None = None) -> list[bytes | memoryview]:
    """A message carrying `samples` (four array frames and a map of metadata columns) plus any `extra` body fields."""
    n = len(samples)
    rows = list(map(_meta_of, samples))
    columns = {name: list(column) for name, column in zip(_FIELD_NAMES, zip(*rows))} if n else {name: [] for name in _FIELD_NAMES}
    prompts = [s.prompt_ids for s in samples]
    completions = [s.completion_ids for s in samples]
    logprobs = [s.behavior_logprobs for s in samples]
    lengths = np.empty((3, n), dtype=_I4)
    for row, parts in zip(lengths, (prompts, completions, logprobs)):
        row[:] = np.fromiter(map(len, parts), _I4, n)
    arrays = [_concat(prompts, _I4), _concat(completions, _I4), _concat(logprobs, _F4), lengths]
    return encode(kind, {**(extra or {}), "samples": columns}, arrays)


def _concat(parts: list, dtype: np.dtype) -> np.ndarray:
    """The parts end to end as one flat array; one C call when they are all 1-D (the usual case)."""
    if not parts:
        return np.zeros(0, dtype)
    try:
        flat = np.concatenate(parts, dtype=dtype, casting="unsafe")
        if flat.ndim == 1:
            return flat
    except ValueError:  # a scalar or parts of differing dimensions
        pass
    return np.concatenate([np.asarray(p).reshape(-1) for p in parts], dtype=dtype, casting="unsafe")


def samples_from(body: dict[str, Any], arrays: list[np.ndarray], vocab_size: int | None) -> list[Sample | ProtocolError]:
    """Rebuild and validate each sample; a bad one becomes a ProtocolError in its slot, carrying its seq.

    Whole-message errors (raised): `frame_count` when the body's `samples` is not a map of
    lists of one length per sample or there are not exactly `SAMPLE_FRAMES` arrays;
    `bad_shape` when the lengths array is not <i4 of shape (3, n) with n the column length,
    holds a negative length, or its rows do not sum to the sizes of the (1-D) frames.
    Per sample (in its slot, the first defect in this order): `bad_sample` (missing,
    unknown or mistyped field, which for a missing or unknown column is every sample;
    negative seq), `bad_dtype` (a data frame of the wrong dtype: every sample of the
    message), `length_mismatch`, `empty_sequence`, `bad_logprobs`, `bad_reward`,
    `token_out_of_vocab`, `bad_sample` (index outside [0, group_size), versions not
    0 <= start <= end). Good samples hold zero-copy views into the received frames.
    """
    columns = body.get("samples")
    prompt, completion, logprobs, lengths = _checked_layout(columns, arrays)
    n = lengths.shape[1]
    errors = _defects(columns, prompt, completion, logprobs, lengths, vocab_size)
    bounds = np.zeros((3, n + 1), dtype=np.int64)  # per frame, where each sample starts and ends
    np.cumsum(lengths, axis=1, out=bounds[:, 1:])
    po, co, lo = bounds.tolist()
    prompts = [prompt[a:b] for a, b in zip(po, po[1:])]
    completions = [completion[a:b] for a, b in zip(co, co[1:])]
    logprob_parts = [logprobs[a:b] for a, b in zip(lo, lo[1:])]
    fields = [columns.get(name) or [None] * n for name in _FIELD_NAMES]  # a missing column fails every sample
    out: list[Sample | ProtocolError] = list(map(Sample, prompts, completions, logprob_parts, *fields))
    seqs = columns.get("seq")
    for i, err in errors.items():
        err.seq = seqs[i] if seqs is not None else None
        out[i] = err
    return out


def _checked_layout(columns: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The four frames of a samples message, after the checks whose failure costs the whole message."""
    if not isinstance(columns, dict) or len(arrays) != SAMPLE_FRAMES:
        raise ProtocolError("frame_count", f"a samples message needs a map of columns and {SAMPLE_FRAMES} arrays")
    prompt, completion, logprobs, lengths = arrays
    if lengths.dtype != _I4 or lengths.ndim != 2 or lengths.shape[0] != 3:
        raise ProtocolError("bad_shape", f"sample lengths must be <i4 of shape (3, n), not {lengths.dtype.str} {lengths.shape}")
    n = lengths.shape[1]
    for name, column in columns.items():
        if type(column) is not list or len(column) != n:
            raise ProtocolError("frame_count", f"column {name!r} is not a list of {n} values (one per sample)")
    if prompt.ndim != 1 or completion.ndim != 1 or logprobs.ndim != 1:
        raise ProtocolError("bad_shape", "prompt ids, completion ids and log-probs must each be one flat array")
    if n and int(lengths.min()) < 0:
        raise ProtocolError("bad_shape", "sample lengths must not be negative")
    totals = lengths.sum(axis=1).tolist()
    if totals != [prompt.size, completion.size, logprobs.size]:
        raise ProtocolError("bad_shape", f"sample lengths sum to {totals}, frames hold {[prompt.size, completion.size, logprobs.size]}")
    return arrays


def _defects(columns: dict, prompt: np.ndarray, completion: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray,
             vocab_size: int | None) -> dict[int, ProtocolError]:  # fmt: skip
    """Each bad sample's first defect, by sample index; one vectorised pass per array over the whole message."""
    n = lengths.shape[1]
    errors: dict[int, ProtocolError] = {}  # sample index -> its first defect

    def fail(indices, reason: str, detail: str) -> None:
        for i in indices:
            if i not in errors:
                errors[i] = ProtocolError(reason, detail)

    # metadata: every column present and known, every value of the right type
    unknown = sorted(map(str, set(columns) - set(_SAMPLE_FIELDS)))
    if unknown:
        fail(range(n), "bad_sample", f"unknown sample fields {unknown}")
    for name, kinds in _SAMPLE_FIELDS.items():
        column = columns.get(name)
        if column is None:
            fail(range(n), "bad_sample", f"field {name!r} is missing")
        elif not kinds.issuperset(map(type, column)):
            fail([i for i, v in enumerate(column) if type(v) not in kinds], "bad_sample", f"field {name!r} is not {'/'.join(sorted(t.__name__ for t in kinds))}")
    # with every value of the right type, the checks below run over whole columns in C (map, min, sum) first
    all_typed = not errors
    typed = range(n) if all_typed else [i for i in range(n) if i not in errors]  # values safe to compare
    seqs = columns.get("seq")
    if typed and (min(seqs) if all_typed else min(seqs[i] for i in typed)) < 0:
        fail([i for i in typed if seqs[i] < 0], "bad_sample", "seq is negative")
    # arrays
    if prompt.dtype != _I4 or completion.dtype != _I4 or logprobs.dtype != _F4:
        fail(range(n), "bad_dtype", "expected int32 prompt/completion ids and float32 log-probs")
    else:
        prompt_len, completion_len, logprob_len = lengths
        if not np.array_equal(completion_len, logprob_len):
            fail(np.flatnonzero(completion_len != logprob_len).tolist(), "length_mismatch", "completion and log-probs differ in length")
        if n and (int(prompt_len.min()) == 0 or int(completion_len.min()) == 0):
            fail(np.flatnonzero((prompt_len == 0) | (completion_len == 0)).tolist(), "empty_sequence", "prompt and completion must each hold at least one token")
        if logprobs.size and not (math.isfinite(float(logprobs.min())) and float(logprobs.max()) <= 1e-4):  # NaN makes both NaN
            bad = ~(np.isfinite(logprobs) & (logprobs <= 1e-4))
            fail(_owners(bad, logprob_len, n), "bad_logprobs", "behavior log-probs must be finite and <= 0")
        rewards = columns.get("reward")
        if rewards is not None and not (all_typed and math.isfinite(sum(rewards))):  # a sum overflowing to inf only costs the loop
            fail([i for i in typed if not math.isfinite(rewards[i])], "bad_reward", "reward is not finite")
        for ids, lens in ((prompt, prompt_len), (completion, completion_len)):
            # one pass: as uint32 a negative id is >= 2**31, so max < vocab_size means all lie in [0, vocab_size)
            if ids.size and (int(ids.min()) < 0 if vocab_size is None else int(ids.view(np.uint32).max()) >= vocab_size):
                bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
                fail(_owners(bad, lens, n), "token_out_of_vocab", f"token ids must lie in [0, {vocab_size})")
    if typed:
        index, size, start, end = columns["index"], columns["group_size"], columns["version_start"], columns["version_end"]
        in_order = all_typed and min(index) >= 0 and min(start) >= 0
        if not (in_order and all(map(operator.lt, index, size)) and all(map(operator.le, start, end))):
            fail(
                [i for i in typed if not (0 <= index[i] < size[i] and 0 <= start[i] <= end[i])],
                "bad_sample",
                "index must lie in [0, group_size) and versions be ordered",
            )
    return errors


def _owners(bad: np.ndarray, lens: np.ndarray, n: int) -> list[int]:
    """Which samples own the flagged elements of a concatenated array with per-sample `lens`."""
    counts = np.bincount(np.repeat(np.arange(n), lens)[bad], minlength=n)
    return np.flatnonzero(counts).tolist()

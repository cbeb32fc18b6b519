"""Wire encoding: one msgpack header frame, then raw little-endian array frames.

Nothing that crosses the wire is pickled. The header lists each array's dtype and
shape and an xxh3-64 checksum over the array bytes (all frames, in order); `decode`
checks all of it, so a bad message is a named `ProtocolError` and never a crash or a
silently wrong tensor. Arrays are received with `np.frombuffer`, so large frames are
not copied.

Samples travel columnar (schema version 3): whatever the sample count, a samples
message has four array frames (`SAMPLE_FRAMES`): the token ids of each distinct
prompt once (<i4; the samples of a GRPO group share their prompt, so it is sent once
per group, not once per sample), every completion's token ids concatenated (<i4),
every behaviour log-prob (<f4), and the layout, a <i4 array of shape (4, n) with each
sample's prompt start and length, completion length and log-prob length. The
per-sample metadata is the body's `samples` map of columns, one list per field
(`{"seq": [...], "reward": [...], ...}`); a column of a field that is usually the same
for a whole message (actor, incarnation, group, group size, versions, finish reason) may
be sent as a list of one value for all. Validation runs
over the whole message at once; see `samples_from` for which defects cost one sample
and which the message.
"""

from __future__ import annotations

import math
import operator
from itertools import accumulate
from operator import attrgetter
from typing import Any

import msgpack
import msgspec
import numpy as np
import xxhash

from protocol.errors import ProtocolError
from protocol.sample import Sample

SCHEMA_VERSION = 3
ALLOWED_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4"), "<i8": np.dtype("<i8"), "|u1": np.dtype("|u1")}
MAX_ABS_REWARD = 1e6  # without std normalisation (rloo, drgrpo) advantages are the rewards' size: 1e20 overflowed the grad norm
SAMPLE_FRAMES = 4  # prompt ids (each distinct prompt once), completion ids, log-probs (each all samples concatenated), layout
LAYOUT_ROWS = 4  # per sample: prompt start, prompt length, completion length, log-prob length
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
_FOLDABLE = frozenset({"group_id", "group_size", "version_start", "version_end", "actor_id", "incarnation", "finish_reason"})
_meta_of = attrgetter(*_FIELD_NAMES)


def _plain(value: Any) -> str | int | float:
    """msgspec packs exact types only; msgpack packed subclasses of str, int and float (numpy.str_ from a dataset,
    numpy.float64) as the plain value."""
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"cannot send a {type(value).__name__} in a message body")


# for the builtin types messages hold, the same bytes as msgpack.packb(..., use_bin_type=True) in a third of the time
# (msgspec also packs sets, datetimes and dataclasses, which msgpack refused; no message holds them); decoding stays
# with msgpack, whose strict_map_key refuses the non-string map keys msgspec would build
_pack_header = msgspec.msgpack.Encoder(enc_hook=_plain).encode


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
    return [_pack_header(header), *frames]


def decode(frames: list[bytes | memoryview], max_bytes: int = 1 << 30, max_header_bytes: int | None = None) -> tuple[str, dict[str, Any], list[np.ndarray]]:
    """Parse and verify a message; return (type, body, arrays) or raise ProtocolError.

    `max_header_bytes` bounds what unpacking the header may build: msgpack's smallest objects
    (an empty map or list: one byte) become Python objects of 60-70 bytes, so a header of the
    whole message limit would briefly cost some 70x that in memory.
    """
    if not frames:
        raise ProtocolError("empty", "message has no frames")
    frames = [memoryview(f) for f in frames]  # bytes and zmq.Frame alike, without copying
    total = sum(f.nbytes for f in frames)
    too_large = ProtocolError("too_large", f"message of {total} bytes exceeds the limit of {max_bytes}") if total > max_bytes else None
    if too_large is not None and max_header_bytes is None:  # nothing bounds the header: not unpacked
        raise too_large
    if max_header_bytes is not None and frames[0].nbytes > max_header_bytes:
        raise ProtocolError("header_too_large", f"header of {frames[0].nbytes} bytes exceeds the limit of {max_header_bytes}")
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
    try:
        if too_large is not None:  # named with its rid: the sender hears why at once instead of timing out
            raise too_large
        return kind, body, _arrays(header, specs, frames[1:])
    except ProtocolError as err:
        err.rid = body.get("rid") if type(body.get("rid")) is int else None
        raise


def _arrays(header: dict[str, Any], specs: list, frames: list[memoryview]) -> list[np.ndarray]:
    """The array frames as numpy views, once they match the header's specs and checksum."""
    if len(specs) != len(frames):
        raise ProtocolError("frame_count", f"header lists {len(specs)} arrays but {len(frames)} frames follow")
    arrays = [_array(spec, frame) for spec, frame in zip(specs, frames)]
    digest = xxhash.xxh3_64()
    for frame in frames:
        digest.update(frame)
    if digest.intdigest() != header.get("xxh3"):
        raise ProtocolError("checksum", "array bytes do not match the header's xxh3 checksum")
    return arrays


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
    if len(shape) == 1:
        return array
    try:
        return array.reshape(shape)
    except ValueError:  # more than 64 dimensions, or sizes whose product overflows even with a zero among them
        raise ProtocolError("bad_shape", f"numpy cannot hold an array of shape {shape!r}") from None


def encode_samples(kind: str, samples: list[Sample], extra: dict[str, Any] | None = None) -> list[bytes | memoryview]:
    """A message carrying `samples` (four array frames and a map of metadata columns) plus any `extra` body fields."""
    n = len(samples)
    rows = list(map(_meta_of, samples))
    columns = {name: _folded(name, list(column)) for name, column in zip(_FIELD_NAMES, zip(*rows))} if n else {name: [] for name in _FIELD_NAMES}
    prompts = [s.prompt_ids for s in samples]
    distinct, starts = _distinct(prompts)
    completions = [s.completion_ids for s in samples]
    logprobs = [s.behavior_logprobs for s in samples]
    layout = np.empty((LAYOUT_ROWS, n), dtype=_I4)
    layout[0] = starts
    for row, parts in zip(layout[1:], (prompts, completions, logprobs)):
        row[:] = np.fromiter(map(len, parts), _I4, n)
    arrays = [_concat(distinct, _I4), _concat(completions, _I4), _concat(logprobs, _F4), layout]
    return encode(kind, {**(extra or {}), "samples": columns}, arrays)


def header_bytes(sample: Sample) -> int:
    """At most what `sample` adds to the header of a samples message (its metadata packed unfolded)."""
    return len(_pack_header(_meta_of(sample)))


def _folded(name: str, column: list) -> list:
    """`[value]` for a column whose values are all the same value of the same type (one actor, one version), else the column.

    Values equal to a str are strs (or subclasses, which go as their str), so only other
    columns check the types: 1, 1.0 and True are equal and would all arrive as the first.
    """
    if name in _FOLDABLE and len(column) > 1 and column.count(column[0]) == len(column):
        if type(column[0]) is str or len(set(map(type, column))) == 1:
            return column[:1]
    return column


def _distinct(prompts: list) -> tuple[list, list[int]]:
    """Each prompt object once, in order (the samples of a group share theirs), and where each sample's starts."""
    start_of: dict[int, int] = {}
    distinct, starts, offset = [], [], 0
    for prompt in prompts:
        start = start_of.get(id(prompt))
        if start is None:
            start = start_of[id(prompt)] = offset
            offset += len(prompt)
            distinct.append(prompt)
        starts.append(start)
    return distinct, starts


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


def samples_from(body: dict[str, Any], arrays: list[np.ndarray], vocab_size: int | None, group_size: int | None = None) -> list[Sample | ProtocolError]:  # fmt: skip
    """Rebuild and validate each sample; a bad one becomes a ProtocolError in its slot, carrying its seq.

    `group_size`, the run's, if given: a group of another size would stop the learner's step.

    Whole-message errors (raised): `frame_count` when the body's `samples` is not a map of
    lists, each of one value per sample or, for the fields an encoder may fold (actor,
    incarnation, group, group size, versions, finish reason), one value for all, or there are not exactly
    `SAMPLE_FRAMES` arrays; `bad_shape` when the layout array is not <i4 of shape
    (LAYOUT_ROWS, n) with n the column length, holds a negative value, its completion and
    log-prob lengths do not sum to the sizes of the (1-D) frames, or the prompts' spans do
    not tile the prompt frame (`_prompts`).
    Per sample (in its slot, the first defect in this order): `bad_sample` (missing,
    unknown or mistyped field, which for a missing, unknown or one-value column is every
    sample; negative seq), `bad_dtype` (a data frame of the wrong dtype: every sample of the
    message), `length_mismatch`, `empty_sequence`, `bad_logprobs`, `bad_reward`,
    `token_out_of_vocab`, `bad_sample` (index outside [0, group_size), versions not
    0 <= start <= end, then a group_size other than the run's). Good samples hold zero-copy views into the received frames, and
    samples that shared a prompt share one view of it.
    """
    sent = body.get("samples")
    prompt, completion, logprobs, layout = _checked_layout(sent, arrays)
    starts, prompt_lengths, completion_lengths, logprob_lengths = layout
    n = len(starts)
    prompts = _prompts(prompt, starts, prompt_lengths)
    columns = per_sample_columns(sent, n)
    errors = _defects(sent, columns, prompt, completion, logprobs, layout, vocab_size, group_size)
    fields = [columns.get(name) or [None] * n for name in _FIELD_NAMES]  # a missing column fails every sample
    out: list[Sample | ProtocolError] = list(map(Sample, prompts, _cut(completion, completion_lengths), _cut(logprobs, logprob_lengths), *fields))
    seqs = columns.get("seq")
    for i, err in errors.items():
        err.seq = seqs[i] if seqs is not None else None
        out[i] = err
    return out


def _cut(frame: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Views of consecutive pieces of `frame` with these lengths."""
    bounds = list(accumulate(lengths, initial=0))
    return [frame[a:b] for a, b in zip(bounds, bounds[1:])]


def _prompts(frame: np.ndarray, starts: list[int], lengths: list[int]) -> list[np.ndarray]:
    """Each sample's prompt, one view per distinct span shared by its samples; the spans must tile the prompt frame.

    Every prompt token then belongs to some sample, and only once: no span reaches
    outside the frame, spans never overlap, and a message holds no bytes that its
    samples do not account for. Empty prompts take no part in the tiling (each is a
    per-sample `empty_sequence`) but must start inside the frame or at its end. A tiling
    in any order is accepted; the encoder's is in order.
    """
    some, inside = (starts, lengths), True
    if 0 in lengths:
        inside = all(a <= frame.size for a, b in zip(starts, lengths) if not b)  # an empty span must not point past the end
        some = [a for a, b in zip(starts, lengths) if b], [b for b in lengths if b]
    spans = dict(zip(*some))
    end = 0
    if inside and all(map(operator.eq, map(spans.__getitem__, some[0]), some[1])):  # one length per start
        for start in sorted(spans):
            if start != end:
                break
            end += spans[start]
        else:
            if end == frame.size:
                views = {start: frame[start : start + length] for start, length in spans.items()}
                if some[0] is starts:  # no empty prompt: every start names its view
                    return list(map(views.__getitem__, starts))
                return [views[a] if b else frame[:0] for a, b in zip(starts, lengths)]
    raise ProtocolError("bad_shape", f"the prompt spans do not tile the prompt frame of {frame.size} tokens")


def per_sample_columns(columns: dict[str, list], n: int) -> dict[str, list]:
    """A samples body's columns with one value per sample (a column sent as one value for all, repeated)."""
    return {name: column * n if len(column) != n else column for name, column in columns.items()}


def _checked_layout(columns: Any, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
    """The three data frames of a samples message and its layout as lists, after the checks whose
    failure costs the whole message (on lists: a message holds few samples, and numpy's calls cost more)."""
    if not isinstance(columns, dict) or len(arrays) != SAMPLE_FRAMES:
        raise ProtocolError("frame_count", f"a samples message needs a map of columns and {SAMPLE_FRAMES} arrays")
    prompt, completion, logprobs, layout = arrays
    if layout.dtype != _I4 or layout.ndim != 2 or layout.shape[0] != LAYOUT_ROWS:
        raise ProtocolError("bad_shape", f"the sample layout must be <i4 of shape ({LAYOUT_ROWS}, n), not {layout.dtype.str} {layout.shape}")
    n = layout.shape[1]
    for name, column in columns.items():
        if type(column) is not list or not (len(column) == n or (n > 1 and len(column) == 1 and name in _FOLDABLE)):
            raise ProtocolError("frame_count", f"column {name!r} is not a list of {n} values (one per sample), or of one for all where allowed")
    if prompt.ndim != 1 or completion.ndim != 1 or logprobs.ndim != 1:
        raise ProtocolError("bad_shape", "prompt ids, completion ids and log-probs must each be one flat array")
    rows = layout.tolist()
    if n and min(map(min, rows)) < 0:
        raise ProtocolError("bad_shape", "the sample layout must not hold negative starts or lengths")
    totals = [sum(rows[2]), sum(rows[3])]
    if totals != [completion.size, logprobs.size]:
        raise ProtocolError("bad_shape", f"sample lengths sum to {totals}, frames hold {[completion.size, logprobs.size]}")
    return prompt, completion, logprobs, rows


def _defects(sent: dict, columns: dict, prompt: np.ndarray, completion: np.ndarray, logprobs: np.ndarray, layout: list[list[int]],
             vocab_size: int | None, group_size: int | None) -> dict[int, ProtocolError]:  # fmt: skip
    """Each bad sample's first defect, by sample index; one vectorised pass per array over the whole message.

    `sent` holds the columns as they came (one value for all samples, or one per sample),
    `columns` one value per sample; `layout` the rows of the layout array.
    """
    n = len(layout[0])
    errors: dict[int, ProtocolError] = {}  # sample index -> its first defect

    def fail(indices, reason: str, detail: str) -> None:
        for i in indices:
            if i not in errors:
                errors[i] = ProtocolError(reason, detail)

    # metadata: every column present and known, every value of the right type
    unknown = sorted(map(str, set(sent) - set(_SAMPLE_FIELDS)))
    if unknown:
        fail(range(n), "bad_sample", f"unknown sample fields {unknown}")
    for name, kinds in _SAMPLE_FIELDS.items():
        column = sent.get(name)
        if column is None:
            fail(range(n), "bad_sample", f"field {name!r} is missing")
        elif not kinds.issuperset(map(type, column)):
            bad = [i for i, v in enumerate(columns[name]) if type(v) not in kinds]
            fail(bad, "bad_sample", f"field {name!r} is not {'/'.join(sorted(t.__name__ for t in kinds))}")
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
        starts, prompt_len, completion_len, logprob_len = layout
        if completion_len != logprob_len:
            fail([i for i, (a, b) in enumerate(zip(completion_len, logprob_len)) if a != b], "length_mismatch", "completion and log-probs differ in length")
        if 0 in prompt_len or 0 in completion_len:
            fail([i for i, (a, b) in enumerate(zip(prompt_len, completion_len)) if not (a and b)], "empty_sequence", "prompt and completion must each hold at least one token")
        if logprobs.size and not (math.isfinite(float(logprobs.min())) and float(logprobs.max()) <= 1e-4):  # NaN makes both NaN
            bad = ~(np.isfinite(logprobs) & (logprobs <= 1e-4))
            fail(_owners(bad, None, logprob_len), "bad_logprobs", "behavior log-probs must be finite and <= 0")
        rewards = columns.get("reward")
        if rewards is not None and not (all_typed and sum(map(abs, rewards)) <= MAX_ABS_REWARD):  # NaN compares False
            fail([i for i in typed if not -MAX_ABS_REWARD <= rewards[i] <= MAX_ABS_REWARD], "bad_reward", f"reward is not within ±{MAX_ABS_REWARD:g}")
        for ids, span in ((prompt, (starts, prompt_len)), (completion, (None, completion_len))):
            # one pass: as uint32 a negative id is >= 2**31, so max < vocab_size means all lie in [0, vocab_size)
            if ids.size and (int(ids.min()) < 0 if vocab_size is None else int(ids.view(np.uint32).max()) >= vocab_size):
                bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
                fail(_owners(bad, *span), "token_out_of_vocab", f"token ids must lie in [0, {vocab_size})")
    if typed:
        index, size, start, end = columns["index"], columns["group_size"], columns["version_start"], columns["version_end"]
        in_order = all_typed and min(index) >= 0 and min(start) >= 0
        if not (in_order and all(map(operator.lt, index, size)) and all(map(operator.le, start, end))):
            fail(
                [i for i in typed if not (0 <= index[i] < size[i] and 0 <= start[i] <= end[i])],
                "bad_sample",
                "index must lie in [0, group_size) and versions be ordered",
            )
        if group_size is not None and size.count(group_size) != n:
            fail([i for i in typed if size[i] != group_size], "bad_sample", f"group_size is not the run's {group_size}")
    return errors


def _owners(bad: np.ndarray, starts: list[int] | None, lengths: list[int]) -> list[int]:
    """The samples whose span of a frame holds a flagged element (spans laid end to end when `starts` is None)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths if starts is None else np.asarray(starts, dtype=np.int64)
    hits = np.zeros(bad.size + 1, dtype=np.int64)
    np.cumsum(bad, out=hits[1:])
    return np.flatnonzero(hits[starts + lengths] > hits[starts]).tolist()

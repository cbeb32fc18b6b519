"""Wire encoding: one msgpack header frame, then raw little-endian array frames.

Nothing that crosses the wire is pickled. The header lists each array's dtype and
shape and a CRC-32 over the array bytes; `decode` checks all of it, so a bad message
is a named `ProtocolError` and never a crash or a silently wrong tensor. Arrays are
received with `np.frombuffer`, so large frames are not copied.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import msgpack
import numpy as np

from protocol.errors import ProtocolError
from protocol.sample import Sample

SCHEMA_VERSION = 1
ALLOWED_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4"), "<i8": np.dtype("<i8"), "|u1": np.dtype("|u1")}
ARRAYS_PER_SAMPLE = 3
_SAMPLE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "reward": (int, float),
    "group_id": str,
    "group_size": int,
    "index": int,
    "version_start": int,
    "version_end": int,
    "actor_id": str,
    "incarnation": str,
    "seq": int,
    "finish_reason": str,
    "metadata": dict,
}


def encode(kind: str, body: dict[str, Any] | None = None, arrays: list[np.ndarray] = ()) -> list[bytes | memoryview]:
    """Frames for a message of type `kind` with a msgpack `body` and raw `arrays`."""
    frames: list[bytes | memoryview] = []
    specs = []
    crc = 0
    for array in arrays:
        array = np.asarray(array)
        if array.dtype.str[0] not in "<|" or not array.flags.c_contiguous:  # astype costs even when it copies nothing
            array = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
        if array.dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError("bad_dtype", f"cannot send dtype {array.dtype.str}")
        view = memoryview(array.reshape(-1)).cast("B")
        crc = zlib.crc32(view, crc)
        specs.append([array.dtype.str, list(array.shape)])
        frames.append(view)
    header = {"v": SCHEMA_VERSION, "type": kind, "body": body or {}, "arrays": specs, "crc": crc}
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
    crc = 0
    for frame in frames[1:]:
        crc = zlib.crc32(frame, crc)
    if crc != header.get("crc"):
        raise ProtocolError("checksum", "array bytes do not match the header's CRC-32")
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
    """A message carrying `samples` (three arrays each) plus any `extra` body fields."""
    metas, arrays = [], []
    for s in samples:
        metas.append({name: getattr(s, name) for name in _SAMPLE_FIELDS})
        arrays += [
            np.asarray(s.prompt_ids, dtype="<i4"),
            np.asarray(s.completion_ids, dtype="<i4"),
            np.asarray(s.behavior_logprobs, dtype="<f4"),
        ]
    return encode(kind, {**(extra or {}), "samples": metas}, arrays)


def samples_from(body: dict[str, Any], arrays: list[np.ndarray], vocab_size: int | None) -> list[Sample | ProtocolError]:
    """Rebuild and validate each sample; a bad one becomes a ProtocolError in its slot, carrying its seq."""
    metas = body.get("samples")
    if not isinstance(metas, list) or len(arrays) != ARRAYS_PER_SAMPLE * len(metas):
        raise ProtocolError("frame_count", "samples message needs a list of samples and three arrays per sample")
    out: list[Sample | ProtocolError] = []
    for i, meta in enumerate(metas):
        try:
            out.append(validate_sample(meta, arrays[ARRAYS_PER_SAMPLE * i : ARRAYS_PER_SAMPLE * (i + 1)], vocab_size))
        except ProtocolError as err:
            err.seq = meta.get("seq") if isinstance(meta, dict) else None
            out.append(err)
    return out


def validate_sample(meta: Any, arrays: list[np.ndarray], vocab_size: int | None) -> Sample:
    if not isinstance(meta, dict):
        raise ProtocolError("bad_sample", "sample metadata is not a map")
    unknown = set(meta) - set(_SAMPLE_FIELDS)
    if unknown:
        raise ProtocolError("bad_sample", f"unknown sample fields {sorted(map(str, unknown))}")
    for name, kind in _SAMPLE_FIELDS.items():
        value = meta.get(name)
        if not isinstance(value, kind) or (kind is not str and isinstance(value, bool)):
            raise ProtocolError("bad_sample", f"field {name!r} is {value!r}, expected {kind}")
    if meta["seq"] < 0:
        raise ProtocolError("bad_sample", f"seq {meta['seq']} is negative")
    prompt, completion, logprobs = arrays
    if prompt.dtype != np.int32 or completion.dtype != np.int32 or logprobs.dtype != np.float32:
        raise ProtocolError("bad_dtype", "expected int32 prompt/completion ids and float32 log-probs")
    if prompt.ndim != 1 or completion.ndim != 1 or logprobs.shape != completion.shape:
        raise ProtocolError("length_mismatch", f"{len(completion)} completion tokens but log-probs of shape {logprobs.shape}")
    if len(prompt) == 0 or len(completion) == 0:
        raise ProtocolError("empty_sequence", "prompt and completion must each hold at least one token")
    lowest, highest = float(logprobs.min()), float(logprobs.max())  # NaN anywhere makes both NaN
    if not (math.isfinite(lowest) and highest <= 1e-4):
        raise ProtocolError("bad_logprobs", "behavior log-probs must be finite and <= 0")
    if not math.isfinite(meta["reward"]):
        raise ProtocolError("bad_reward", f"reward {meta['reward']!r} is not finite")
    for ids in (prompt, completion):
        if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
            raise ProtocolError("token_out_of_vocab", f"token ids must lie in [0, {vocab_size})")
    if not 0 <= meta["index"] < meta["group_size"] or not 0 <= meta["version_start"] <= meta["version_end"]:
        raise ProtocolError("bad_sample", "index must lie in [0, group_size) and versions be ordered")
    return Sample(prompt_ids=prompt, completion_ids=completion, behavior_logprobs=logprobs, **meta)

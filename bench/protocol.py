"""Wire encoding cost: our msgpack header + raw frames vs pickle vs orjson, per sample round trip.

Each codec encodes a batch of samples to what it would hand to a socket and decodes
them back to numpy arrays (ours also validates every field, dtype, length, log-prob
and token id). Ours hands over its frames as they are, because the transport sends
and receives them without a copy (`copy=False`); pickle hands over one bytes object,
and its protocol-5 variant the out-of-band buffers that Ray uses to avoid copies.
Rewards and correctness vary per sample, and the 8 samples of a group share their
prompt array, as in a real rollout (pickle then also writes each prompt once).
The codecs take turns (five rounds each), so a slow spell of the machine hits them all.
Prints a table with the ratios and writes JSON.

    .venv/bin/python -m bench.protocol [--quick]
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import msgpack
import numpy as np
import orjson

from bench.report import environment, results_dir
from protocol.sample import Sample
from protocol.wire import decode, encode_samples, samples_from

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 49152


def make_samples(tokens: int, count: int) -> list[Sample]:
    """GRPO groups of 8 as the actor sends them: the samples of a group share one prompt array."""
    rng = np.random.default_rng(0)
    prompt = tokens // 4
    prompts = [rng.integers(0, VOCAB, prompt, dtype=np.int32) for _ in range(0, count, 8)]
    return [
        Sample(
            prompt_ids=prompts[i // 8],
            completion_ids=rng.integers(0, VOCAB, tokens - prompt, dtype=np.int32),
            behavior_logprobs=-rng.random(tokens - prompt, dtype=np.float32) * 5,
            reward=float(i % 3 == 0), group_id=f"g{i // 8}", group_size=8, index=i % 8, version_start=3, version_end=4,
            actor_id="actor-0", incarnation="abc", seq=i, metadata={"task": "arithmetic", "correct": i % 3 == 0},
        )  # fmt: skip
        for i in range(count)
    ]


def ours(samples: list[Sample]) -> tuple[int, list]:
    frames = encode_samples("samples", samples)
    _, body, arrays = decode(frames)
    return sum(memoryview(f).nbytes for f in frames), samples_from(body, arrays, VOCAB)


def with_pickle(samples: list[Sample]) -> tuple[int, list]:
    blob = pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL)
    return len(blob), pickle.loads(blob)


def with_pickle_out_of_band(samples: list[Sample]) -> tuple[int, list]:
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(samples, protocol=5, buffer_callback=buffers.append)
    return len(blob) + sum(b.raw().nbytes for b in buffers), pickle.loads(blob, buffers=buffers)


def with_orjson(samples: list[Sample]) -> tuple[int, list]:
    blob = orjson.dumps([as_dict(s) for s in samples], option=orjson.OPT_SERIALIZE_NUMPY)
    rows = orjson.loads(blob)
    for row in rows:  # back to typed arrays, as a receiver must
        row["prompt_ids"] = np.asarray(row["prompt_ids"], np.int32)
        row["completion_ids"] = np.asarray(row["completion_ids"], np.int32)
        row["behavior_logprobs"] = np.asarray(row["behavior_logprobs"], np.float32)
    return len(blob), rows


def with_msgpack_lists(samples: list[Sample]) -> tuple[int, list]:
    """msgpack with arrays as lists: what a quick JSON-like protocol does."""
    blob = msgpack.packb([{**as_dict(s), **{k: getattr(s, k).tolist() for k in ("prompt_ids", "completion_ids", "behavior_logprobs")}} for s in samples])
    return len(blob), msgpack.unpackb(blob)


def as_dict(sample: Sample) -> dict:
    """The sample's fields (no deep copy, unlike dataclasses.asdict)."""
    return {name: getattr(sample, name) for name in Sample.__slots__}


CODECS = {"ours (header + raw frames)": ours, "pickle": with_pickle,
          "pickle, out-of-band buffers": with_pickle_out_of_band, "orjson": with_orjson, "msgpack lists": with_msgpack_lists}


def measure(codec, samples: list[Sample], min_seconds: float) -> tuple[list[float], int]:
    """Microseconds per sample of each round trip repeated for `min_seconds` (at least 5), and the bytes per sample."""
    size, _ = codec(samples)
    times = []
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        codec(samples)
        times.append((time.perf_counter() - start) / len(samples) * 1e6)
    return times, size // len(samples)


def interleaved(samples: list[Sample], seconds: float, rounds: int = 5) -> dict[str, tuple[float, int]]:
    """Each codec's median microseconds per sample and bytes per sample, the codecs taking turns in `rounds`
    rounds so that a slow spell of the machine hits them all."""
    times: dict[str, list[float]] = {name: [] for name in CODECS}
    sizes = {}
    for _ in range(rounds):
        for name, codec in CODECS.items():
            got, sizes[name] = measure(codec, samples, seconds / rounds)
            times[name] += got
    return {name: (float(np.median(times[name])), sizes[name]) for name in CODECS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    seconds = 0.2 if args.quick else 2.0
    rows = []
    for tokens in (256, 4096, 32768):
        samples = make_samples(tokens, count=max(1, 65536 // tokens))
        results = interleaved(samples, seconds)
        base = results["ours (header + raw frames)"][0]
        for name, (us, size) in results.items():
            rows.append({"tokens": tokens, "codec": name, "us_per_sample": us, "bytes_per_sample": size, "vs_ours": us / base})
    print("| tokens/sample | codec | us per sample (encode+decode) | bytes | time vs ours |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['tokens']} | {r['codec']} | {r['us_per_sample']:.1f} | {r['bytes_per_sample']} | {r['vs_ours']:.1f}x |")
    args.out = results_dir(args.out, args.quick)
    report = {**environment(), "quick": args.quick, "results": rows}  # fmt: skip
    (args.out / "protocol.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'protocol.json'}")


if __name__ == "__main__":
    main()

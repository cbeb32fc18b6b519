"""Broker ingest: streamrl's broker vs Redis Streams (PipelineRL's transport), same payloads, same run.

Each producer process (one actor; `--producers 1 4` runs one and four, sharing the
same total) sends its samples in messages of `--batch` samples and keeps `--in-flight`
of them unacknowledged, as the actor does (our SAMPLES -> ACK; Redis: a pipeline of
XADDs, pipelines sent ahead on the one connection); one consumer
process drains them (our GET_BATCH with acknowledgement; Redis: XREADGROUP + XACK
+ XDEL). Throughput counts from the first send until the consumer holds every sample (the
producers may finish earlier: Redis' run unbounded ahead, ours within their credit); ack
latency is per message. Matching durability modes ("vs Redis" compares these):
  durable:     ours fsyncs before it acknowledges   vs Redis appendonly + appendfsync always
  not durable: ours with broker.durable false       vs Redis appendonly no (memory only, as ours)
Redis with appendfsync everysec (the issue's other mode, which writes every entry to disk
and fsyncs once a second) is shown beside the not durable rows.
Both servers are real processes on loopback, writing to the same temp directory's disk.
Redis is skipped (and said so) when `redis-server` is not installed.

    .venv/bin/python -m bench.broker [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import psutil

from bench.report import environment, results_dir
from protocol import messages as m
from protocol.sample import Sample
from protocol.transport import Client, free_port
from protocol.wire import encode_samples

ROOT = Path(__file__).resolve().parent.parent
GROUP = 8
CONSUMER_GROUPS = 16  # groups per learner batch (ours) / entries per XREADGROUP (Redis: x GROUP)
SIZES = {"1KB": (64, 96), "8KB": (256, 896), "64KB": (2048, 7168)}  # prompt, completion tokens: 4P + 8C bytes
REDIS_MODES = {"always": "Redis Streams (appendfsync always)", None: "Redis Streams (no append-only file)",
               "everysec": "Redis Streams (appendfsync everysec)"}  # fmt: skip


def make_samples(size: str, count: int, actor: str = "bench") -> list[Sample]:
    """Groups of GROUP samples sharing one prompt array each, as the actor sends them: our messages then carry
    a group's prompt once (wire schema 3), while each Redis entry, one per sample as in PipelineRL, carries it."""
    prompt, completion = SIZES[size]
    rng = np.random.default_rng(0)
    ids, comp = rng.integers(0, 1000, prompt, dtype=np.int32), rng.integers(0, 1000, completion, dtype=np.int32)
    prompts = [ids.copy() for _ in range(0, count, GROUP)]
    logprobs = -rng.random(completion, dtype=np.float32)
    incarnation = uuid.uuid4().hex[:8]
    return [
        Sample(prompt_ids=prompts[i // GROUP], completion_ids=comp, behavior_logprobs=logprobs, reward=1.0, group_id=f"{actor}-g{i // GROUP}",
               group_size=GROUP, index=i % GROUP, version_start=0, version_end=0, actor_id=actor, incarnation=incarnation, seq=i)
        for i in range(count)
    ]  # fmt: skip


@dataclass(frozen=True)
class Load:
    """What one row of the table sends: `producers` processes of `count` samples each, in messages of `batch`."""

    size: str
    count: int
    batch: int
    producers: int
    in_flight: int


def produce(system: str, address: str, load: Load, actor: str, ready, go, out) -> None:
    """One producer process (one actor): its own samples in messages of `load.batch`, `load.in_flight` unacknowledged."""
    samples = make_samples(load.size, load.count, actor)
    sender = _ours_sender if system == "ours" else _redis_sender
    send = sender(address, samples, load.batch, load.in_flight)
    ready.release()
    go.wait()
    start, cpu = time.monotonic(), time.process_time()
    latencies = send()
    out.put((start, time.monotonic(), latencies, time.process_time() - cpu))


def run(system: str, address: str, load: Load, consumer, server_pid: int) -> dict:
    """Start the consumer and the producers; time from the first send until the consumer holds every sample.

    Also counts the CPU time each role spent (the producers' send loops, the consumer, the
    server process) per sample: on 2 cores, where all of them compete, that is what sets the pace.
    """
    ctx = mp.get_context("spawn")
    ready, go, out, done, consumer_cpu = ctx.Semaphore(0), ctx.Event(), ctx.Queue(), ctx.Event(), ctx.Queue()
    total = load.count * load.producers
    drain = ctx.Process(target=_timed_consumer, args=(consumer, address, total, done, consumer_cpu))
    drain.start()
    procs = [ctx.Process(target=produce, args=(system, address, load, f"bench-{i}", ready, go, out)) for i in range(load.producers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert ready.acquire(timeout=120), "a producer did not get ready"
    server = psutil.Process(server_pid)
    server_cpu = sum(server.cpu_times()[:2])
    go.set()
    reports = [out.get(timeout=600) for _ in procs]
    drained_at, drain_cpu = consumer_cpu.get(timeout=600)
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu
    elapsed = max(drained_at, *(end for _, end, *_ in reports)) - min(start for start, *_ in reports)
    for proc in [*procs, drain]:
        proc.join(120)
    assert done.is_set(), f"the {system} consumer did not get every sample"
    prompt, completion = SIZES[load.size]
    cpu_us = {"producers": sum(r[3] for r in reports), "server": server_cpu, "consumer": drain_cpu}
    return _result(total, total * (4 * prompt + 8 * completion), elapsed, [t for r in reports for t in r[2]]) | {
        "cpu_us_per_sample": {role: seconds / total * 1e6 for role, seconds in cpu_us.items()}}  # fmt: skip


def _timed_consumer(consumer, address: str, total: int, done, out) -> None:
    """Run `consumer`; report when it held every sample (CLOCK_MONOTONIC, which every process shares) and its CPU time."""
    started = time.process_time()
    consumer(address, total, done)
    out.put((time.monotonic(), time.process_time() - started))


# --- streamrl broker ---


def start_broker(endpoint: str, run_dir: Path, durable: bool, producers: int, credits: int) -> subprocess.Popen:
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--role", "broker", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoint}", f"sampling.group_size={GROUP}", "train.groups_per_step=1",
        f"broker.durable={str(durable).lower()}", f"actor.count={producers}", f"broker.credits_per_actor={credits}",
        "broker.memory_budget_mb=4096",
        "broker.max_policy_lag=1000", "broker.max_message_bytes=268435456", "run.log_level=WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def ours_consumer(endpoint: str, total: int, done) -> None:
    client, got, ack = Client(endpoint, f"consumer-{uuid.uuid4().hex[:6]}"), 0, None
    while got < total:
        request = {"groups": CONSUMER_GROUPS, "policy_version": 0, "ack_batch": ack, "wait_ms": 100}  # a long poll, like XREADGROUP BLOCK
        kind, body, _ = client.request(m.GET_BATCH, request, timeout_s=60)
        if kind == m.BATCH:
            ack, got = body["batch_id"], got + len(body["samples"]["seq"])
    client.request(m.GET_BATCH, {"groups": CONSUMER_GROUPS, "policy_version": 0, "ack_batch": ack})
    done.set()


def _ours_sender(endpoint: str, samples: list[Sample], batch: int, in_flight: int):
    client = Client(endpoint, f"producer-{samples[0].actor_id}")
    body = {"actor_id": samples[0].actor_id, "incarnation": samples[0].incarnation}

    def send() -> list[float]:
        """Keep up to `in_flight` messages unacknowledged (the actor's `messages_in_flight`), within the credit
        the latest reply gave minus what is posted since."""
        latencies, credits, sent, posted = [], batch, 0, {}  # rid -> (posted at, seqs)
        while sent < len(samples) or posted:
            room = credits - sum(len(seqs) for _, seqs in posted.values())
            if sent < len(samples) and len(posted) < in_flight and room > 0:
                chunk = samples[sent : sent + min(batch, room)]
                posted[client.post(m.SAMPLES, body, samples=chunk, timeout_s=60)] = (time.perf_counter(), [s.seq for s in chunk])
                sent += len(chunk)
                continue
            if not posted:  # no credit: ask again shortly
                time.sleep(0.0005)
                credits = client.request(m.PING, body, timeout_s=60)[1]["credits"]
                continue
            replies = client.collect(wait_s=60)
            assert replies, "no acknowledgement within 60 s"
            for _, reply, _ in replies:
                t0, seqs = posted.pop(reply["rid"])
                latencies.append(time.perf_counter() - t0)
                assert reply["acked"] == seqs, reply.get("rejected") or reply.get("refused")
                credits = reply["credits"]
        client.close()
        return latencies

    return send


def run_ours(load: Load, durable: bool, tmp: Path) -> dict:
    endpoint = f"127.0.0.1:{free_port()}"
    credits = max(16 * load.batch, 1024)
    broker = start_broker(endpoint, tmp / f"ours-{uuid.uuid4().hex[:6]}", durable, load.producers, credits)
    client = Client(endpoint, "bench-stats")
    try:
        _wait(lambda: client.request(m.STATS, timeout_s=1.0), "our broker")
        result = run("ours", endpoint, load, ours_consumer, broker.pid)
        stats = client.request(m.STATS)[1]
        assert stats["accepted"] == stats["consumed"] == load.count * load.producers, stats
        return result | {key: stats.get(key, 0) for key in ("fsyncs", "fsync_ms_p50", "fsync_ms_p99")}
    finally:
        client.close()
        broker.terminate()
        broker.wait(10)


# --- Redis Streams ---


def start_redis(port: int, fsync: str | None, data_dir: Path) -> subprocess.Popen:
    """`fsync`: the append-only file's appendfsync policy, or None for no append-only file (memory only)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    persistence = ["--appendonly", "yes", "--appendfsync", fsync] if fsync else ["--appendonly", "no"]
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), *persistence,
           "--save", "", "--protected-mode", "no", "--logfile", str(data_dir / "redis.log")]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def redis_consumer(port: str, total: int, done) -> None:
    import redis

    r, got = redis.Redis(port=int(port)), 0
    while got < total:
        reply = r.xreadgroup("learners", "c0", {"samples": ">"}, count=CONSUMER_GROUPS * GROUP, block=100)
        if not reply:
            continue
        ids = [entry_id for entry_id, _ in reply[0][1]]
        pipe = r.pipeline(transaction=False)
        pipe.xack("samples", "learners", *ids)
        pipe.xdel("samples", *ids)
        pipe.execute()
        got += len(ids)
    done.set()


def _redis_sender(port: str, samples: list[Sample], batch: int, in_flight: int):
    import redis

    r = redis.Redis(port=int(port))
    payloads = [b"".join(bytes(f) for f in encode_samples(m.SAMPLES, [s])) for s in samples]  # the same bytes we send

    def send() -> list[float]:
        """Pipelines of `batch` XADDs, up to `in_flight` of them unanswered on the one connection (Redis answers
        in order), as our producer keeps messages in flight."""
        connection, latencies, posted = r.connection_pool.get_connection(), [], deque()
        for first in range(0, len(payloads), batch):
            chunk = payloads[first : first + batch]
            posted.append((time.perf_counter(), len(chunk)))
            connection.send_packed_command(connection.pack_commands([("XADD", "samples", "*", "d", p) for p in chunk]))
            while len(posted) >= in_flight or (posted and first + batch >= len(payloads)):
                t0, count = posted.popleft()
                for _ in range(count):
                    connection.read_response()
                latencies.append(time.perf_counter() - t0)
        r.connection_pool.release(connection)
        r.close()
        return latencies

    return send


def run_redis(load: Load, fsync: str | None, tmp: Path) -> dict:
    import redis

    port = free_port()
    server = start_redis(port, fsync, tmp / f"redis-{uuid.uuid4().hex[:6]}")
    r = redis.Redis(port=port)
    try:
        _wait(r.ping, "redis-server")
        r.xgroup_create("samples", "learners", id="$", mkstream=True)
        return run("redis", str(port), load, redis_consumer, server.pid)
    finally:
        r.close()
        server.terminate()
        server.wait(10)


# --- table ---


def _wait(probe, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up") from None
            time.sleep(0.2)


def _result(samples: int, nbytes: int, elapsed: float, latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1000
    return {"samples_per_s": samples / elapsed, "mb_per_s": nbytes / elapsed / 1e6,
            "ack_ms_p50": float(np.percentile(ms, 50)), "ack_ms_p99": float(np.percentile(ms, 99))}  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, its latencies and CPU with it, plus every run's samples/s."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "all_samples_per_s": [r["samples_per_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64, help="samples per message (ours) / per XADD pipeline (Redis)")
    parser.add_argument("--in-flight", type=int, default=2, help="messages a producer keeps unacknowledged (the actor's messages_in_flight)")
    parser.add_argument("--producers", type=int, nargs="+", help="producer processes (actors); default 1 and 4, --quick: 1")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--repeats", type=int, help="runs of each row, the median shown (default 3, --quick: 1)")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    counts = {"1KB": 4096, "8KB": 4096, "64KB": 640} if args.quick else {"1KB": 40960, "8KB": 20480, "64KB": 3072}
    producers = args.producers or ([1] if args.quick else [1, 4])
    repeats = args.repeats or (1 if args.quick else 3)
    assert all(c % (CONSUMER_GROUPS * GROUP) == 0 for c in counts.values()), "the consumer takes whole batches"
    has_redis = shutil.which("redis-server") is not None
    if not has_redis:
        print("redis-server is not installed: Redis Streams is SKIPPED (apt-get install redis-server)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:  # on disk (not tmpfs): fsync costs what it costs
        for size, n in ((size, n) for size in args.sizes for n in producers):
            load = Load(size, counts[size] // n, args.batch, n, args.in_flight)  # the same total for any number of producers
            for durable, policies in ((True, ("always",)), (False, (None, "everysec"))):  # the matching mode first
                mode, key = "durable" if durable else "not durable", {"size": size, "producers": n}
                ours_runs, redis_runs = [], {policy: [] for policy in policies}
                for _ in range(repeats):  # the systems take turns, so a slow spell of the VM hits all
                    ours_runs.append(run_ours(load, durable, Path(tmp)))
                    for policy in policies if has_redis else ():
                        redis_runs[policy].append(run_redis(load, policy, Path(tmp)))
                rows.append({**key, "mode": mode, "system": "streamrl broker", **median_run(ours_runs)})
                for policy, runs in redis_runs.items() if has_redis else ():
                    rows.append({**key, "mode": mode, "system": REDIS_MODES[policy], **median_run(runs)})
                print(f"  {size} x{n} {mode}: done", flush=True)
    ratios = _ratios(rows)
    print(f"\nmedian of {repeats} run(s) per row")
    print("| sample | producers | mode | system | samples/s | MB/s | ack p50 ms | ack p99 ms | vs Redis | CPU us/sample: producers / server / consumer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        key = (r["size"], r["mode"], r["producers"])
        ratio = f"{ratios[key]:.1f}x" if r["system"] == "streamrl broker" and key in ratios else ""
        ratio += f" ({ratios[(*key, 'everysec')]:.1f}x vs everysec)" if ratio and (*key, "everysec") in ratios else ""
        cpu = " / ".join(f"{us:.0f}" for us in r["cpu_us_per_sample"].values())
        print(f"| {r['size']} | {r['producers']} | {r['mode']} | {r['system']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:.0f} "
              f"| {r['ack_ms_p50']:.2f} | {r['ack_ms_p99']:.2f} | {ratio} | {cpu} |")  # fmt: skip
    report = {**environment(), "redis": _redis_version() if has_redis else "not installed (skipped)", "quick": args.quick,
              "batch": args.batch, "in_flight": args.in_flight, "counts": counts, "producers": producers, "repeats": repeats, "results": rows,
              "ours_vs_redis": {f"{k[0]} {k[1]} x{k[2]}" + "".join(f" vs {e}" for e in k[3:]): v for k, v in ratios.items()}}  # fmt: skip
    args.out = results_dir(args.out, args.quick)
    (args.out / "broker.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out / 'broker.json'}")


def _ratios(rows: list[dict]) -> dict[tuple, float]:
    """Ours over Redis in the matching mode, keyed (size, mode, producers); against everysec as well, keyed with it."""
    ours = {(r["size"], r["mode"], r["producers"]): r["samples_per_s"] for r in rows if r["system"] == "streamrl broker"}
    matching = {(r["size"], r["mode"], r["producers"]): r["samples_per_s"] for r in rows if r["system"] in (REDIS_MODES["always"], REDIS_MODES[None])}
    everysec = {(r["size"], r["mode"], r["producers"], "everysec"): r["samples_per_s"] for r in rows if r["system"] == REDIS_MODES["everysec"]}
    return {k: ours[k] / matching[k] for k in ours if k in matching} | {k: ours[k[:3]] / v for k, v in everysec.items()}


def _redis_version() -> str:
    return subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()

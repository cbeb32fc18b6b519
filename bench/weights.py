"""Weight sync time vs model size: our channels vs the plain move of the same bytes.

A synthetic fp32 state dict (4M-parameter tensors, like transformer layers) goes
from a sender process to a receiver process. For our channels the clock runs from
`publish` (bucketing and checksumming included) until the receiver holds the
verified state dict; the baseline is `torch.distributed.broadcast` (gloo, 2 local
processes) of one flat tensor of the same bytes, with no checks. Both clocks are
CLOCK_MONOTONIC, which every process on the machine shares. Steady state: two
untimed warm-up transfers first (as a learner publishes every step; our senders write two
buffers in turn, each fresh the first time) and a pause of
`--gap` seconds between versions (the training step), then the median of the
repeats. Before each version every parameter is written, as the optimizer step does (on this
VM, memory left alone for a second costs up to 20x on its next read; docs/weights.md), and the
baseline's flat tensor likewise. `publish` (snapshot copy + checksums, paid once per version however many
actors there are) is also shown on its own, and "rest" is the remaining per-actor
delivery time compared with the broadcast.

With `--gpu` (one GPU): our `cuda_ipc` channel between two processes on the GPU vs
the receiver mapping the sender's buffer once (CUDA IPC) and copying it each time
(the plain move), both from GPU-resident weights; and, in one process, a 1-rank cupy
NCCL communicator: our bucket broadcast (staging, checksums on the device, per-bucket
broadcasts, verification) vs one out-of-place broadcast of the same bytes.

    .venv/bin/python -m bench.weights [--quick] [--sizes 24 135 500] [--gpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import orjson
import torch

from bench.report import environment, results_dir
from protocol.buckets import plan
from protocol.transport import free_port

ROOT = Path(__file__).resolve().parent.parent
TENSOR = 4 << 20  # parameters per synthetic tensor
WARMUP = 2  # untimed versions first: the shm and tcp senders write two buffers in turn, both fresh the first time
CPU_TRANSPORTS = ("gloo broadcast (baseline)", "shm", "tcp")
GPU_TRANSPORTS = ("CUDA IPC copy (baseline)", "cuda_ipc")


def synthetic(params_m: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    total, out = params_m * 1_000_000, {}
    for i in range(0, total, TENSOR):
        out[f"layers.{i // TENSOR}.weight"] = torch.full((min(TENSOR, total - i),), float(i), dtype=torch.float32, device=device)
    return out


def train_step(state: dict[str, torch.Tensor]) -> None:
    """What the optimizer step does before a publish: write every parameter (so it is in cache, not cold)."""
    for tensor in state.values():
        tensor.add_(1.0)


def channel_config(transport: str, endpoint: str, bucket_bytes: int):
    """A run config naming our channel, so the bench builds both ends as the learner and actors do."""
    from protocol.config import load_config

    return load_config(None, [f"learner.weight_transport={transport}", f"endpoints.weights={endpoint}",
                              f"learner.weight_bucket_mb={bucket_bytes >> 20}"])  # fmt: skip


def receive_ipc_copies(nbytes: int, repeats: int, conn) -> None:
    """The plain GPU move: map the sender's buffer once, then copy its bytes into our own buffer on each signal."""
    from protocol.gpu import device_tensor, open_ipc

    shared = device_tensor(open_ipc(conn.recv()), nbytes)
    own = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(repeats):
        conn.recv()
        own.copy_(shared)
        torch.cuda.synchronize()
        conn.send(time.monotonic())


def receive(transport: str, endpoint: str, bucket_bytes: int, nbytes: int, repeats: int, conn) -> None:
    """The receiver process: report when each version (or broadcast) has fully arrived."""
    if transport.startswith("gloo"):
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{endpoint}", rank=1, world_size=2)
        flat = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(repeats):
            torch.distributed.barrier()
            torch.distributed.broadcast(flat, src=0)
            conn.send(time.monotonic())
        torch.distributed.destroy_process_group()
        return
    if transport.startswith("CUDA IPC"):
        return receive_ipc_copies(nbytes, repeats, conn)
    from actors.weights import make_weight_receiver

    client = make_weight_receiver(channel_config(transport, endpoint, bucket_bytes), "bench-receiver")
    conn.send("ready")
    for version in range(1, repeats + 1):
        got = None
        while got is None:  # an actor asks once per step; a 1 ms pause keeps this poll from taking a core
            got = client.fetch(version - 1)
            if got is None:
                time.sleep(0.001)
        conn.send(time.monotonic())
        del got
        client.release()  # as an actor does once the engine has loaded them
    client.close()


def run(transport: str, state: dict[str, torch.Tensor], bucket_bytes: int, repeats: int, gap: float) -> dict:
    nbytes = plan(state, bucket_bytes, 0).total_bytes
    endpoint = f"127.0.0.1:{free_port()}"
    ours, theirs = mp.Pipe()
    repeats += WARMUP
    proc = mp.get_context("spawn").Process(target=receive, args=(transport, endpoint, bucket_bytes, nbytes, repeats, theirs))
    proc.start()
    times, publish = [], []
    if transport.startswith("gloo"):
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{endpoint}", rank=0, world_size=2)
        flat = torch.ones(nbytes, dtype=torch.uint8)
        for _ in range(repeats):
            flat.add_(1)  # the training step wrote the bytes just now
            torch.distributed.barrier()
            start = time.monotonic()
            torch.distributed.broadcast(flat, src=0)
            times.append(ours.recv() - start)
            time.sleep(gap)
        torch.distributed.destroy_process_group()
    elif transport.startswith("CUDA IPC"):
        from protocol.gpu import IpcBuffer

        buffer = IpcBuffer(nbytes)
        ours.send(buffer.handle)
        for _ in range(repeats):
            buffer.tensor.add_(1)  # the training step wrote the bytes just now, as for our channel
            torch.cuda.synchronize()
            start = time.monotonic()
            ours.send("go")
            times.append(ours.recv() - start)
            time.sleep(gap)
        proc.join(60)
        buffer.free()
    else:
        from learner.weights import make_weight_sender

        server = make_weight_sender(channel_config(transport, endpoint, bucket_bytes))
        assert ours.recv() == "ready"
        for version in range(1, repeats + 1):
            train_step(state)
            if next(iter(state.values())).is_cuda:  # the step's kernels are not part of the sync
                torch.cuda.synchronize()
            start = time.monotonic()
            server.publish(version, state, wait=False)  # as the learner does: actors may stream buckets as they are packed
            server.settle()
            publish.append(time.monotonic() - start)
            times.append(ours.recv() - start)
            time.sleep(gap)
        server.close()
    proc.join(60)
    seconds = statistics.median(times[WARMUP:])
    delivery = statistics.median(t - p for t, p in zip(times[WARMUP:], publish[WARMUP:])) if publish else seconds
    return {"transport": transport, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
            "publish_seconds": statistics.median(publish[WARMUP:]) if publish else None, "delivery_seconds": delivery,
            "all_seconds": times[WARMUP:]}  # fmt: skip


def nccl_one_rank(state: dict[str, torch.Tensor], bucket_bytes: int, repeats: int) -> list[dict]:
    """In one process on a 1-rank cupy NCCL communicator: one flat broadcast vs our staged, checked bucket broadcast."""
    from cupy.cuda import nccl

    from learner.gpu_weights import stage_on_gpu
    from protocol.buckets import Assembler
    from protocol.gpu import broadcast_buckets
    from protocol.sum64 import sum64_buckets

    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = plan(state, bucket_bytes, 0).total_bytes
    source, target = torch.ones(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def flat_broadcast(_: int) -> None:
        comm.broadcast(source.data_ptr(), target.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, stream)
        torch.cuda.synchronize()

    def our_broadcast(version: int) -> None:
        staged = stage_on_gpu(version, state, bucket_bytes)
        broadcast_buckets(comm, staged.buckets)
        assembler = Assembler(staged.manifest)  # checked as `NcclWeightClient` does: every bucket in one pass
        assembler.add_all(staged.buckets, sum64_buckets(staged.flat, staged.manifest.bucket_sizes))
        assert assembler.complete

    rows = []
    for transport, move in (("cupy NCCL broadcast, 1 rank (baseline)", flat_broadcast), ("nccl buckets, 1 rank", our_broadcast)):
        times = []
        for version in range(repeats + 1):  # the first is the warm-up
            start = time.monotonic()
            move(version)
            times.append(time.monotonic() - start)
        seconds = statistics.median(times[1:])
        rows.append({"transport": transport, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
                     "publish_seconds": None, "delivery_seconds": seconds, "all_seconds": times[1:]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24M parameters only, 2 repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 135, 500], help="millions of fp32 parameters")
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between versions (the training step)")
    parser.add_argument("--gpu", action="store_true", help="the GPU transports (needs CUDA and cupy)")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.gap = [24], 2, 0.2
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench.weights --gpu needs a CUDA GPU")
    rows = []
    for size in args.sizes:
        state = synthetic(size, "cuda" if args.gpu else "cpu")
        results = [run(t, state, args.bucket_mb << 20, args.repeats, args.gap) for t in (GPU_TRANSPORTS if args.gpu else CPU_TRANSPORTS)]
        if args.gpu:
            results += nccl_one_rank(state, args.bucket_mb << 20, args.repeats)
        base = results[0]["seconds"]
        for r in results:  # each row against the baseline row above it
            base = r["seconds"] if "(baseline)" in r["transport"] else base
            rows.append({"params_m": size, **r, "vs_baseline": r["seconds"] / base, "delivery_vs_baseline": r["delivery_seconds"] / base})
        del state
    where = torch.cuda.get_device_name() if args.gpu else "2 local processes"
    print(f"fp32 synthetic state dicts, {args.bucket_mb} MB buckets, median of {args.repeats}, {args.gap} s between versions, {where}\n")
    print("| params | MB | transport | sync | GB/s | vs baseline | of which publish | rest vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    unit, scale = ("ms", 1e3) if args.gpu else ("s", 1.0)
    for r in rows:
        pub = f"{r['publish_seconds'] * scale:.3f} {unit}" if r["publish_seconds"] is not None else "-"
        print(f"| {r['params_m']}M | {r['bytes'] / 1e6:.0f} | {r['transport']} | {r['seconds'] * scale:.3f} {unit} | {r['gb_per_s']:.2f} "
              f"| {r['vs_baseline']:.2f}x | {pub} | {r['delivery_vs_baseline']:.2f}x |")  # fmt: skip
    args.out = results_dir(args.out, args.quick)
    report = {**environment(gpu=where if args.gpu else None), "bucket_mb": args.bucket_mb, "gap_s": args.gap, "quick": args.quick, "results": rows}  # fmt: skip
    path = args.out / ("weights_gpu.json" if args.gpu else "weights.json")
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""The one-pass `sum64` kernel against the eager definition in `protocol.buckets.checksum`.

Without a GPU the kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton
is imported, so in a child process); the `gpu` test runs it compiled on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from protocol.buckets import checksum
from tests.conftest import ROOT

SIZES = [0, 64, 8 * 600, 8 * 256, 64 * 7, 0, 8 * 1000]  # empty buckets, one exactly a block, several blocks, a partial block

INTERPRETED = f"""
import torch
from protocol.buckets import checksum
from protocol.sum64 import sum64_buckets
sizes = {SIZES}
flat = torch.randint(0, 256, (sum(sizes) + 64,), dtype=torch.uint8)  # spare bytes past the buckets
copy = torch.zeros_like(flat)
sums = sum64_buckets(flat, sizes, copy_to=copy, block=256)
offsets = [sum(sizes[:i]) for i in range(len(sizes))]
assert sums == [checksum("sum64", flat[o : o + n]) for o, n in zip(offsets, sizes)], sums
assert torch.equal(copy[: sum(sizes)], flat[: sum(sizes)]) and not copy[sum(sizes) :].any()
flat[offsets[2] + 9] ^= 4
assert sum64_buckets(flat, sizes, block=256)[2] != sums[2] and sum64_buckets(flat, sizes, block=256)[3] == sums[3]
print("ok")
"""


def test_block_table_tiles_every_bucket_exactly_once():
    from protocol.sum64 import block_table

    table, owner = block_table(tuple(SIZES), 256)
    covered = np.zeros(sum(SIZES) // 8, dtype=int)
    for (start, count, position), bucket in zip(table, owner):
        covered[start : start + count] += 1
        assert start - sum(SIZES[:bucket]) // 8 == position - 1  # positions count from each bucket's start
    assert (covered == 1).all()
    assert list(np.bincount(owner, minlength=len(SIZES))) == [0, 1, 3, 1, 1, 0, 4]


def test_kernel_matches_the_eager_checksum_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_buffers_and_buckets_the_kernel_cannot_cover_exactly_are_refused():
    from protocol.sum64 import sum64_buckets

    flat = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="64-bit words"):
        sum64_buckets(flat, [56])
    with pytest.raises(ValueError, match="64-bit words"):
        sum64_buckets(flat, [64], block=12)  # blocks are a power of two of at least 8 words
    with pytest.raises(ValueError, match="flat uint8"):
        sum64_buckets(flat, [64], copy_to=torch.zeros(32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="flat uint8"):
        sum64_buckets(flat.view(torch.int64), [64])


@pytest.mark.gpu
def test_compiled_kernel_matches_the_eager_checksum_on_cuda():
    from protocol.sum64 import sum64_buckets

    sizes = [16 << 20, 0, 8 << 20, 64, (3 << 20) + 192]
    flat = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, device="cuda")
    copy = torch.empty_like(flat)
    sums = sum64_buckets(flat, sizes, copy_to=copy)
    views = torch.split(flat, sizes)
    assert sums == [checksum("sum64", v) for v in views]
    assert torch.equal(copy, flat)
    flat[(16 << 20) + 5] ^= 1
    changed = sum64_buckets(flat, sizes)
    assert [a != b for a, b in zip(changed, sums)] == [False, False, True, False, False]

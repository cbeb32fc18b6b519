"""`sum64` of every bucket of a version in one pass over the bytes, copying them on the way if asked.

`protocol.buckets.checksum` defines `sum64`: the sum of a bucket's 64-bit words, each
times its 1-based position, modulo 2**64. In eager torch that is three passes over the
bytes and one device read per bucket (125 reads for 2 GB in 16 MB buckets). This Triton
kernel reads each byte once (and writes it once when it also copies), and the sums of all
buckets come back in a single read. Copying and summing in the same pass also means a
receiver checks exactly the bytes it kept, even if the source changes under it.

It needs Triton: CUDA tensors on a GPU, or CPU tensors with `TRITON_INTERPRET=1`
(how the tests check it on machines without a GPU).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 4096  # 64-bit words per program (32 KB)
MASK = (1 << 64) - 1


@triton.jit
def _sum64_blocks(src, dst, table, partials, BLOCK: tl.constexpr, COPY: tl.constexpr):
    """One block of one bucket: table row = (first word in the flat buffer, words, 1-based position in its bucket)."""
    row = tl.program_id(0) * 3
    start = tl.multiple_of(tl.load(table + row), 8)  # buckets start on 64-byte boundaries, blocks on BLOCK words: vector loads
    count = tl.multiple_of(tl.load(table + row + 1), 8)  # bucket sizes and BLOCK are whole multiples of 8 words
    position = tl.load(table + row + 2)
    lanes = tl.arange(0, BLOCK)
    mask = lanes < count
    words = tl.load(src + start + lanes, mask=mask, other=0)
    if COPY:
        tl.store(dst + start + lanes, words, mask=mask)
    tl.store(partials + tl.program_id(0), tl.sum(words * (position + lanes.to(tl.int64)), axis=0))


def block_table(bucket_sizes: tuple[int, ...], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Split buckets into blocks of at most `block` words: one (start, count, position) row per block,
    and the bucket each block belongs to. An empty bucket has no block (its sum is 0)."""
    words = np.asarray(bucket_sizes, dtype=np.int64) // 8
    starts = np.cumsum(words) - words
    blocks = -(-words // block)
    owner = np.repeat(np.arange(len(words)), blocks)
    offset = (np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * block
    table = np.stack([starts[owner] + offset, np.minimum(block, words[owner] - offset), offset + 1], axis=1)
    return table, owner


@lru_cache(maxsize=8)
def _device_table(bucket_sizes: tuple[int, ...], block: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The block table on the device, built once per layout (every version of a model has the same one)."""
    table, owner = block_table(bucket_sizes, block)
    return torch.from_numpy(np.ascontiguousarray(table)).to(device), torch.from_numpy(owner).to(device)


def sum64_buckets(flat: torch.Tensor, bucket_sizes: list[int], copy_to: torch.Tensor | None = None, block: int = BLOCK) -> list[int]:
    """The `sum64` of each bucket laid back to back in uint8 `flat`; with `copy_to`, also copy the bytes there.

    Bucket sizes must be multiples of 64 bytes (`protocol.buckets.ALIGN`, checked in every manifest)."""
    total = sum(bucket_sizes)
    if block < 8 or block & (block - 1) or any(size < 0 or size % 64 for size in bucket_sizes):  # the kernel's alignment hints
        raise ValueError(f"buckets of {bucket_sizes} bytes cannot be split in blocks of {block} 64-bit words")
    for buffer in (flat, copy_to if copy_to is not None else flat):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < total or buffer.device != flat.device:
            raise ValueError(f"buffers must be flat uint8 on one device, of at least {total} bytes")
    table, owner = _device_table(tuple(bucket_sizes), block, str(flat.device))
    sums = torch.zeros(len(bucket_sizes), dtype=torch.int64, device=flat.device)
    if len(owner):
        words = flat[:total].view(torch.int64)
        target = copy_to[:total].view(torch.int64) if copy_to is not None else words
        partials = torch.empty(len(owner), dtype=torch.int64, device=flat.device)
        _sum64_blocks[(len(owner),)](words, target, table, partials, BLOCK=block, COPY=copy_to is not None, num_warps=8)
        sums.index_add_(0, owner, partials)
    return [s & MASK for s in sums.tolist()]

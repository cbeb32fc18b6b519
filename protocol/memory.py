"""glibc heap settings for processes that allocate and free the same large buffers over and over.

With glibc's defaults a block above 128 KB-32 MB (the threshold adapts) is mmapped and
unmapped again when freed, and free memory at the top of the heap beyond 128 KB is
given back to the kernel; either way the next allocation faults its pages in anew. On
this VM a page fault costs more after the process was idle (the host reclaims memory),
so a broker handling 512 KB messages or a learner allocating its activations every step
pays for it each time.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses a higher one
LEARNER_TRIM_BYTES = (1 << 31) - 1  # the largest mallopt takes: a learner step's freed activations stay for the next step


def keep_freed_memory(trim_bytes: int = 256 << 20) -> bool:
    """Let glibc reuse freed blocks instead of giving them back to the kernel; False where there is no glibc.

    Blocks up to 32 MB come from the heap, and up to `trim_bytes` of it stay free for reuse
    (tests/test_broker.py checks where a 1 MB block comes from). Larger blocks are still
    mmapped: keeping those on the heap too (M_MMAP_MAX 0) let the heap grow by a whole block
    per round when the same large size was allocated again (docs/status.md).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))

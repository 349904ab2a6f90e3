"""How our processes set the C allocator (``DEALSTREAM_MALLOC_MMAP_THRESHOLD``).

glibc's ``malloc`` serves a request of at least its mmap threshold (128 KiB at start) with a
mapping of its own, which goes back to the system when it is freed. But when such a block is
freed, glibc raises the threshold to the block's size (up to 32 MiB): from then on, buffers of
that size come from the heap, and the heap gives memory back only from its top. A worker
allocates buffers of a few hundred KB in every batch (the Redis call's arguments and its reply,
the outbox entry, Kafka's fetch responses); they fragmented the heap, and the worker's memory
grew with the events it processed, not with the users it held: with the users it holds bounded
at 25,000, its heap grew from 75 to 107 MiB over a drain of 1,000,000 events, and from 47 to
53 MiB with the threshold fixed at 128 KiB (docs/performance.md).

``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold and turns the adjustment off. It runs
once, in the composition root (``streams/cli/main.py``), before the command starts. Where the
C library has no ``mallopt`` (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes

from streams.settings import MAX_MMAP_THRESHOLD

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` with its own mapping, whatever
    was freed before; ``0`` leaves the C library as it is (and ``MALLOC_MMAP_THRESHOLD_`` in
    the environment, if set, in force). Returns whether the threshold was set."""
    if not 0 <= threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"the mmap threshold must be between 0 and {MAX_MMAP_THRESHOLD} bytes, "
            f"got {threshold_bytes}"
        )
    if threshold_bytes == 0:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1)

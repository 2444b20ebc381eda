"""Give freed tensor memory back to the system at once (glibc).

glibc serves allocations above a threshold with their own memory maps, returned on free, and
smaller ones from its heap, kept for reuse. The threshold starts at 128 KiB and rises (up to
32 MiB) each time a mapped block is freed, so after the first few tensors every tensor below
32 MiB lands in the heap, and a run that reads a model tensor by tensor ends up holding a heap
the size of its largest burst of tensors. Fixing the threshold at 1 MiB keeps every tensor in
its own map: memory follows what is alive. Small allocations (below 1 MiB) still use the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def return_freed_tensors() -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere); whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False

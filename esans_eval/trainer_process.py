"""Settings of a process that trains: torch's threads and the C allocator's reuse of memory.

A shared-protocol step works on (B, N) float32 matrices of about 50 MB (B 512 rows x N 24.6k
negative columns for the paper's ESANS): the logits, their exp, the gradient's weights. glibc
serves an allocation above its mmap threshold (which adapts up to 32 MB, no further) with
fresh pages from the kernel and gives them back when it is freed, unless a free block of the
heap already fits it. In a fresh trainer every such matrix of every step was paid again in page
faults (~30,000 a step), the kernel zeroing each page on first touch: about 20 ms for one 50 MB
matrix here, more than the pass that fills it. With the threshold raised above any matrix a step
makes, and freed memory kept rather than trimmed, a step reuses the heap of the one before.
Same numbers, bit for bit; ``benchmarks/bench_eval_allocator.py`` measures time and peak memory
against glibc's defaults (the README's "What came out" has the figures, real data included).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_UP_TO = 1 << 30
"""Allocations up to this size (1 GiB) come from the heap, and up to this much freed memory
stays with the process: a trainer's peak grows (1.06x glibc's after 80 synthetic steps, 1.36x
after 2,400; 2.4 GB against 2.0 GB on Complete Journey after 120 steps)."""


def setup_trainer(threads: int | None) -> None:
    """Set this process up to train: ``threads`` torch threads (None: torch's default) and
    the allocator's reuse of freed memory (:func:`reuse_freed_memory`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    reuse_freed_memory()


def reuse_freed_memory() -> bool:
    """Serve allocations up to :data:`HEAP_UP_TO` from the heap (glibc's mmap threshold) and
    keep up to that much freed memory at the heap's top (its trim threshold); module
    docstring. True when set; False without glibc (musl, macOS), where nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_UP_TO)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_UP_TO)
    )

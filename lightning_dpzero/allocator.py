"""Keeping freed tensor memory in the process on CPU (glibc's malloc), so that the next step reuses it.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults, a freed block at the top of the
heap is handed back to the operating system once more than a few hundred KB are free there, and blocks beyond a
threshold (128 KB at start, raised by glibc to the largest block freed so far) are separate mappings unmapped on
free. The next step's tensors of the same size then come from fresh pages, and the kernel zero-fills every page on
first touch: a page fault per 4 KB. A training step that allocates tens of MB of activations and per-example
blocks then spends a good part of its time in the kernel (measured on the GPT of ``examples/benchmarks``, one CPU
thread: 2-4 thousand faults per non-private step, 5-10 thousand per DP step; about 10% of the DP step's time).

``retain_freed_memory`` tells glibc to keep what is freed (as CUDA's caching allocator does on a GPU): blocks up to
32 MB come from the heap, and the heap is only trimmed when more than 2 GB are free at its top. The process then
holds on to its peak memory between steps instead of faulting it in again. Both private and non-private training
gain; DP-SGD gains more, as it allocates more per step. jemalloc or tcmalloc (``LD_PRELOAD``) do the same.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int

_retained = False


def retain_freed_memory() -> bool:
    """Make the process keep freed memory for reuse (glibc's ``mallopt``); process-wide and idempotent.

    Returns:
        Whether the setting is in effect: ``False`` where the C library is not glibc (macOS, Windows, musl) or
        glibc refused it; nothing is changed then.
    """
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the process already uses
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: its mallopt (if any) means something else
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap threshold first: setting either value switches off glibc's own adjustment of both.
    _retained = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _retained

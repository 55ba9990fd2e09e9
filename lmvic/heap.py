"""Keep freed memory in the process heap, so that large tensors reuse pages instead of faulting them in.

PyTorch's CPU allocator takes its blocks from the C library's ``malloc``. glibc serves blocks above
its mmap threshold (dynamic, never above 32 MiB) with a fresh ``mmap`` and gives them back with
``munmap`` when freed, and trims the heap's top above 128 KiB: every such tensor then pays a page
fault for each 4 KiB page on its first write. Coding a 704×1280 view allocates and frees hundreds of
such tensors (float64 entropy parameters, full-resolution depth, warps), so a third of the encoder's
time went to the kernel. Raising both thresholds (``mallopt``) keeps freed blocks for reuse at the
cost of holding the process's peak heap until it exits.

Measured with ``python benchmarks/coding_speed.py /work/runs/fox``: see that script's docstring.
"""
from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameters (glibc ``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and freed memory up to it stays there (``mallopt``
#: takes an int).
RETAIN_BYTES = 2**31 - 1


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process → True if set (False elsewhere, e.g.
    macOS or musl, where nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES))

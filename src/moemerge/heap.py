"""Give freed memory back to the system between large steps (a calibration sequence, a streamed layer).

glibc raises its mmap threshold after large frees, so later large buffers come from the heap, and freed heap
memory is kept by the process: without a trim, peak RSS grows with every sequence and layer of a run (measured
on the demo model's calibration: 2.4 GiB, 1.1 GiB after one trim). Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC_NAME = ctypes.util.find_library("c")
_TRIM = getattr(ctypes.CDLL(_LIBC_NAME), "malloc_trim", None) if _LIBC_NAME else None


def trim_heap() -> None:
    """Return the free memory at the top and inside the C heap to the system (glibc ``malloc_trim(0)``)."""
    if _TRIM is not None:
        _TRIM(0)

"""How the C heap treats the large, short-lived buffers of a training step (``--heap``).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it with ``munmap`` when torch frees the tensor.  A batch's
activations, and the stored graph of a curvature product, are such buffers: each step
maps them again and the kernel faults in and zeroes every 4 KiB page.  Two ranks of
MNIST's ``cnn`` with 5 000 rows each spent 93 % of their time in the kernel, and a
gradient on 1 000 rows took twice as long as with the heap kept (docs/scaling.md,
"The C heap").  Outside the process, ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc
≥ 2.35, transparent huge pages in ``madvise`` mode) cuts the faults 512-fold instead.

``keep`` tells glibc to serve large blocks from its heap too and never to give freed
memory back to the system (``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD,
-1)``), so a step reuses the pages of the step before.  The price is memory: freed
blocks of one size do not always fit a later block of another, so the heap grows past
the peak that glibc's defaults need (the same ``cnn`` runs: a rank killed for memory on a
24 GB machine at 12.2 GB, against about 7.4 GB per rank with the defaults), which is why ``release``, glibc's
defaults, is the default.  Both apply to the whole process and to allocations made
after the call; where the C library is not glibc nothing is changed.  ``release`` in a
process that never kept its heap changes nothing either: any ``mallopt`` call would fix
glibc's mmap threshold, which it otherwise raises by itself as large blocks are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from hpcopt.training.config import HEAP_MODES

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's own defaults, restored by "release" after "keep".
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_kept = False  # whether this process has set "keep"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 — present in glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def set_heap(mode: str) -> bool:
    """Apply ``mode`` (``keep`` or ``release``) to this process's C heap; ``False`` when it is not glibc's."""
    global _kept
    if mode not in HEAP_MODES:
        raise ValueError(f"heap mode must be one of {', '.join(HEAP_MODES)}, got {mode!r}")
    libc = _glibc()
    if libc is None:
        return False
    if mode == "release" and not _kept:
        return True  # glibc's defaults are in place, its dynamic mmap threshold included
    _kept = mode == "keep"
    if mode == "keep":
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    else:
        # The mmap threshold stays fixed from here on (a mallopt call ends its adjustment).
        settings = ((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    # mallopt returns 1 on success and 0 on error.
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)

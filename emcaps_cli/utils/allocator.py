"""Process-wide memory-allocator settings that make the routing faster on CPU.

Routing allocates and frees tensors of tens of MB many times per step. By default glibc serves
each with a fresh mmap and returns it on free, so every reuse pays first-touch page faults again.
`keep_freed_memory()` tells glibc to serve them from its heap and keep freed memory for reuse,
which makes training and inference faster with a resident size that stays flat
(docs/performance.md, "Allocator"). The settings last as long as the process. The `emcaps`
command calls it; library users may call it too. It only applies to glibc (Linux); elsewhere it
does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DISABLE_VARIABLE = "EMCAPS_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it. Returns whether it applied.

    Set EMCAPS_KEEP_FREED_MEMORY=0 to leave the allocator alone.
    """
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))

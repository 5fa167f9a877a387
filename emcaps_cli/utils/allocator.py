"""Process-wide memory-allocator settings that make the routing faster on CPU.

`huge_pages()` asks PyTorch's CPU allocator for transparent huge pages; it must run before torch
is first imported.

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
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DISABLE_VARIABLE = "EMCAPS_KEEP_FREED_MEMORY"
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def huge_pages() -> bool:
    """Transparent huge pages for PyTorch's CPU allocator (allocations of 2 MB and more): sets
    THP_MEM_ALLOC_ENABLE=1 unless the user set it. Returns whether it can still take effect.

    The vote tensors run to hundreds of MB, and first-touch page faults on them cost more than
    the arithmetic (docs/performance.md, "Transparent huge pages"). PyTorch reads the variable
    only when torch is first imported, so the `emcaps` command calls this before that; library
    users may set the variable themselves.
    """
    os.environ.setdefault(THP_VARIABLE, "1")
    return "torch" not in sys.modules


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

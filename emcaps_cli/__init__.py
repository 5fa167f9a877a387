"""emcaps: matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018)."""

import os

__version__ = "0.1.0"

# Transparent huge pages for PyTorch's CPU allocator (allocations of 2 MB and more). The vote
# tensors run to hundreds of MB, and first-touch page faults on them cost more than the
# arithmetic (measured in docs/performance.md, "Transparent huge pages"). PyTorch reads the
# variable only if it is set before torch is first imported (the `emcaps` command does so); a
# value set by the user is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

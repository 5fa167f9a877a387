"""Busy processes beside a measurement: each one a single-threaded CPU-bound loop.

    with busy_processes(2):
        ...  # measured while two other processes each keep a CPU busy

Used by bench_model.py --busy N to measure throughput under contention against the quiet
figure in the same run.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

# Pure-Python arithmetic: one thread, no memory traffic to speak of, never sleeps.
SPIN = "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) % 2147483648\n"


@contextlib.contextmanager
def busy_processes(count: int, settle_s: float = 1.0) -> Iterator[list[subprocess.Popen]]:
    """Start `count` spinning processes, wait `settle_s` so they are running (and a load
    sampler has seen them), yield them, and kill them on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        if count:
            time.sleep(settle_s)
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()

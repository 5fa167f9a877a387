"""How many CPU threads the intra-op (OpenMP) work gets, and keeping that fair under load.

PyTorch's CPU ops and the C routing kernels share one OpenMP pool. A parallel region ends at a
barrier, so one thread descheduled by another process holds up all of them: on 2 cores with
one busy process beside it, 2 threads train several times slower than 1 (docs/performance.md).

`ThreadGovernor` sizes the pool from what the machine has left:

- the CPUs this process may run on (`os.sched_getaffinity`, and no more than PyTorch's own
  default, which counts physical cores), shared among the processes of a `torchrun` job on
  this node (LOCAL_WORLD_SIZE);
- minus the CPU time other processes used over the last sampling interval (Linux: /proc/stat
  minus this process's /proc/self/stat), re-read at most once per `interval` seconds.

`OMP_NUM_THREADS` in the environment, or an explicit thread count, fixes the pool instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SAMPLE_SECONDS = 1.0  # how often the load of other processes is re-read
BUSY_SHARE = 0.5  # another process counts as holding a CPU once it uses this much of one


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def fixed_threads() -> int | None:
    """The thread count the user fixed with OMP_NUM_THREADS, or None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds: all CPUs busy (`busy`) and this process (`own`), at `wall`."""

    wall: float
    busy: float
    own: float


def read_cpu_sample() -> CpuSample | None:
    """The machine's busy CPU seconds and this process's, from /proc; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        with open("/proc/self/stat") as f:
            own_fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    # (steal too: the hypervisor gave that time to someone else).
    values = [int(v) for v in fields[:8]]
    busy = sum(values) - values[3] - values[4]
    own = int(own_fields[11]) + int(own_fields[12])  # utime, stime (fields 14, 15 of stat)
    return CpuSample(time.monotonic(), busy / tick, own / tick)


def others_load(before: CpuSample, after: CpuSample) -> float:
    """CPUs' worth of time other processes used between two samples (>= 0)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def threads_for(cpus: int, others: float) -> int:
    """Threads to run with `cpus` CPUs of which others keep `others` busy: one per CPU left,
    an other process counting once it holds BUSY_SHARE of a CPU; at least one."""
    taken = int(others + (1.0 - BUSY_SHARE))  # others 0.5 .. 1.49 take one CPU, and so on
    return max(1, cpus - taken)


class ThreadGovernor:
    """Sets torch's intra-op thread count for the load of the moment; `update()` once a step.

    threads: a fixed count (no adaptation), or None for the adaptive policy above (itself
    fixed when OMP_NUM_THREADS is set, or where /proc cannot be read). max_threads: the CPUs
    to share (default: see the module doc).
    """

    def __init__(
        self,
        threads: int | None = None,
        max_threads: int | None = None,
        interval: float = SAMPLE_SECONDS,
        sampler: Callable[[], CpuSample | None] = read_cpu_sample,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        most = max_threads or min(available_cpus(), torch.get_num_threads())
        self.cpus = max(1, most // local_processes())
        fixed = threads if threads is not None else fixed_threads()
        self.adaptive = fixed is None
        self.interval, self.sampler, self.set_threads = interval, sampler, set_threads
        self.clock = clock
        self.threads = fixed if fixed is not None else self.cpus
        self.last = sampler() if self.adaptive else None
        if self.last is None:
            self.adaptive = False
        self.set_threads(self.threads)

    def update(self) -> int:
        """Re-read the load if `interval` has passed; returns the thread count now in force."""
        if not self.adaptive:
            return self.threads
        if self.clock() - self.last.wall < self.interval:
            return self.threads
        now = self.sampler()
        if now is None:
            return self.threads
        wanted = threads_for(self.cpus, others_load(self.last, now))
        self.last = now
        if wanted != self.threads:
            self.threads = wanted
            self.set_threads(wanted)
        return self.threads


_governor: ThreadGovernor | None = None


def keep_fair() -> int:
    """Once per batch of CPU work: the process-wide governor's `update()` (created on the
    first call, which also sets torch's thread count)."""
    global _governor
    if _governor is None:
        _governor = ThreadGovernor()
    return _governor.update()

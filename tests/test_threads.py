"""The thread policy: one intra-op thread per CPU that other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from emcaps_cli.utils import threads
from emcaps_cli.utils.threads import CpuSample, ThreadGovernor, others_load, threads_for


class FakeMachine:
    """A clock and /proc counters that a test advances by hand."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.calls = 0

    def run(self, seconds: float, own_cpus: float, other_cpus: float) -> None:
        self.wall += seconds
        self.own += own_cpus * seconds
        self.busy += (own_cpus + other_cpus) * seconds

    def sample(self) -> CpuSample:
        self.calls += 1
        return CpuSample(self.wall, self.busy, self.own)

    def clock(self) -> float:
        return self.wall


def governor(machine: FakeMachine, cpus: int = 2, **kw) -> tuple[ThreadGovernor, list[int]]:
    set_calls: list[int] = []
    options = dict(sampler=machine.sample, clock=machine.clock, set_threads=set_calls.append)
    g = ThreadGovernor(max_threads=cpus, **{**options, **kw})
    return g, set_calls


@pytest.fixture(autouse=True)
def no_fixed_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize(
    "cpus, others, expected",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.0, 1), (4, 1.0, 3), (4, 2.2, 2)],
)
def test_one_thread_per_cpu_left_free(cpus, others, expected):
    assert threads_for(cpus, others) == expected


def test_others_load_excludes_this_process():
    before = CpuSample(10.0, 100.0, 40.0)
    after = CpuSample(12.0, 104.0, 42.0)  # 4 CPU-seconds in 2 s, 2 of them ours
    assert others_load(before, after) == pytest.approx(1.0)
    assert others_load(after, after) == 0.0


def test_governor_follows_the_load_of_other_processes():
    machine = FakeMachine()
    g, set_calls = governor(machine)
    assert g.adaptive and g.threads == 2 and set_calls == [2]
    machine.run(1.5, own_cpus=1.0, other_cpus=1.0)  # another process holds a CPU
    assert g.update() == 1 and set_calls == [2, 1]
    machine.run(1.5, own_cpus=1.0, other_cpus=1.0)
    assert g.update() == 1 and set_calls == [2, 1]  # unchanged: not set again
    machine.run(1.5, own_cpus=2.0, other_cpus=0.1)  # it has finished
    assert g.update() == 2 and set_calls == [2, 1, 2]


def test_governor_reads_the_load_at_most_once_an_interval():
    machine = FakeMachine()
    g, _ = governor(machine, interval=1.0)
    calls = machine.calls
    machine.run(0.4, own_cpus=1.0, other_cpus=2.0)
    assert g.update() == 2 and machine.calls == calls  # too soon: /proc not read
    machine.run(0.7, own_cpus=1.0, other_cpus=2.0)
    assert g.update() == 1 and machine.calls == calls + 1


def test_omp_num_threads_fixes_the_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    machine = FakeMachine()
    g, set_calls = governor(machine)
    machine.run(2.0, own_cpus=1.0, other_cpus=2.0)
    assert not g.adaptive and g.update() == 3 and set_calls == [3]
    assert machine.calls == 0


def test_explicit_count_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    g, set_calls = governor(FakeMachine(), threads=1)
    assert g.update() == 1 and set_calls == [1]


def test_torchrun_processes_share_the_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    g, _ = governor(FakeMachine(), cpus=4)
    assert g.threads == 2


def test_unreadable_proc_means_a_fixed_count():
    g, set_calls = governor(FakeMachine(), sampler=lambda: None)  # type: ignore[arg-type]
    assert not g.adaptive and g.update() == 2 and set_calls == [2]


@pytest.mark.skipif(threads.read_cpu_sample() is None, reason="needs Linux /proc")
def test_a_real_busy_process_is_seen():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        before = threads.read_cpu_sample()
        time.sleep(1.0)
        after = threads.read_cpu_sample()
    finally:
        spin.kill()
        spin.wait()
    assert others_load(before, after) >= 0.5

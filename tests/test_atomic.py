"""Atomic writes: temporary files name their writer, and a dead writer's are cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import run_emcaps

from emcaps_cli.utils.atomic import _writer_tag, atomic_path, remove_stale_temporaries

FIXTURES = Path(__file__).parent / "fixtures" / "smallnorb_fake"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temporary(target: Path, pid: int) -> Path:
    host = _writer_tag().rsplit("-", 1)[0]
    path = target.parent / f".{target.name}.{host}-{pid}.abc123.tmp"
    path.write_bytes(b"half a file")
    return path


def test_the_temporary_name_carries_host_and_pid(tmp_path: Path) -> None:
    target = tmp_path / "c.h5"
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(f".c.h5.{_writer_tag()}.") and tmp.name.endswith(".tmp")
        assert str(os.getpid()) in tmp.name
        tmp.write_text("done")
    assert target.read_text() == "done"


def test_only_temporaries_of_dead_writers_of_that_file_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "c.h5"
    stale = temporary(target, dead_pid())
    live = temporary(target, os.getpid())
    other = temporary(tmp_path / "other.h5", dead_pid())
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_prepare_after_a_killed_prepare_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    stale = temporary(out, dead_pid())  # what `kill -9` during the pixel pass leaves
    result = run_emcaps("prepare", FIXTURES, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
    assert not stale.exists()

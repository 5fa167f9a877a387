"""A run directory is never clobbered: run files refuse a new run, a lock refuses a second one."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_error_line, make_cache, run_emcaps
from typer.testing import CliRunner

from emcaps_cli.cli import app
from emcaps_cli.training.rundir import LOCK_FILE, RUN_FILES

QUICK = ["--model", "cnn", "--device", "cpu", "--batch-size", "10", "--limit-test", "10"]

pytestmark = pytest.mark.usefixtures("single_thread")


def digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.name != LOCK_FILE
    }


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_new_run_refuses_a_directory_holding_any_run_file(tmp_path: Path, name: str) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b"a finished run")
    (run / "curves.png").write_bytes(b"png")
    before = digests(run)
    result = CliRunner().invoke(app, ["train", "--data", str(cache), "--out", str(run), *QUICK])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --out") and name in line and "--resume" in line
    assert digests(run) == before


@pytest.mark.slow
def test_a_finished_run_without_last_pt_is_not_overwritten(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    run = tmp_path / "run"
    args = ["train", "--data", cache, "--out", run, *QUICK, "--epochs", "1"]
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    (run / "last.pt").unlink()
    before = digests(run)
    assert_error_line(run_emcaps(*args), "best.pt", "config.json", "metrics.jsonl")
    assert digests(run) == before


def hold_lock(run: Path) -> int:
    """Lock the run directory as a running `emcaps train` would; returns the descriptor."""
    run.mkdir(exist_ok=True)
    handle = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(handle, f"{os.getpid()}\n".encode())
    return handle


@pytest.mark.slow
def test_a_second_train_on_the_same_out_fails_at_once_naming_the_other(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    run = tmp_path / "run"
    handle = hold_lock(run)
    try:
        result = run_emcaps("train", "--data", cache, "--out", run, *QUICK, "--epochs", "1")
    finally:
        os.close(handle)
    assert_error_line(result, str(run), f"pid {os.getpid()}", "in use")
    assert not any((run / name).exists() for name in RUN_FILES)


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    run = tmp_path / "run"
    holder = (
        "import fcntl, os, sys, time\n"
        f"h = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\n"
        "os.write(h, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    run.mkdir()
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.send_signal(signal.SIGKILL)
    child.wait()
    result = CliRunner().invoke(
        app, ["train", "--data", str(cache), "--out", str(run), *QUICK, "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (run / "last.pt").is_file()


def test_a_failed_start_leaves_no_directory_behind(tmp_path: Path) -> None:
    run = tmp_path / "new-run"
    result = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path / "no.h5"), "--out", str(run), *QUICK]
    )
    assert result.exit_code == 2 and "no.h5" in result.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    ("kind", "reason"), [("file", "is a file"), ("under-a-file", "taken is not a directory")]
)
def test_out_that_cannot_be_a_run_directory_is_one_error_line(
    tmp_path: Path, kind: str, reason: str
) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = blocker if kind == "file" else blocker / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(cache), "--out", str(out), *QUICK])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {out}") and reason in line
    assert blocker.read_text() == "not a directory"


def test_resume_without_a_run_says_there_is_none_to_continue(tmp_path: Path) -> None:
    run = tmp_path / "never-started"
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --resume:") and "no last.pt" in line
    assert not run.exists()

"""The run directory of `emcaps train`: what a run writes there, and who may write it.

A run writes CONFIG_JSON (its options, image counts, device and routing kernels),
METRICS_JSONL (one line per epoch), last.pt and best.pt (`checkpoint.LAST`, `BEST`),
CURVES_PNG and, for capsule networks, DIAGNOSTICS_PNG. A new run refuses a directory that
already holds a run file; `--resume` continues one. While a run writes, it holds an exclusive
`fcntl.flock` on LOCK_FILE in the directory, so a second `emcaps train` on the same directory
fails at once, naming the process that holds it. The kernel drops the lock when the process
ends, however it ends, so a killed run leaves no stale lock: the file stays, the lock does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emcaps_cli.checkpoint import BEST, LAST
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import atomic_path, check_output_dir
from emcaps_cli.utils.reporter import Reporter

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
CURVES_PNG = "curves.png"
DIAGNOSTICS_PNG = "diagnostics.png"
# Files a run writes; any of them means the directory holds a run.
RUN_FILES = (LAST, BEST, CONFIG_JSON, METRICS_JSONL)
LOCK_FILE = ".emcaps-train.lock"


def check_new_run(run_dir: Path) -> None:
    """Refuse a directory that already holds a run (any of RUN_FILES)."""
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present:
        raise EmcapsError(
            f"--out {run_dir}: already holds a run ({', '.join(present)}); "
            "pass --resume to continue it or choose another --out"
        )


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Write the metrics history as JSON lines, one per epoch, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in history))


def plot(path: Path, history: list[dict[str, Any]], reporter: Reporter, kind: str) -> None:
    """Draw `kind` ("curves" or "diagnostics") of the metrics history; failures become notes."""
    from emcaps_cli import plots

    draw = {"curves": plots.plot_learning_curves, "diagnostics": plots.plot_diagnostics}[kind]
    try:
        draw(history, path)
    except (OSError, ValueError) as exc:  # a plot must never end a training run
        reporter.note(f"{path}: could not draw {kind} ({exc})")


def _make_dir(run_dir: Path) -> bool:
    """Create `run_dir` (and parents) if needed; True when this call created it."""
    if run_dir.is_dir():
        return False
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as exc:
        raise EmcapsError(
            f"--out {run_dir}: cannot create the directory ({exc.strerror})"
        ) from None
    return True


def _holder(handle: int) -> str:
    """The pid the lock holder wrote into the lock file, as text for a message."""
    text = os.pread(handle, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def _lock(path: Path, run_dir: Path) -> int:
    """Open and exclusively lock `path`; write our pid into it. Returns the descriptor."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise EmcapsError(f"--out {run_dir}: cannot write there ({exc.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(handle) if exc.errno in (errno.EAGAIN, errno.EACCES) else None
        os.close(handle)
        if holder is None:
            raise EmcapsError(f"--out {run_dir}: cannot lock it ({exc.strerror})") from None
        raise EmcapsError(
            f"--out {run_dir}: in use by another `emcaps train` ({holder}); "
            "wait for it to finish or choose another --out"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    return handle


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Create `run_dir` if needed and hold its lock for the duration of the block.

    A directory this call created and in which nothing but the lock file was written is
    removed again on exit, so a run that fails before writing anything leaves no trace.
    """
    run_dir = Path(run_dir)
    check_output_dir(run_dir, "--out")
    created = _make_dir(run_dir)
    lock_path = run_dir / LOCK_FILE
    handle = _lock(lock_path, run_dir)
    try:
        yield run_dir
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                lock_path.unlink()
                run_dir.rmdir()
        os.close(handle)

"""`emcaps prepare RAW_DIR`: raw smallNORB files -> the HDF5 cache training reads."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from emcaps_cli.cli._common import console, friendly_errors
from emcaps_cli.defaults import CACHE_IMAGE_SIZE


@friendly_errors
def prepare(
    raw_dir: Path = typer.Argument(
        ..., metavar="RAW_DIR", help="Directory with the six smallNORB .mat[.gz] files."
    ),
    out: Path = typer.Option(Path("data/smallnorb.h5"), "--out", help="HDF5 cache to write."),
    size: int = typer.Option(CACHE_IMAGE_SIZE, "--size", help="Side of the downsampled images."),
) -> None:
    """Validate the raw smallNORB files and write a downsampled HDF5 cache (atomically)."""
    from emcaps_cli.data.cache import prepare_cache

    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task: list[TaskID] = []

        def on_start(split: str, n: int) -> None:
            task.append(progress.add_task(f"{split}: {n} pairs", total=n))

        prepare_cache(raw_dir, out, size, on_start, lambda k: progress.advance(task[-1], k))
    console.print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)

"""`emcaps prepare RAW_DIR`: raw smallNORB files -> the HDF5 cache training reads."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from emcaps_cli.cli._common import console, friendly_errors, progress_bar
from emcaps_cli.defaults import CACHE_IMAGE_SIZE, DEFAULT_DATA


@friendly_errors
def prepare(
    raw_dir: Path = typer.Argument(
        ..., metavar="RAW_DIR", help="Directory with the six smallNORB .mat[.gz] files."
    ),
    out: Path = typer.Option(Path(DEFAULT_DATA), "--out", help="HDF5 cache to write."),
    size: int = typer.Option(CACHE_IMAGE_SIZE, "--size", help="Side of the downsampled images."),
) -> None:
    """Validate the raw smallNORB files and write a downsampled HDF5 cache (atomically)."""
    from emcaps_cli.data.cache import prepare_cache

    start = time.perf_counter()
    with progress_bar("validating") as bar:

        def on_start(split: str, n: int) -> None:
            bar.restart(n, f"{split}: {n} pairs")

        prepare_cache(raw_dir, out, size, on_start, bar.advance)
    console.print(f"wrote {out} in {time.perf_counter() - start:.1f} s")

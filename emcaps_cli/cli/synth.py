"""`emcaps synth OUT_DIR`: write a procedurally rendered stand-in for the raw smallNORB files."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from emcaps_cli.cli._common import console, friendly_errors, progress_bar
from emcaps_cli.defaults import ALL_VIEWS


@friendly_errors
def synth(
    out_dir: Path = typer.Argument(
        ..., metavar="OUT_DIR", help="Directory for the six .mat files."
    ),
    views: int = typer.Option(
        ALL_VIEWS, "--views", help="Viewpoint/lighting combinations per instance (1..972)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the view choice and the pixel noise."),
    gzip: bool = typer.Option(False, "--gzip", help="Write .mat.gz files."),
    workers: int = typer.Option(
        1, "--workers", help="Render processes; the files are the same for any number."
    ),
) -> None:
    """Render 5 categories x 10 instances of 3D toys on the smallNORB viewpoint grid."""
    from emcaps_cli.data.synth import write_synthetic

    start = time.perf_counter()
    with progress_bar("rendering") as bar:
        written = write_synthetic(
            out_dir,
            views=views,
            seed=seed,
            gzipped=gzip,
            workers=workers,
            on_start=bar.restart,
            on_progress=bar.advance,
        )
    console.print(f"wrote {len(written)} files to {out_dir} in {time.perf_counter() - start:.1f} s")

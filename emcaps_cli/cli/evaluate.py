"""`emcaps evaluate CKPT`: test error of a checkpoint, by class, viewpoint and familiarity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from emcaps_cli.cli._common import (
    console,
    data_option,
    device_option,
    friendly_errors,
    json_option,
    kernels_option,
    print_json,
    progress_bar,
    use_kernels,
)
from emcaps_cli.defaults import EVAL_BATCH_SIZE, Kernels


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _rate_table(title: str, key: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for name in (key, "n", "errors", "error"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(str(row[key]), str(row["n"]), str(row["errors"]), _percent(row["error_rate"]))
    return table


def print_report(result: dict[str, Any]) -> None:
    """Human-readable tables of an evaluation result, on stderr."""
    from emcaps_cli.data.smallnorb import CATEGORIES

    crops = f"{result['crops']} crops" if result["multicrop"] else "centre crop"
    console.print(
        f"{result['checkpoint']} ({result['model']}, {crops}): test error "
        f"{_percent(result['error_rate'])} on {result['n']} images"
    )
    console.print(_rate_table("Per class", "class", result["per_class"]))
    confusion = Table(title="Confusion (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in CATEGORIES:
        confusion.add_column(name, justify="right")
    for name, row in zip(CATEGORIES, result["confusion"], strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    console.print(confusion)
    console.print(_rate_table("By azimuth (degrees)", "azimuth", result["by_azimuth"]))
    console.print(_rate_table("By elevation (degrees)", "elevation", result["by_elevation"]))
    if "familiar" in result:
        rows = [{"viewpoints": k, **result[k]} for k in ("familiar", "novel")]
        console.print(_rate_table(f"{result['split']} split", "viewpoints", rows))


@friendly_errors
def evaluate(
    checkpoint: Path = typer.Argument(
        ...,
        metavar="CKPT",
        help="Checkpoint written by `emcaps train`, or its run directory (uses best.pt).",
    ),
    data: Path = data_option(),
    multicrop: bool = typer.Option(
        False,
        "--multicrop",
        help="Average class activations over the centre and 4 diagonal crops (the CNN averages "
        "softmax probabilities). Default: the centre crop only.",
    ),
    json_out: bool = json_option(),
    batch_size: int = typer.Option(EVAL_BATCH_SIZE, "--batch-size", help="Images per batch."),
    limit: int | None = typer.Option(
        None, "--limit", help="Evaluate N evenly spaced test images (all classes and viewpoints)."
    ),
    device: str = device_option(),
    kernels: Kernels | None = kernels_option(),
) -> None:
    """Test error of a checkpoint: overall, per class, confusion matrix, by azimuth and
    elevation, and familiar vs novel viewpoints for a checkpoint trained on a viewpoint split."""
    from emcaps_cli.checkpoint import load_model
    from emcaps_cli.evaluation import checkpoint_split, evaluate_model, load_test_images
    from emcaps_cli.utils.device import resolve_device

    use_kernels(kernels)
    torch_device = resolve_device(device)
    model, ckpt = load_model(checkpoint, torch_device)
    test = load_test_images(data, limit)
    with progress_bar(f"evaluating {checkpoint.name}", len(test)) as bar:
        result = evaluate_model(
            model, test, checkpoint_split(ckpt), batch_size, multicrop, progress=bar.advance
        )
    result = {
        "checkpoint": str(checkpoint),
        "model": model.config.model,
        "score_kind": model.score_kind,
        **result,
    }
    if json_out:
        print_json(result)
    else:
        print_report(result)

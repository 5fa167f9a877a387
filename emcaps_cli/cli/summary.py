"""`emcaps summary`: architecture and parameter counts."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import console, friendly_errors, json_option, print_json
from emcaps_cli.defaults import Model, Pose, Routing


def print_table(info: dict[str, Any], title: str) -> None:
    """The layers, their output shapes and parameter counts, on stderr."""
    table = Table(title=title)
    for col in ("layer", "kind", "output shape", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for layer in info["layers"]:
        shapes = " + ".join("x".join(map(str, s)) for s in layer["output"])
        table.add_row(layer["name"], layer["kind"], shapes, f"{layer['parameters']:,}")
    table.add_row("total", "", "", f"{info['parameters']:,}")
    console.print(table)


@friendly_errors
def summary(
    model: Model = opts.MODEL,
    arch: str = opts.ARCH,
    iters: int = opts.ITERS,
    pose: Pose = opts.POSE,
    coord_add: bool = opts.COORD_ADD,
    channels: int = opts.CHANNELS,
    routing: Routing = opts.ROUTING,
    final_lambda: float = opts.FINAL_LAMBDA,
    json_out: bool = json_option(),
) -> None:
    """Show the network's layers, output shapes (per image) and parameter counts."""
    from emcaps_cli.models.summary import describe

    config = opts.model_config(model, arch, iters, pose, coord_add, channels, routing, final_lambda)
    info = describe(config)
    if json_out:
        print_json(info)
    else:
        print_table(info, f"{model} {arch}" if model is Model.capsnet else str(model))

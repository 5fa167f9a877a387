"""`emcaps summary`: architecture and parameter counts."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import console, friendly_errors, print_json
from emcaps_cli.cli.options import Opt, with_options

SHOWN = ("model", "arch", "iters", "pose", "coord_add", "channels", "routing", "final_lambda")
SUMMARY_OPTIONS = (
    *(opts.BY_NAME[name] for name in SHOWN),
    Opt("json_out", bool, "Print the result as JSON on stdout.", flag="--json", default=False),
)


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


@with_options(SUMMARY_OPTIONS)
@friendly_errors
def summary(**params: Any) -> None:
    """Show the network's layers, output shapes (per image) and parameter counts."""
    from emcaps_cli.models.summary import describe

    json_out = params.pop("json_out")
    config = opts.model_config(**params)
    info = describe(config)
    if json_out:
        print_json(info)
    else:
        title = f"{config.model} {params['arch']}" if config.model == "capsnet" else config.model
        print_table(info, title)

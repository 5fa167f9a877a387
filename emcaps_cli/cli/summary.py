"""`emcaps summary`: architecture and parameter counts."""

from __future__ import annotations

import typer
from rich.table import Table

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import console, friendly_errors, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    @friendly_errors
    def summary(
        model: str = opts.MODEL,
        arch: str = opts.ARCH,
        iters: int = opts.ITERS,
        pose: str = opts.POSE,
        coord_add: bool = opts.COORD_ADD,
        channels: int = opts.CHANNELS,
        routing: str = opts.ROUTING,
        final_lambda: float = opts.FINAL_LAMBDA,
        as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ) -> None:
        """Show the network's layers, output shapes (per image) and parameter counts."""
        from emcaps_cli.models.summary import describe

        config = opts.model_config(
            model, arch, iters, pose, coord_add, channels, routing, final_lambda
        )
        info = describe(config)
        if as_json:
            print_json(info)
            return
        table = Table(title=f"{model} {arch if model == 'capsnet' else ''}".strip())
        for col in ("layer", "kind", "output shape", "parameters"):
            table.add_column(col, justify="right" if col == "parameters" else "left")
        for layer in info["layers"]:
            shapes = " + ".join("x".join(map(str, s)) for s in layer["output"])
            table.add_row(layer["name"], layer["kind"], shapes, f"{layer['parameters']:,}")
        table.add_row("total", "", "", f"{info['parameters']:,}")
        console.print(table)

"""`emcaps summary`: architecture and parameter counts."""

from __future__ import annotations

import typer
from rich.table import Table

from emcaps_cli.cli._common import console, friendly_errors, print_json
from emcaps_cli.models import ModelConfig, parse_arch
from emcaps_cli.summary import describe


def register(app: typer.Typer) -> None:
    @app.command()
    @friendly_errors
    def summary(
        model: str = typer.Option("capsnet", help="capsnet (Fig. 1) or cnn (section 5 baseline)."),
        arch: str = typer.Option(
            "32,32,32,32",
            help="A,B,C,D of Fig. 1: ReLU-conv channels, "
            "primary, conv-caps-1 and conv-caps-2 capsule types.",
        ),
        iters: int = typer.Option(3, help="EM routing iterations."),
        pose: str = typer.Option(
            "matrix", help="matrix (4x4 pose, 4x4 W) or vector (16-vector pose, 16x16 W)."
        ),
        coord_add: bool = typer.Option(
            True, "--coord-add/--no-coord-add", help="Coordinate Addition in the class capsules."
        ),
        channels: int = typer.Option(2, help="Input channels: 2 = both stereo views, 1 = left."),
        routing: str = typer.Option(
            "exact",
            help="exact (each child normalised over all its "
            "parents) or patch (each K x K patch routed alone).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ) -> None:
        """Show the network's layers, output shapes (per image) and parameter counts."""
        config = ModelConfig(
            model=model,
            arch=parse_arch(arch),
            iters=iters,
            pose=pose,
            coord_add=coord_add,
            channels=channels,
            routing=routing,
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

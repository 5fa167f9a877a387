"""The `emcaps` command line: a thin Typer layer, one module per command.

Each command module defines `register(app)`; the library does the work.
"""

from __future__ import annotations

import importlib

import typer

from emcaps_cli.allocator import keep_freed_memory

app = typer.Typer(
    name="emcaps",
    help="Matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018) on smallNORB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Add a module here when its command lands.
COMMANDS = ("prepare", "synth", "summary", "train", "evaluate", "attack")

for _name in COMMANDS:
    importlib.import_module(f"emcaps_cli.cli.{_name}").register(app)


def main() -> None:
    keep_freed_memory()  # faster routing on CPU; see emcaps_cli/allocator.py
    app()

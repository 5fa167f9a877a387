"""A command's options as markdown tables, one per `--help` panel, for the docs.

    python -m emcaps_cli.cli.options_table [train|summary]

prints the tables of `emcaps train` (default) or `emcaps summary`, generated from the same rows
(emcaps_cli/cli/options.py) the command is built from, so the docs can be regenerated whenever
an option changes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from emcaps_cli.cli.options import PANELS, Opt


def _default(row: Opt) -> str:
    if isinstance(row.show_default, str):
        return row.show_default
    value = row.cli_default
    if row.show_default is False or value is None:
        return "—"
    if row.type is bool:
        on, _, off = row.spelling.partition("/")
        return f"`{on}`" if value else (f"`{off}`" if off else "off")
    return f"`{value}`"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown(rows: Sequence[Opt]) -> str:
    """One table (option, default, meaning) per panel, in PANELS order, under its bold name."""
    parts = []
    for panel in PANELS:
        in_panel = [row for row in rows if row.panel == panel]
        if not in_panel:
            continue
        lines = [f"**{panel or 'Options'}**", "", "| Option | Default | Meaning |", "|---|---|---|"]
        for row in in_panel:
            option = row.spelling.replace("/", " / ")
            if row.metavar:
                option += f" {row.metavar}"
            lines.append(f"| `{_cell(option)}` | {_cell(_default(row))} | {_cell(row.help)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from emcaps_cli.cli.summary import SUMMARY_OPTIONS
    from emcaps_cli.cli.train import TRAIN_OPTIONS

    commands = {"train": TRAIN_OPTIONS, "summary": SUMMARY_OPTIONS}
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args else "train"
    if name not in commands or len(args) > 1:
        print(f"usage: python -m emcaps_cli.cli.options_table [{'|'.join(commands)}]")
        return 2
    sys.stdout.write(markdown(commands[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

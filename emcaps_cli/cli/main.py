"""The `emcaps` application: every command, in the order `emcaps --help` lists them, and the
entry point `main()`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from emcaps_cli.cli._common import INTERRUPTED, click_exceptions, usage_message
from emcaps_cli.cli.attack import attack
from emcaps_cli.cli.evaluate import evaluate
from emcaps_cli.cli.options import PanelledCommand
from emcaps_cli.cli.prepare import prepare
from emcaps_cli.cli.summary import summary
from emcaps_cli.cli.synth import synth
from emcaps_cli.cli.train import train_command
from emcaps_cli.errors import FallbackWarning
from emcaps_cli.utils.allocator import huge_pages, keep_freed_memory


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one `error: ...` line, exit 2."""

    def main(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        standalone = kw.pop("standalone_mode", True)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, *a, standalone_mode=False, **kw)
        except click_exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.format_message())
            code = 0
        except click_exceptions.UsageError as exc:
            typer.echo(f"error: {usage_message(exc, argv)}", err=True)
            code = 2
        except (KeyboardInterrupt, typer.Abort):
            typer.echo(INTERRUPTED, err=True)
            code = 130
        if not standalone:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="emcaps",
    cls=OneLineErrors,
    help="Matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018) on smallNORB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: boolean flags read as flags, not `<bool>` options
    context_settings={"max_content_width": 200},  # help as wide as the terminal
)

app.command("prepare")(prepare)
app.command("synth")(synth)
app.command("summary")(summary)
app.command("train", cls=PanelledCommand)(train_command)
app.command("evaluate")(evaluate)
app.command("attack")(attack)

COMMANDS = tuple(command.name for command in app.registered_commands)


_python_format_warning = warnings.formatwarning


def format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """emcaps' FallbackWarnings as one `warning: ...` line, as errors and notes are; other
    warnings as Python shows them."""
    if issubclass(category, FallbackWarning):
        return f"warning: {str(message).removeprefix('emcaps: ')}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main() -> None:
    # Process settings for faster routing on CPU (emcaps_cli/utils/allocator.py); the commands
    # import torch inside their functions, so it is not imported yet.
    huge_pages()
    keep_freed_memory()
    warnings.formatwarning = format_warning
    app(prog_name="emcaps")  # also under `python -m emcaps_cli`

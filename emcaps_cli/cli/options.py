"""Command-line options declared once each, as rows of a table the commands are built from.

A row (`Opt`) holds an option's flag, type, help text and `--help` panel; an option that sets a
ModelConfig or TrainConfig field (emcaps_cli/config.py) takes its default from that field, so the
command line and the library agree. `with_options(rows)` gives a command function the Typer
parameters of its rows, `PanelledCommand` shows them grouped by panel in `--help`, and
`python -m emcaps_cli.cli.options_table` renders them as markdown for the docs.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand

from emcaps_cli.defaults import Choice

F = TypeVar("F", bound=Callable[..., Any])

# The panels of a command's `--help`, in order; None is the first, headed "Options".
RUN = None
TABLE_1 = "Table 1 options"
TRAINING = "Training"
ADVANCED = "Advanced"
PANELS = (RUN, TABLE_1, TRAINING, ADVANCED)


@dataclasses.dataclass(frozen=True)
class Opt:
    """One command-line option.

    name          the command's parameter name, and the name of the config field it sets
    type          the value's type; a Choice enum for a fixed set of values
    help          the help text, with units
    panel         the `--help` panel, one of PANELS
    config        ModelConfig or TrainConfig: the option sets that class's field `name` and
                  takes its default from it; None: an option of the command alone
    flag          how the option is spelt; default: --name, underscores as dashes
    default       the default of an option that sets no config field
    show_default  the default as `--help` shows it, when it is not the value itself (e.g.
                  "half of --epochs"); False: none shown
    metavar       the value's placeholder in `--help`
    parse         turns the typed value into the config's (e.g. "32,32,32,32" into a tuple)
    """

    name: str
    type: Any
    help: str
    panel: str | None = RUN
    config: type | None = None
    flag: str = ""
    default: Any = None
    show_default: bool | str = True
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def spelling(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def cli_default(self) -> Any:
        """The default as the command line holds it: a config field's default (a choice as its
        enum member, a tuple as comma-separated text), else `default`."""
        if self.config is None:
            return self.default
        field = {f.name: f for f in dataclasses.fields(self.config)}[self.name]
        value = field.default
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if value is not None and isinstance(self.type, type) and issubclass(self.type, Choice):
            return self.type(value)
        return value

    def annotation(self) -> Any:
        return self.type if self.cli_default is not None else self.type | None

    def typer_option(self) -> Any:
        extra: dict[str, Any] = {}
        if self.show_default is not True:
            extra["show_default"] = self.show_default
        if self.metavar is not None:
            extra["metavar"] = self.metavar
        return typer.Option(
            self.cli_default, self.spelling, help=self.help, rich_help_panel=self.panel, **extra
        )

    def to_config(self, value: Any) -> Any:
        """A value of the option as the config stores it: a choice as its value, a path as text."""
        if isinstance(value, Choice):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if self.parse is not None and value is not None:
            return self.parse(value)
        return value


def with_options(rows: Sequence[Opt]) -> Callable[[F], F]:
    """Give a command function `fn(<its own parameters>, **params)` one Typer parameter per row.

    Typer reads a command's options from its signature; this writes that signature from the
    rows, after the function's own parameters (such as `ctx: typer.Context`)."""

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = [
            inspect.Parameter(
                row.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=row.typer_option(),
                annotation=row.annotation(),
            )
            for row in rows
        ]
        params = own + generated
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


class PanelledCommand(TyperCommand):
    """Plain `--help` (no rich boxes) with the options under their panel's heading, in PANELS
    order: `Options:` first, then `Table 1 options:`, `Training:`, `Advanced:`."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list[tuple[str, str]] = []
        panels: dict[str | None, list[tuple[str, str]]] = {panel: [] for panel in PANELS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None), []).append(record)
        for heading, records in (("Arguments", arguments), *panels.items()):
            if records:
                with formatter.section(heading or "Options"):
                    formatter.write_dl(records)

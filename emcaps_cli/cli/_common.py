"""Helpers shared by the command modules: one-line errors, stderr console, JSON on stdout."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from emcaps_cli.errors import EmcapsError

F = TypeVar("F", bound=Callable[..., Any])

# Human text and progress go to stderr; stdout stays clean for --json.
console = Console(stderr=True)


def friendly_errors(fn: F) -> F:
    """Turn EmcapsError into `error: <message>` on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmcapsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()

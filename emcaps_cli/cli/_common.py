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


KERNELS_HELP = (
    "Routing kernels on the CPU: auto (C kernels, built once with the system C compiler; "
    "PyTorch ops with a warning if that fails), c (C kernels or an error), torch (PyTorch "
    "ops only). GPUs always use PyTorch ops. Default: $EMCAPS_KERNELS, else auto."
)


def kernels_option() -> Any:
    return typer.Option(None, "--kernels", help=KERNELS_HELP, show_default=False)


def use_kernels(choice: str | None) -> None:
    """Apply --kernels (or check $EMCAPS_KERNELS): a bad value is a one-line error."""
    from emcaps_cli.capsules import cpu_kernels

    try:
        if choice is not None:
            cpu_kernels.set_backend(choice)
        if cpu_kernels.backend() == "c":
            cpu_kernels.library()  # build now: a failure is an error before any work starts
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kernels") from None
    except cpu_kernels.KernelsUnavailable as exc:
        raise EmcapsError(f"--kernels c: {exc}") from None

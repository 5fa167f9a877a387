"""Helpers shared by the command modules: one-line errors, the stderr console and its progress
bars, JSON on stdout, and the options several commands take."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from emcaps_cli.defaults import DEFAULT_DATA, Kernels
from emcaps_cli.errors import EmcapsError

try:  # recent Typer vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older Typer on top of click
    from click import exceptions as click_exceptions

F = TypeVar("F", bound=Callable[..., Any])

# Human text and progress go to stderr; stdout stays clean for --json.
console = Console(stderr=True)


INTERRUPTED = "interrupted (Ctrl-C)"


def friendly_errors(fn: F) -> F:
    """Turn EmcapsError into `error: <message>` on stderr and exit code 2, and Ctrl-C into one
    line and exit code 130; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmcapsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# Phrases of Typer's conversion errors -> what the value is not.
_NOT_A = {"integer": "an integer", "number": "a number", "float": "a number"}


def _option_name(param: Any) -> str:
    longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return longs[0] if longs else str(getattr(param, "name", "value")).upper()


def _given_value(argv: list[str], opts: list[str]) -> str | None:
    """The value typed after one of `opts` (`--opt value` or `--opt=value`), if any."""
    for i, arg in enumerate(argv):
        for opt in opts:
            if arg == opt and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1 :]
    return None


def usage_message(exc: Any, argv: list[str]) -> str:
    """One line for a usage error: `--epochs: 'abc' is not an integer (see emcaps train --help)`."""
    param = getattr(exc, "param", None)
    hint = getattr(exc, "param_hint", None)
    if isinstance(exc, click_exceptions.MissingParameter):
        text = exc.format_message()
    elif param is not None and isinstance(exc, click_exceptions.BadParameter):
        value = _given_value(argv, list(param.opts))
        kind = next((v for k, v in _NOT_A.items() if f"valid {k}" in exc.message), None)
        reason = f"{value!r} is not {kind}" if kind and value is not None else exc.message
        text = f"{_option_name(param)}: {reason}"
    elif isinstance(hint, str):
        text = f"{hint}: {exc.message}"
    else:
        text = exc.format_message()
    text = " ".join(text.split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return text + (f" (see `{ctx.command_path} --help`)" if ctx is not None else "")


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def json_option(help: str = "Print the result as JSON on stdout.") -> Any:
    """`--json`, the one flag every command uses for machine-readable output (`json_out`)."""
    return typer.Option(False, "--json", help=help)


def data_option() -> Any:
    return typer.Option(Path(DEFAULT_DATA), "--data", help="HDF5 cache from `emcaps prepare`.")


def device_option() -> Any:
    return typer.Option("auto", "--device", help="auto | cpu | cuda[:N].")


# ---------------------------------------------------------------------------------------
# Progress


class _StatusColumn(ProgressColumn):
    """A task's `status` field (loss, speed), empty for tasks that have none."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")))


def progress_display() -> Progress:
    """The one progress display of every command: description, bar, done/total, status, time
    remaining; on stderr, removed when it stops."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _StatusColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class Bar:
    """One bar of a progress display: `advance(k)` after k more units, `restart(total, text)`
    for the next stage of the work."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, k: int) -> None:
        self._progress.advance(self._task, k)

    def restart(self, total: int | None, description: str | None = None) -> None:
        self._progress.reset(self._task, total=total, description=description)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A transient progress bar on stderr for the duration of the block."""
    with progress_display() as progress:
        yield Bar(progress, progress.add_task(description, total=total))


KERNELS_HELP = (
    "Routing kernels: auto (Triton kernels on CUDA; on the CPU the C kernels, built once with "
    "the system C compiler for -march=$EMCAPS_KERNEL_ARCH, default native; PyTorch ops with a "
    "warning when either is unavailable), triton "
    "(Triton kernels or an error), c (C kernels on the CPU or an error), torch (PyTorch ops "
    "only). Default: $EMCAPS_KERNELS, else auto."
)


def kernels_option() -> Any:
    return typer.Option(None, "--kernels", help=KERNELS_HELP, show_default=False)


def use_kernels(choice: Kernels | str | None) -> None:
    """Apply --kernels (or check $EMCAPS_KERNELS): a bad value is a one-line error."""
    from emcaps_cli.routing.backend import KernelsUnavailable, backend, set_backend
    from emcaps_cli.routing.c import ffi

    try:
        if choice is not None:
            set_backend(choice.value if isinstance(choice, Kernels) else choice)
        if backend() == "c":
            ffi.library()  # build now: a failure is an error before any work starts
        if backend() == "triton":
            _import_triton()
    except KernelsUnavailable as exc:
        raise EmcapsError(f"--kernels {backend()}: {exc}") from None
    except ValueError as exc:  # a value (or $EMCAPS_KERNELS) that names no backend
        raise typer.BadParameter(str(exc), param_hint="--kernels") from None


def _import_triton() -> None:
    """Load the Triton kernels now (--kernels triton): a missing Triton or GPU, or a GPU Triton
    cannot compile for, is an error up front, not at the first routing call."""
    import torch

    from emcaps_cli.routing.backend import KernelsUnavailable
    from emcaps_cli.routing.triton_backend import gpu_unsupported, interpreting

    if torch.cuda.is_available():
        reason = gpu_unsupported(torch.device("cuda", torch.cuda.current_device()))
        if reason is not None:
            raise KernelsUnavailable(reason)
        return
    if not interpreting():
        raise KernelsUnavailable("the Triton kernels need a CUDA GPU, and none is here")
    try:
        from emcaps_cli.routing import triton_kernels  # noqa: F401
    except ImportError as err:
        raise KernelsUnavailable(f"Triton is not importable ({err})") from None

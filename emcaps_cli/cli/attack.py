"""`emcaps attack CKPT [CKPT ...]`: FGSM / BIM robustness curves of section 6 (Fig. 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from emcaps_cli.cli._common import (
    console,
    data_option,
    device_option,
    friendly_errors,
    json_option,
    kernels_option,
    print_json,
    progress_bar,
    use_kernels,
)
from emcaps_cli.defaults import (
    DEFAULT_EPS,
    DEFAULT_STEPS,
    DEFAULT_TARGETED_EPS,
    EVAL_BATCH_SIZE,
    STEP_SIZE_FACTOR,
    AttackMethod,
    Kernels,
    Loss,
)
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import check_output_file


def _eps_text(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


CHECKPOINTS = typer.Argument(
    ...,
    metavar="CKPT",
    help="Checkpoints (or run directories: best.pt) to attack; several are overlaid in "
    "--plot (e.g. capsules and CNN).",
)
TARGETED = typer.Option(
    False,
    "--targeted",
    help="Push every image towards each of the 5 classes in turn and report the success "
    "rate averaged over the targets (with and without targets equal to the true class).",
)
EPS = typer.Option(
    None,
    "--eps",
    help="Comma-separated ε values in standardised-image units (the perturbation is added "
    "to the per-image standardised 32x32 centre crop; no clipping). Default "
    f"{_eps_text(DEFAULT_EPS)} (untargeted), {_eps_text(DEFAULT_TARGETED_EPS)} (targeted).",
)
STEP_SIZE = typer.Option(
    None,
    "--step-size",
    help=f"BIM step size α (standardised units). Default {STEP_SIZE_FACTOR} ε / steps.",
)
SOURCE = typer.Option(
    None,
    "--source",
    help="Black-box transfer: make the examples with this checkpoint's gradients and "
    "evaluate them on CKPT(s).",
)
LOSS = typer.Option(
    None,
    "--loss",
    help="Loss whose gradient makes the examples. Default: the training loss of the model "
    "whose gradients are used.",
    show_default=False,
)
LIMIT = typer.Option(
    None,
    "--limit",
    help="Attack N evenly spaced test images (the same ones `evaluate --limit N` uses).",
)
JSON_HELP = "Print JSON on stdout: a list with one object per checkpoint (docs/attacks.md)."


def print_report(results: list[dict[str, Any]]) -> None:
    """One table: ε down, one column per checkpoint, plus the gradient diagnostics."""
    from emcaps_cli.plots import short_name

    first = results[0]
    key = "success_rate" if first["targeted"] else "accuracy"
    table = Table(title=f"{first['method'].upper()} {key.replace('_', ' ')} ({first['n']} images)")
    table.add_column("ε", justify="right")
    for result in results:
        table.add_column(f"{result['model']}\n{short_name(result['checkpoint'])}", justify="right")
    for i, eps in enumerate(first["eps"]):
        row = [f"{eps:g}"]
        for result in results:
            cell = f"{100 * result[key][i]:.1f}%"
            if first["targeted"]:
                cell += f" ({100 * result['success_rate_excluding_true_class'][i]:.1f}%)"
            row.append(cell)
        table.add_row(*row)
    console.print(table)
    if first["targeted"]:
        console.print("in parentheses: success rate over targets other than the true class")
    if first["source"] is not None:
        source = first["source"]
        console.print(
            f"transfer: examples made with the gradients of {source['checkpoint']} "
            f"({source['model']}, {source['loss']} loss)"
        )
    for result in results:
        grad = result["gradient"]
        console.print(
            f"{result['checkpoint']}: input gradient on clean images: "
            f"{100 * grad['zero_fraction']:.2f}% exact zeros, mean |∂L/∂x| {grad['mean_abs']:.3g}"
        )


def _check_plot(plot: Path | None) -> None:
    """Refuse a --plot that could not be written, before any work."""
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise EmcapsError(f"--plot {plot}: expected a .png file name")
    check_output_file(plot, "--plot")


def _write_plot(results: list[dict[str, Any]], plot: Path) -> None:
    from emcaps_cli.plots import plot_attack_curves

    try:
        plot_attack_curves(results, plot)
    except OSError as exc:
        raise EmcapsError(f"--plot {plot}: could not write it ({exc.strerror})") from None
    console.print(f"wrote {plot}")


@friendly_errors
def attack(
    checkpoints: list[Path] = CHECKPOINTS,
    method: AttackMethod = typer.Option(AttackMethod.fgsm, "--method", help="fgsm or bim."),
    targeted: bool = TARGETED,
    eps: str | None = EPS,
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="BIM iterations."),
    step_size: float | None = STEP_SIZE,
    source: Path | None = SOURCE,
    loss: Loss | None = LOSS,
    json_out: bool = json_option(JSON_HELP),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of the curves."),
    limit: int | None = LIMIT,
    data: Path = data_option(),
    batch_size: int = typer.Option(EVAL_BATCH_SIZE, "--batch-size", help="Images per batch."),
    device: str = device_option(),
    kernels: Kernels | None = kernels_option(),
) -> None:
    """Accuracy (or targeted success rate) of CKPT(s) on FGSM or BIM adversarial test images,
    for each ε, with the section 6 gradient diagnostics (share of exactly-zero input-gradient
    entries, mean |gradient|). ε is in units of the standardised image and nothing is clipped."""
    from emcaps_cli.attacks.protocol import (
        AttackSettings,
        attack_checkpoints,
        parse_eps,
        work_units,
    )
    from emcaps_cli.evaluation import load_test_images
    from emcaps_cli.utils.device import resolve_device

    use_kernels(kernels)
    _check_plot(plot)
    default_eps = DEFAULT_TARGETED_EPS if targeted else DEFAULT_EPS
    eps_values = default_eps if eps is None else parse_eps(eps)
    settings = AttackSettings(method.value, targeted, eps_values, steps, step_size)
    torch_device = resolve_device(device)
    test = load_test_images(data, limit)
    runs = 1 if source is not None else len(checkpoints)
    with progress_bar(f"{method} attack", work_units(len(test), settings, runs)) as bar:
        results = attack_checkpoints(
            [str(c) for c in checkpoints],
            test,
            settings,
            source=None if source is None else str(source),
            loss_name=None if loss is None else loss.value,
            batch_size=batch_size,
            device=torch_device,
            progress=bar.advance,
        )
    if json_out:
        print_json(results)
    else:
        print_report(results)
    if plot is not None:
        _write_plot(results, plot)

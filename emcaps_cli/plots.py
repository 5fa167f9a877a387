"""Figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state): learning
curves and capsule-health diagnostics of a training run, and the attack curves of Fig. 3."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from emcaps_cli.utils.atomic import atomic_path


def _new_figure(**kwargs: Any) -> Figure:
    """A Figure on its own Agg canvas."""
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write `figure` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


# ---------------------------------------------------------------------------------------
# Learning curves

# metrics.jsonl key -> legend label, for the error panel.
ERROR_CURVES = (
    ("train_error", "train (augmented)"),
    ("validation_error", "validation"),
    ("test_error", "test"),
    ("test_familiar_error", "test, familiar views"),
    ("test_novel_error", "test, novel views"),
)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Training loss and error rates (%) per epoch, from metrics.jsonl rows, to a PNG (atomic)."""
    figure = _new_figure(figsize=(10, 4), layout="constrained")
    loss_ax, error_ax = figure.subplots(1, 2)
    epochs = [m["epoch"] for m in history]

    loss_ax.plot(epochs, [m["train_loss"] for m in history], marker="o", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("training loss")
    loss_ax.grid(alpha=0.3)

    for key, label in ERROR_CURVES:
        points = [(m["epoch"], 100 * m[key]) for m in history if m.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            error_ax.plot(xs, ys, marker="o", label=label)
    error_ax.set_xlabel("epoch")
    error_ax.set_ylabel("error (%)")
    error_ax.set_title("error rates")
    error_ax.grid(alpha=0.3)
    error_ax.legend(fontsize="small")
    if len(epochs) == 1:
        for ax in (loss_ax, error_ax):
            ax.set_xticks(epochs)
    _save(figure, path)


# ---------------------------------------------------------------------------------------
# Capsule-health diagnostics

# Capsule-health diagnostics (metrics.jsonl rows' "diagnostics"), input to output of the network.
DIAGNOSTIC_LAYERS = ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps")
INFORMATIVE_ACTIVATION_STD = 0.1  # activations that vary less than this barely tell images apart


def _diagnostic_series(
    rows: Sequence[dict[str, Any]], layer: str, key: str
) -> tuple[list[float], list[float]]:
    """(epochs, values) of diagnostics[layer][key] over the rows that record it."""
    points = [
        (row["epoch"], float(row["diagnostics"][layer][key]))
        for row in rows
        if row["diagnostics"].get(layer, {}).get(key) is not None
    ]
    xs, ys = zip(*points, strict=True) if points else ((), ())
    return list(xs), list(ys)


def _layer_colours(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One colour per layer, the same in every panel: the known layers first, in network order."""
    seen = {layer for row in rows for layer in row["diagnostics"]}
    extra = sorted(seen - set(DIAGNOSTIC_LAYERS))
    layers = [layer for layer in DIAGNOSTIC_LAYERS if layer in seen] + extra
    return {layer: f"C{i % 10}" for i, layer in enumerate(layers)}


def _plot_key(ax, rows, colours, key: str, positive_only: bool = False, **style) -> None:
    """One line per layer that records diagnostics[layer][key]."""
    style = {"marker": "o", **style}
    for layer, colour in colours.items():
        xs, ys = _diagnostic_series(rows, layer, key)
        if positive_only:  # a log axis cannot show zeros
            xs, ys = [x for x, y in zip(xs, ys, strict=True) if y > 0], [y for y in ys if y > 0]
        if xs:
            ax.plot(xs, ys, color=colour, **style)


def _plot_activations(ax, rows, colours) -> None:
    """Mean activation per layer, with a band of ± its std across capsules."""
    for layer, colour in colours.items():
        xs, means = _diagnostic_series(rows, layer, "activation_mean")
        if not xs:
            continue
        ax.plot(xs, means, marker="o", color=colour)
        band_xs, stds = _diagnostic_series(rows, layer, "activation_std")
        if band_xs == xs:
            lower = [m - s for m, s in zip(means, stds, strict=True)]
            upper = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lower, upper, color=colour, alpha=0.2, linewidth=0)
    ax.set_title("activation mean ± std")
    ax.set_ylabel("activation a")


def _plot_activation_spread(ax, rows, colours) -> None:
    """Std of activations across capsules: near 0 means every capsule says the same thing."""
    _plot_key(ax, rows, colours, "activation_std")
    ax.axhline(
        INFORMATIVE_ACTIVATION_STD,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"informative ≥ {INFORMATIVE_ACTIVATION_STD}",
    )
    ax.legend(fontsize="small")
    ax.set_title("activation std across capsules")
    ax.set_ylabel("std of a")


def _plot_assignments(ax, rows, colours) -> None:
    """Routing layers' mean largest assignment R (solid) and normalised entropy (dashed).

    Both lie in [0, 1]: R = 1 and entropy 0 is a child sent wholly to one parent.
    """
    _plot_key(ax, rows, colours, "max_assignment")
    _plot_key(ax, rows, colours, "assignment_entropy", linestyle="--", marker="s")
    ax.plot([], [], color="black", marker="o", label="mean largest R")
    ax.plot([], [], color="black", marker="s", linestyle="--", label="normalised entropy")
    ax.legend(fontsize="small")
    ax.set_title("routing assignments R")
    ax.set_ylabel("R  /  normalised entropy")


def plot_diagnostics(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Capsule-health diagnostics per epoch, from metrics.jsonl rows, to a PNG (atomic).

    Each row may hold "diagnostics": {layer: {activation_mean, activation_std, max_assignment,
    assignment_entropy, log_sigma, logit_std, grad_norm}}, any key missing; rows without it are
    skipped. Panels (2×3): activation mean ± std; activation std across capsules; largest
    assignment R and normalised assignment entropy (routing layers); mean log σ; activation-logit
    std; gradient norm (log axis). Raises ValueError when no row has diagnostics.
    """
    rows = [row for row in history if row.get("diagnostics")]
    if not rows:
        raise ValueError("no diagnostics to plot")
    colours = _layer_colours(rows)
    figure = _new_figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, 3)  # array of Axes, (2, 3)

    _plot_activations(axes[0, 0], rows, colours)
    _plot_activation_spread(axes[0, 1], rows, colours)
    _plot_assignments(axes[0, 2], rows, colours)
    _plot_key(axes[1, 0], rows, colours, "log_sigma")
    axes[1, 0].set_title("mean log σ (pose spread)")
    axes[1, 0].set_ylabel("log σ")
    _plot_key(axes[1, 1], rows, colours, "logit_std")
    axes[1, 1].set_title("activation-logit std")
    axes[1, 1].set_ylabel("std of logit")
    _plot_key(axes[1, 2], rows, colours, "grad_norm", positive_only=True)
    axes[1, 2].set_yscale("log")
    axes[1, 2].set_title("gradient norm")
    axes[1, 2].set_ylabel("‖∇‖ (log)")

    epochs = sorted({row["epoch"] for row in rows})
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(epochs) == 1:
            ax.set_xticks(epochs)
    handles = [Line2D([], [], color=colour, marker="o") for colour in colours.values()]
    figure.legend(handles, list(colours), loc="outside right center", title="layer")
    _save(figure, path)


# ---------------------------------------------------------------------------------------
# Attack curves (Fig. 3): accuracy (untargeted) or success rate (targeted) against ε

MODEL_LABELS = {"capsnet": "Capsules", "cnn": "CNN"}


def short_name(path: str) -> str:
    """`runs/cnn/best.pt` -> `cnn/best.pt`: run directory and file, enough to tell runs apart."""
    return "/".join(Path(path).parts[-2:])


def curve_label(result: dict[str, Any]) -> str:
    """Legend text: model kind and checkpoint, plus the source model for transfer."""
    kind = MODEL_LABELS.get(result["model"], result["model"])
    label = f"{kind} ({short_name(result['checkpoint'])})"
    if result.get("source"):
        label += f", examples from {short_name(result['source']['checkpoint'])}"
    return label


def plot_attack_curves(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Every attack result's curve against ε, one line per checkpoint, to a PNG (atomic).
    Returns the path."""
    first = results[0]
    targeted = first["targeted"]
    key = "success_rate" if targeted else "accuracy"
    figure = _new_figure(figsize=(5.5, 4.0), layout="tight")
    ax = figure.subplots()
    for result in results:
        label = curve_label(result)
        (line,) = ax.plot(result["eps"], result[key], marker="o", markersize=3, label=label)
        if targeted:
            ax.plot(
                result["eps"],
                result["success_rate_excluding_true_class"],
                linestyle="--",
                color=line.get_color(),
                label=f"{label}, targets ≠ true class",
            )
    if not targeted:
        ax.axhline(0.2, color="grey", linestyle=":", linewidth=1, label="chance (20%)")
    kind = "targeted" if targeted else "untargeted"
    ax.set_title(f"{first['method'].upper()} {kind} attack, {first['n']} test images")
    ax.set_xlabel("ε (standardised-image units)")
    ax.set_ylabel("success rate" if targeted else "accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, path, dpi=120)
    return Path(path)

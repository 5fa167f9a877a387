"""Figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emcaps_cli.atomic import atomic_path

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
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
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

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)

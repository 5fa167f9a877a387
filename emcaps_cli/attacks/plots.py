"""Fig. 3 style plots of attack results: accuracy (untargeted) or success rate (targeted)
against ε, one line per checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emcaps_cli.utils.atomic import atomic_path

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
    """Write a PNG of every result's curve against ε (atomically). Returns the path."""
    # Imported here: every `emcaps` command imports this module, few of them plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    targeted = first["targeted"]
    key = "success_rate" if targeted else "accuracy"
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
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
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

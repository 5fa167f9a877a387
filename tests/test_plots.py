"""Figures from metrics.jsonl rows: learning curves and capsule-health diagnostics."""

from __future__ import annotations

from pathlib import Path

import pytest

from emcaps_cli.plots import plot_diagnostics, plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def routing_layer(scale: float) -> dict[str, float]:
    return {
        "activation_mean": 0.5 * scale,
        "activation_std": 0.08 * scale,
        "max_assignment": 0.3 + 0.1 * scale,
        "assignment_entropy": 0.9 - 0.1 * scale,
        "log_sigma": -1.0 * scale,
        "logit_std": 0.4 * scale,
        "grad_norm": 1e-3 * scale,
    }


def metrics_row(epoch: int, diagnostics: dict | None) -> dict:
    row = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_error": 0.5, "test_error": 0.6}
    if diagnostics is not None:
        row["diagnostics"] = diagnostics
    return row


def test_diagnostics_plot_from_two_rows(tmp_path: Path) -> None:
    history = [
        metrics_row(1, {"conv1": {"grad_norm": 0.5}, "conv_caps1": routing_layer(1.0)}),
        metrics_row(2, None),  # rows without diagnostics are skipped
        metrics_row(
            3,
            {
                "conv1": {"grad_norm": 0.4},
                "primary_caps": {"activation_mean": 0.5, "activation_std": 0.2, "grad_norm": 0.0},
                "conv_caps1": routing_layer(2.0),
                "conv_caps2": {"activation_mean": 0.3},  # keys may be missing
                "class_caps": routing_layer(0.5),
            },
        ),
    ]
    path = tmp_path / "figs" / "diagnostics.png"
    plot_diagnostics(history, path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["diagnostics.png"]  # no temp file left


def test_diagnostics_plot_without_diagnostics_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "diagnostics.png"
    with pytest.raises(ValueError, match="no diagnostics to plot"):
        plot_diagnostics([metrics_row(1, None), metrics_row(2, {})], path)
    assert not path.exists()


def test_learning_curves_plot(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_learning_curves([metrics_row(1, None), metrics_row(2, None)], path)
    assert path.read_bytes().startswith(PNG_MAGIC)

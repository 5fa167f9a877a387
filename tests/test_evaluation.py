"""Evaluation: error breakdowns, multi-crop averaging, --limit, and refusing bad files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers_eval import shared_files, write_malicious_checkpoint

from emcaps_cli.checkpoint import load_model
from emcaps_cli.config import ModelConfig
from emcaps_cli.data.transforms import eval_batch, multicrop_offsets
from emcaps_cli.errors import EmcapsError
from emcaps_cli.evaluation import (
    checkpoint_split,
    evaluate_model,
    load_test_images,
    predict_scores,
    summarize,
)
from emcaps_cli.models import build_model


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return shared_files()


def test_summarize_counts_by_class_viewpoint_and_confusion() -> None:
    labels = np.array([0, 0, 1, 2, 3, 4])
    preds = np.array([0, 1, 1, 2, 4, 4])
    # (instance, elevation, azimuth, lighting): azimuth codes 0 and 12 (0° and 120°)
    info = np.array(
        [[0, 0, 0, 0], [0, 8, 12, 0], [0, 0, 0, 0], [0, 3, 12, 0], [0, 8, 0, 0], [0, 0, 12, 0]]
    )
    result = summarize(preds, labels, info, split="azimuth")
    assert result["n"] == 6 and result["errors"] == 2
    assert result["error_rate"] == pytest.approx(2 / 6)
    assert [c["error_rate"] for c in result["per_class"]] == [0.5, 0.0, 0.0, 1.0, 0.0]
    assert result["confusion"][0] == [1, 1, 0, 0, 0]
    assert result["confusion"][3] == [0, 0, 0, 0, 1]
    assert np.sum(result["confusion"]) == 6
    assert [(a["azimuth"], a["n"], a["errors"]) for a in result["by_azimuth"]] == [
        (0, 3, 1),
        (120, 3, 1),
    ]
    assert [(e["elevation"], e["n"]) for e in result["by_elevation"]] == [(30, 3), (45, 1), (70, 2)]
    # azimuth code 0 is a training viewpoint of the azimuth split, 120° is novel
    assert result["familiar"] == {"n": 3, "errors": 1, "error_rate": 1 / 3, "accuracy": 2 / 3}
    assert result["novel"]["n"] == 3 and result["novel"]["errors"] == 1
    assert "familiar" not in summarize(preds, labels, info)


def test_elevation_split_familiar_is_the_three_lowest_elevations() -> None:
    info = np.array([[0, e, 0, 0] for e in range(9)])
    result = summarize(np.zeros(9, dtype=int), np.zeros(9, dtype=int), info, split="elevation")
    assert result["familiar"]["n"] == 3 and result["novel"]["n"] == 6


def test_checkpoint_without_split_counts_as_full() -> None:
    assert checkpoint_split({}) == "full"
    assert checkpoint_split({"split": "elevation"}) == "elevation"


def test_multicrop_averages_softmax_over_the_five_crops(files: dict[str, Path]) -> None:
    model, _ = load_model(files["cnn"])
    data = load_test_images(files["cache"], limit=7)
    images = torch.from_numpy(data.images)
    with torch.no_grad():
        expected = torch.stack(
            [model(eval_batch(images, 2, offset=o)).softmax(1) for o in multicrop_offsets()]
        ).mean(0)
        centre = model(eval_batch(images, 2))
    torch.testing.assert_close(predict_scores(model, data.images, 3, multicrop=True), expected)
    torch.testing.assert_close(predict_scores(model, data.images, 3), centre)
    assert evaluate_model(model, data, multicrop=True)["crops"] == 5


def test_evaluation_crops_to_the_networks_input_size(files: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="cnn", input_size=40)).eval()
    data = load_test_images(files["cache"], limit=4)
    images = torch.from_numpy(data.images)
    with torch.no_grad():
        centre = model(eval_batch(images, 2, size=40))  # (4, 5)
    torch.testing.assert_close(predict_scores(model, data.images, 3), centre)
    assert evaluate_model(model, data, multicrop=True)["crops"] == len(multicrop_offsets(48, 40))


def test_trained_model_beats_chance_and_limit_takes_evenly_spaced_images(
    files: dict[str, Path],
) -> None:
    model, _ = load_model(files["cnn"])
    full = load_test_images(files["cache"])
    first = load_test_images(files["cache"], limit=10)
    assert len(full) == 30 and len(first) == 10
    rows = [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]  # round(linspace(0, 29, 10))
    assert np.array_equal(first.images, full.images[rows])
    assert np.array_equal(first.labels, full.labels[rows])
    seen = []
    result = evaluate_model(model, full, batch_size=7, progress=seen.append)
    assert seen == [7, 7, 7, 7, 2]
    assert result["accuracy"] > 0.5
    assert result["n"] == 30 and not result["multicrop"]


def test_bad_cache_and_limit_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="no such cache"):
        load_test_images(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(EmcapsError, match="junk.h5"):
        load_test_images(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(EmcapsError, match="foreign.h5"):
        load_test_images(tmp_path / "foreign.h5")
    with pytest.raises(EmcapsError, match="--limit"):
        load_test_images(tmp_path / "missing.h5", limit=0)


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(EmcapsError) as info:
        load_model(path)
    assert not marker.exists()
    assert "\n" not in str(info.value) and "evil.pt" in str(info.value)

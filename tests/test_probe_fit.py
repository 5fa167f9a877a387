"""benchmarks/probe_fit.py: a trained network's error on its own training images, its
validation images and the test set, and the test error as the crop moves from the centre."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_benchmark
from helpers_eval import make_checkpoint, write_cache

from emcaps_cli.checkpoint import load_model
from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.data.cache import load_cache
from emcaps_cli.evaluation import load_test_images, predict_scores
from emcaps_cli.training.data import config_split
from emcaps_cli.training.loop import train


def test_crops_cover_the_centre_the_multicrop_offsets_and_the_corners():
    probe = load_benchmark("probe_fit")
    offsets = probe.crop_offsets(48, 32)
    assert offsets["centre"] == (8, 8)
    assert len(set(offsets.values())) == 9
    assert {offsets[k] for k in offsets if k.startswith("corner")} == {
        (0, 0), (0, 16), (16, 0), (16, 16)
    }  # fmt: skip
    assert all(0 <= top <= 16 and 0 <= left <= 16 for top, left in offsets.values())


def test_probe_splits_the_run_as_it_trained_and_matches_evaluate(tiny_cache, tmp_path,
                                                                 single_thread):  # fmt: skip
    run = tmp_path / "run"
    config = TrainConfig(data=str(tiny_cache), out=str(run), model=ModelConfig(model="cnn"),
                         epochs=1, batch_size=20, lr=3e-3, device="cpu",
                         validation_fraction=0.25)  # fmt: skip
    train(config)
    out = tmp_path / "fit.json"
    probe = load_benchmark("probe_fit")
    ckpt = str(run / "last.pt")
    assert probe.main(["--data", str(tiny_cache), "--checkpoints", ckpt, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert set(row["centre_error"]) == {"train", "validation", "test"}
    assert len(row["test_error_by_crop"]) == 9
    assert row["test_error_by_crop"]["centre"] == row["centre_error"]["test"]

    # The test error at the centre is the one `evaluate` reports.
    model, _ = load_model(ckpt)
    split = load_test_images(tiny_cache)
    own = (predict_scores(model, split.images).argmax(1).numpy() != split.labels).mean()
    assert row["centre_error"]["test"] == pytest.approx(float(own))

    # The training error is counted on the run's own training rows, not on its validation rows.
    cache = load_cache(tiny_cache)
    rows = config_split(config, cache)
    predicted = predict_scores(model, cache.train.images[rows.train]).argmax(1).numpy()
    expected = float(np.mean(predicted != cache.train.labels[rows.train]))
    assert row["centre_error"]["train"] == pytest.approx(expected)


def test_probe_refuses_a_checkpoint_without_its_training_config(tmp_path, capsys):
    cache = write_cache(tmp_path / "fake.h5", n_test=8)
    ckpt = make_checkpoint(tmp_path / "bare.pt", model="cnn")
    assert load_benchmark("probe_fit").main(["--data", str(cache), "--checkpoints", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}: ") and "train" in err[0]

"""benchmarks/probe_class_iters.py: a trained network re-evaluated with other class-layer
iteration counts."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark
from helpers_eval import make_checkpoint, write_cache

from emcaps_cli.checkpoint import load_model
from emcaps_cli.evaluation import load_test_images, predict_scores


def test_probe_changes_only_the_class_layer_iterations(tmp_path, single_thread):
    cache = write_cache(tmp_path / "fake.h5", n_test=24)
    ckpt = make_checkpoint(
        tmp_path / "caps.pt", model="capsnet", train_steps=3, arch=(8, 4, 4, 4), iters=2
    )
    out = tmp_path / "probe.json"
    probe = load_benchmark("probe_class_iters")
    assert probe.main(["--data", str(cache), "--checkpoints", str(ckpt), "--iters", "1,2,3",
                       "--json", str(out)]) == 0  # fmt: skip
    (row,) = json.loads(out.read_text())["runs"]
    assert row["trained_iters"] == 2
    assert set(row["test_error"]) == {"1", "2", "3"}
    assert all(0 <= e <= 1 for e in row["test_error"].values())

    # The trained count's error is the checkpoint's own error, as `evaluate` would give it.
    model, _ = load_model(ckpt)
    split = load_test_images(cache)
    own = (predict_scores(model, split.images).argmax(1).numpy() != split.labels).mean()
    assert row["test_error"]["2"] == pytest.approx(float(own))


def test_probe_refuses_zero_iterations(tmp_path):
    with pytest.raises(SystemExit):
        load_benchmark("probe_class_iters").main(
            ["--checkpoints", str(tmp_path / "x.pt"), "--iters", "0,1"]
        )


def test_probe_refuses_a_cnn_in_one_line(tmp_path, capsys):
    cache = write_cache(tmp_path / "fake.h5", n_test=8)
    ckpt = make_checkpoint(tmp_path / "cnn.pt", model="cnn")
    assert (
        load_benchmark("probe_class_iters").main(["--data", str(cache), "--checkpoints", str(ckpt)])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}: ") and "class-capsule" in err[0]

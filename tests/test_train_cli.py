"""`emcaps train` through the command line (CliRunner), on tiny data with the baseline CNN."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_error_line, make_cache, run_emcaps
from typer.testing import CliRunner

from emcaps_cli.cli import app

runner = CliRunner()

QUICK = ["--model", "cnn", "--device", "cpu", "--batch-size", "10", "--limit-test", "10"]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_help_explains_units_and_defaults() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # the help is wrapped to the terminal
    for phrase in ("--stop-at-error", "0.037 means 3.7%", "half of --epochs", "[default: 16]"):
        assert phrase in text


def test_bad_data_path_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5"
    result = runner.invoke(app, ["train", "--data", str(missing), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_train_writes_the_run_and_resume_extends_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=20)
    run = tmp_path / "run"
    args = ["train", "--data", str(cache), "--out", str(run), *QUICK, "--limit-train", "30"]
    first = runner.invoke(app, [*args, "--epochs", "1", "--json"])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["epochs_completed"] == 1 and result["run_dir"] == str(run)
    assert "epoch 1" in first.stderr  # the one-line summary; no bars off a terminal
    assert "margin" not in first.stderr  # cross-entropy has none
    config = json.loads((run / "config.json").read_text())
    assert config["train_config"]["loss"] == "cross-entropy"
    assert config["images"] == {"train": 27, "validation": 3, "test": 10, "test_familiar": 10}

    changed = runner.invoke(app, ["train", "--out", str(run), "--resume", "--lr", "0.1"])
    assert changed.exit_code == 2 and "--lr" in changed.output

    resumed = runner.invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_split_azimuth_prints_familiar_and_novel(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=60, n_test=30)
    run = tmp_path / "run"
    out = runner.invoke(
        app,
        ["train", "--data", str(cache), "--out", str(run), *QUICK, "--split", "azimuth"]
        + ["--epochs", "1", "--limit-test", "30"],
    )
    assert out.exit_code == 0, out.output
    assert "familiar" in out.stderr and "novel" in out.stderr


def test_amp_on_cpu_is_refused_clearly(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=10, n_test=10)
    out = runner.invoke(
        app, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *QUICK, "--amp"]
    )
    assert out.exit_code == 2 and "--amp" in out.output and "CUDA" in out.output


@pytest.mark.slow
def test_resume_is_the_same_command_plus_resume(tmp_path: Path) -> None:
    make_cache(tmp_path / "c.h5", n_train=40, n_test=20)
    start = ["train", "--data", "c.h5", "--out", "run", *QUICK, "--limit-train", "30"]
    start += ["--loss", "spread", "--arch", "8,8,8,8", "--seed", "0", "--lr", "0.003"]
    first = run_emcaps(*start, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.search(r"loss \d+\.\d+  \(margin 0\.\d\d\)", first.stderr)  # the spread margin
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]
    assert stored["data"] == str(tmp_path / "c.h5")  # absolute

    same = run_emcaps(*start, "--epochs", "2", "--resume", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    changed = [*start[:-1], "0.1", "--arch", "8,8,8,16", "--epochs", "3", "--resume"]
    line = assert_error_line(run_emcaps(*changed, cwd=tmp_path))
    assert "--lr: run has 0.003, you gave 0.1" in line
    assert "--arch: run has 8,8,8,8, you gave 8,8,8,16" in line

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = run_emcaps("train", "--out", "../run", "--resume", "--epochs", "3", cwd=elsewhere)
    assert moved.returncode == 0, moved.stderr
    (tmp_path / "c.h5").rename(tmp_path / "moved.h5")
    missing = run_emcaps("train", "--out", "run", "--resume", "--epochs", "4", cwd=tmp_path)
    assert_error_line(missing, "c.h5", "--data")
    found = run_emcaps(
        "train", "--out", "run", "--resume", "--epochs", "4", "--data", "moved.h5", cwd=tmp_path
    )
    assert found.returncode == 0, found.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_train_refuses_a_cache_with_a_label_out_of_range(tmp_path: Path) -> None:
    import h5py

    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    with h5py.File(cache, "a") as h5:
        h5["train/labels"][4] = 7
    out = runner.invoke(app, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *QUICK])
    assert out.exit_code == 2
    (line,) = out.stderr.strip().splitlines()
    assert (
        line == f"error: {cache}: /train/labels: label 7 at record 4 is outside 0-4 (1 bad labels)"
    )
    assert not (tmp_path / "r").exists()

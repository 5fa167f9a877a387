"""`emcaps evaluate` and `emcaps attack` through the real Typer app on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_eval import shared_files, write_malicious_checkpoint
from PIL import Image
from typer.testing import CliRunner

from emcaps_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return shared_files()


def invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_evaluate_json(files: dict[str, Path]) -> None:
    result = invoke("evaluate", files["cnn"], "--data", files["cache"], "--json", "--limit", 20)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("error_rate", "accuracy", "n", "per_class", "confusion", "by_azimuth"):
        assert key in out
    assert out["n"] == 20 and out["model"] == "cnn" and out["split"] == "full"
    assert "familiar" not in out


def test_evaluate_accepts_a_run_directory(files: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(files["cnn"], run / "best.pt")
    by_dir = invoke("evaluate", run, "--data", files["cache"], "--json", "--limit", 10)
    by_file = invoke("evaluate", files["cnn"], "--data", files["cache"], "--json", "--limit", 10)
    assert by_dir.exit_code == 0, by_dir.stderr
    assert json.loads(by_dir.stdout)["accuracy"] == json.loads(by_file.stdout)["accuracy"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("evaluate", empty, "--data", files["cache"]), "no best.pt")


def test_evaluate_split_checkpoint_reports_familiar_and_novel(files: dict[str, Path]) -> None:
    result = invoke("evaluate", files["azimuth"], "--data", files["cache"], "--json", "--multicrop")
    out = json.loads(result.stdout)
    assert out["split"] == "azimuth" and out["crops"] == 5
    assert out["familiar"]["n"] + out["novel"]["n"] == out["n"] == 30


def test_evaluate_human_tables_go_to_stderr(files: dict[str, Path]) -> None:
    result = invoke("evaluate", files["cnn"], "--data", files["cache"], "--limit", 5)
    assert result.exit_code == 0 and result.stdout == ""
    assert "Per class" in result.stderr and "azimuth" in result.stderr


def test_evaluate_refuses_bad_files(files: dict[str, Path], tmp_path: Path) -> None:
    cache = files["cache"]
    assert_one_line_error(invoke("evaluate", tmp_path / "no.pt", "--data", cache), "no.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(invoke("evaluate", tmp_path / "corrupt.pt", "--data", cache), "corrupt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert_one_line_error(invoke("evaluate", tmp_path / "foreign.pt", "--data", cache), "foreign")
    marker = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    assert_one_line_error(invoke("evaluate", evil, "--data", cache), "evil.pt")
    assert not marker.exists()
    assert_one_line_error(invoke("evaluate", files["cnn"], "--data", tmp_path / "no.h5"), "no.h5")
    (tmp_path / "bad.h5").write_bytes(b"nope")
    assert_one_line_error(invoke("evaluate", files["cnn"], "--data", tmp_path / "bad.h5"), "bad.h5")
    assert_one_line_error(
        invoke("evaluate", files["cnn"], "--data", cache, "--limit", 0), "--limit"
    )


def test_attack_eps_zero_equals_evaluate(files: dict[str, Path]) -> None:
    common = ("--data", files["cache"], "--json", "--limit", 20)
    evaluated = json.loads(invoke("evaluate", files["cnn"], *common).stdout)
    result = invoke("attack", files["cnn"], *common, "--eps", "0,0.2")
    assert result.exit_code == 0, result.stderr
    (out,) = json.loads(result.stdout)  # a list, even for one checkpoint
    assert out["method"] == "fgsm" and out["targeted"] is False and out["eps"] == [0.0, 0.2]
    assert out["accuracy"][0] == evaluated["accuracy"]
    assert 0 <= out["gradient"]["zero_fraction"] <= 1 and out["gradient"]["mean_abs"] > 0


@pytest.mark.slow
def test_attack_several_checkpoints_targeted_bim_with_plot(
    files: dict[str, Path], tmp_path: Path
) -> None:
    png = tmp_path / "fig3.png"
    result = invoke(
        "attack",
        files["cnn"],
        files["other"],
        "--method",
        "bim",
        "--targeted",
        "--eps",
        "0,0.1",
        "--steps",
        2,
        "--limit",
        5,
        "--data",
        files["cache"],
        "--json",
        "--plot",
        png,
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)  # one object per checkpoint, in the order given
    assert isinstance(out, list) and [r["checkpoint"] for r in out] == [
        str(files["cnn"]),
        str(files["other"]),
    ]
    for r in out:
        assert r["method"] == "bim" and r["targeted"] and r["steps"] == 2
        assert len(r["success_rate"]) == len(r["success_rate_excluding_true_class"]) == 2
        assert r["success_rate"][0] == pytest.approx(0.2)
    assert Image.open(png).size[0] > 100


def test_attack_transfer_from_source(files: dict[str, Path]) -> None:
    result = invoke(
        "attack",
        files["cnn"],
        "--source",
        files["other"],
        "--eps",
        "0.1",
        "--limit",
        10,
        "--data",
        files["cache"],
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    (out,) = json.loads(result.stdout)
    assert out["source"]["checkpoint"] == str(files["other"])
    assert "gradient" in out["source"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--method", "pgd"), "--method"),
        (("--eps", "0,x"), "--eps"),
        (("--eps", "-1"), "--eps"),
        (("--loss", "hinge"), "--loss"),
        (("--plot", "out.pdf"), "--plot"),
        (("--source", "missing.pt"), "missing.pt"),
    ],
)
def test_attack_bad_options_are_one_line_errors(
    files: dict[str, Path], args: tuple[str, ...], fragment: str
) -> None:
    result = invoke("attack", files["cnn"], "--data", files["cache"], "--limit", 2, *args)
    assert_one_line_error(result, fragment)


def test_attack_refuses_a_malicious_checkpoint(files: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = invoke("attack", files["cnn"], evil, "--data", files["cache"], "--limit", 2)
    assert_one_line_error(result, "evil.pt")
    assert not marker.exists()

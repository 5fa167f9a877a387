"""benchmarks/bench_learning.py: runs `emcaps train` per set × seed, tabulates, reports failures."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

from emcaps_cli.data import smallnorb
from emcaps_cli.data.cache import prepare_cache

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = ROOT / "benchmarks" / "bench_learning.py"
FIXTURES = Path(__file__).parent / "fixtures" / "smallnorb_fake"
TINY_CNN = "cnn=--model cnn --limit-train 64 --limit-test 32 --batch-size 16"


bench = load_benchmark("bench_learning")


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The genuine-format fixture files (5 + 5 images), prepared into a cache."""
    root = tmp_path_factory.mktemp("bench")
    raw = root / "raw"
    raw.mkdir()
    for split in smallnorb.SPLITS:
        for kind in smallnorb.KINDS:
            name = smallnorb.file_name(split, kind)
            shutil.copyfile(FIXTURES / name, raw / name)
    return prepare_cache(raw, root / "fake.h5")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    # One intra-op thread per training: tiny models on a shared 2-core machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *args, "--extra", "--device cpu"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_seeds_give_a_table_and_a_json_report(fake_cache: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "out" / "bench.json"
    runs = tmp_path / "runs"
    (runs / "cnn-seed0").mkdir(parents=True)
    (runs / "cnn-seed0" / "stale.txt").write_text("from an earlier run")
    args = ["--data", str(fake_cache), "--runs", str(runs), "--json", str(report_path)]
    done = run_bench(*args, "--set", TINY_CNN, "--seeds", "0,1", "--epochs", "1")
    assert done.returncode == 0, done.stderr

    report = json.loads(report_path.read_text())
    assert report["seeds"] == [0, 1] and report["epochs"] == 1
    assert report["data"] == str(fake_cache)
    assert set(report["machine"]) >= {"cpu", "nproc", "torch"}
    cnn = report["sets"]["cnn"]
    assert cnn["options"] == TINY_CNN.removeprefix("cnn=")
    assert [r["seed"] for r in cnn["runs"]] == [0, 1]
    for run in cnn["runs"]:
        assert run["ok"] and run["epochs_completed"] == 1
        assert math.isfinite(run["test_error"]) and math.isfinite(run["best_test_error"])
        assert run["images_per_second"] > 0 and run["wall_seconds"] > 0
    assert not (runs / "cnn-seed0" / "stale.txt").exists()  # the old run dir was replaced
    assert cnn["summary"]["ok"] == 2 and cnn["summary"]["failed"] == 0

    header, _, row = done.stdout.strip().splitlines()[-3:]
    assert header.split()[:3] == ["set", "seeds", "failed"] and "test err %" in header
    assert row.split()[:3] == ["cnn", "2", "0"]
    assert done.stderr.count("[1/2] cnn seed 0") == 1 and "[2/2] cnn seed 1" in done.stderr


@pytest.mark.slow
def test_a_failing_set_is_named_and_the_exit_status_is_nonzero(
    fake_cache: Path, tmp_path: Path
) -> None:
    args = ["--data", str(fake_cache), "--runs", str(tmp_path / "runs"), "--seeds", "0"]
    done = run_bench(*args, "--set", "bad=--arch 1,2", "--epochs", "1")
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].split()[:3] == ["bad", "0", "1"]
    assert "FAILED: set 'bad' seed 0 (exit 2)" in done.stderr
    assert "--arch" in done.stderr  # the stderr tail of the failed run


def test_a_missing_non_default_cache_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.h5"
    assert bench.main(["--data", str(missing), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_missing_default_cache_is_built_the_readme_way(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(
        bench.subprocess,
        "run",
        lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0),
    )
    bench.ensure_data(bench.DEFAULT_DATA)
    assert [c[len(bench.EMCAPS) :] for c in calls] == [
        ["synth", "data/synth", "--views", "40"],
        ["prepare", "data/synth", "--out", "data/smallnorb.h5"],
    ]


def test_summarise_gives_mean_and_sample_sd() -> None:
    assert bench.summarise([2.0, 4.0, 6.0]) == (4.0, 2.0)  # sd with n − 1: sqrt(8 / 2)
    assert bench.summarise([0.25, None, 0.75]) == (0.5, math.sqrt(0.125))
    assert bench.summarise([0.3]) == (0.3, None)
    assert bench.summarise([]) == (None, None)


def test_table_shows_percent_mean_sd_and_split_columns_only_when_present() -> None:
    capsnet = bench.summarise_set(
        [
            {"ok": True, "test_error": 0.25, "best_test_error": 0.5, "train_error": 0.125,
             "images_per_second": 100.0, "wall_seconds": 10.0},
            {"ok": True, "test_error": 0.5, "best_test_error": 0.5, "train_error": 0.375,
             "images_per_second": 200.0, "wall_seconds": 30.0},
            {"ok": False},
        ]
    )  # fmt: skip
    assert capsnet["test_error"] == {"mean": 0.375, "sd": math.sqrt(0.03125)}
    assert capsnet["ok"] == 2 and capsnet["failed"] == 1 and "test_novel_error" not in capsnet
    lines = bench.format_table({"capsnet": capsnet}).splitlines()
    assert lines[0].split("  ")[0].strip() == "set" and "novel %" not in lines[0]
    cells = [c for c in lines[2].split("  ") if c.strip()]
    assert [c.strip() for c in cells] == [
        "capsnet", "2", "1", "37.50 ± 17.68", "50.00 ± 0.00", "25.00 ± 17.68", "150.0", "20.0"
    ]  # fmt: skip

    split = bench.summarise_set(
        [{"ok": True, "test_error": 0.2, "train_error": 0.1, "test_familiar_error": 0.125,
          "test_novel_error": 0.5, "images_per_second": 50.0, "wall_seconds": 4.0}]
    )  # fmt: skip
    lines = bench.format_table({"capsnet": capsnet, "split": split}).splitlines()
    assert "familiar %" in lines[0] and "novel %" in lines[0]
    assert [c.strip() for c in lines[3].split("  ") if c.strip()] == [
        "split", "1", "0", "20.00 ± —", "—", "10.00 ± —", "12.50 ± —", "50.00 ± —", "50.0", "4.0"
    ]  # fmt: skip
    assert lines[2].split()[-4:-2] == ["—", "—"]  # capsnet has no familiar / novel errors


def _report(
    path: Path,
    seeds: list[int],
    options: str = "--model cnn",
    epochs: int = 10,
    data: str = "d.h5",
) -> Path:
    runs = [
        {
            "seed": s,
            "ok": True,
            "test_error": 0.1 * (s + 1),
            "train_error": 0.2,
            "images_per_second": 100.0,
            "wall_seconds": 1.0,
        }
        for s in seeds
    ]
    report = {
        "data": data,
        "epochs": epochs,
        "extra": "",
        "seeds": seeds,
        "sets": {"cnn": {"options": options, "runs": runs}},
    }
    path.write_text(json.dumps(report))
    return path


def test_combine_pools_the_seeds_of_two_reports(tmp_path: Path, capsys) -> None:
    a = _report(tmp_path / "a.json", [0, 1, 2])
    b = _report(tmp_path / "b.json", [3, 4])
    out = tmp_path / "all.json"
    assert bench.main(["--combine", str(a), str(b), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1, 2, 3, 4]
    summary = report["sets"]["cnn"]["summary"]["test_error"]
    assert math.isclose(summary["mean"], 0.3)  # errors 0.1 … 0.5
    assert math.isclose(summary["sd"], math.sqrt(0.025))
    assert "30.00 ± 15.81" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"seeds": [2, 3]}, "repeats seed(s) [2]"),
        ({"seeds": [3], "options": "--model cnn --lr 1e-3"}, "has options"),
        ({"seeds": [3], "epochs": 5}, "epochs 5 differs"),
        ({"seeds": [3], "data": "other.h5"}, "data 'other.h5' differs"),
    ],
)
def test_combine_refuses_reports_that_do_not_pool(
    tmp_path: Path, capsys, second: dict, message: str
) -> None:
    a = _report(tmp_path / "a.json", [0, 1, 2])
    b = _report(tmp_path / "b.json", **second)
    assert bench.main(["--combine", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_combine_takes_a_relative_and_an_absolute_path_of_one_cache_as_one(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    a = _report(tmp_path / "a.json", [0], data="data/d.h5")
    b = _report(tmp_path / "b.json", [1], data=str(tmp_path / "data" / "d.h5"))
    assert bench.main(["--combine", str(a), str(b)]) == 0


def test_combine_names_an_unreadable_report(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench.main(["--combine", str(bad)]) == 2
    assert "bad.json: cannot read a report" in capsys.readouterr().err

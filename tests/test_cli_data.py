"""`emcaps prepare` and `emcaps synth` through the real Typer app: exit codes, one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emcaps_cli.cli import app
from emcaps_cli.data import smallnorb
from emcaps_cli.data.cache import load_cache

FIXTURES = Path(__file__).parent / "fixtures" / "smallnorb_fake"


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    target = tmp_path / "raw"
    target.mkdir()
    for split in smallnorb.SPLITS:
        for kind in smallnorb.KINDS:
            name = smallnorb.file_name(split, kind)
            shutil.copyfile(FIXTURES / name, target / name)
    return target


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0]


def test_prepare_writes_the_cache(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "smallnorb.h5"
    result = run("prepare", raw_dir, "--out", out)
    assert result.exit_code == 0, result.output
    loaded = load_cache(out)
    assert loaded.train.images.shape == (5, 2, 48, 48)
    assert loaded.test.labels.tolist() == [1, 2, 4, 0, 3]


def test_prepare_size_option(raw_dir: Path, tmp_path: Path) -> None:
    result = run("prepare", raw_dir, "--out", tmp_path / "c.h5", "--size", "32")
    assert result.exit_code == 0, result.output
    assert load_cache(tmp_path / "c.h5").test.images.shape == (5, 2, 32, 32)


def test_prepare_names_the_bad_file(raw_dir: Path, tmp_path: Path) -> None:
    bad = raw_dir / smallnorb.file_name("train", "cat")
    smallnorb.write_matrix(bad, np.array([0, 0, 9, 1, 2], dtype=np.int32))
    result = run("prepare", raw_dir, "--out", tmp_path / "c.h5")
    assert_one_line_error(result, bad.name, "label 9 at record 2")
    assert not (tmp_path / "c.h5").exists()


def test_prepare_lists_all_missing_files(raw_dir: Path, tmp_path: Path) -> None:
    for kind in ("dat", "info"):
        (raw_dir / smallnorb.file_name("test", kind)).unlink()
    result = run("prepare", raw_dir, "--out", tmp_path / "c.h5")
    assert_one_line_error(result, "missing 2 file(s)", "testing-dat.mat", "testing-info.mat")


def test_failed_prepare_keeps_the_old_cache(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    assert run("prepare", raw_dir, "--out", out).exit_code == 0
    before = out.read_bytes()
    dat = raw_dir / smallnorb.file_name("test", "dat")
    dat.write_bytes(dat.read_bytes() + b"xx")
    result = run("prepare", raw_dir, "--out", out)
    assert_one_line_error(result, dat.name, "2 trailing bytes")
    assert out.read_bytes() == before


def test_synth_then_prepare(tmp_path: Path) -> None:
    result = run("synth", tmp_path / "raw", "--views", "1", "--seed", "3", "--gzip")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "raw").glob("*.mat.gz"))) == 6
    assert run("prepare", tmp_path / "raw", "--out", tmp_path / "c.h5").exit_code == 0
    loaded = load_cache(tmp_path / "c.h5")
    assert sorted(set(loaded.train.info[:, 0])) == [4, 6, 7, 8, 9]
    assert np.bincount(loaded.test.labels).tolist() == [5, 5, 5, 5, 5]


def test_synth_rejects_too_many_views(tmp_path: Path) -> None:
    assert_one_line_error(run("synth", tmp_path, "--views", "1000"), "--views 1000")

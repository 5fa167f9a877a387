"""The real `emcaps` command: one `error: ...` line for every bad input, fast help, Ctrl-C."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_error_line, run_emcaps
from helpers_eval import shared_files, write_cache

from emcaps_cli.cli import COMMANDS


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return shared_files()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("train", "--epochs", "abc"), "error: --epochs: 'abc' is not an integer"),
        (("train", "--lr=x"), "error: --lr: 'x' is not a number"),
        (("train", "--grad-clip", "-1"), "error: --grad-clip -1.0: expected a norm >= 0"),
        (("train", "--kernels", "foo"), "error: --kernels: "),
        (("train", "--resume"), "error: --resume needs --out RUN_DIR"),
        (("train", "--no-such-option"), "error: No such option: --no-such-option"),
        (("evaluate",), "error: Missing argument"),
        (("synth", "out", "--views", "1.5"), "error: --views: '1.5' is not an integer"),
    ],
)
def test_usage_errors_are_one_error_line(args: tuple[str, ...], expected: str) -> None:
    line = assert_error_line(run_emcaps(*args))
    assert line.startswith(expected)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_imports_neither_torch_nor_h5py(command: str) -> None:
    args = [sys.executable, "-X", "importtime", "-m", "emcaps_cli", *command.split(), "--help"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & {"torch", "h5py", "numpy", "matplotlib"}


def test_help_costs_little_more_than_importing_typer() -> None:
    def seconds(*args: str) -> float:
        """CPU seconds of the child, so that other jobs on the machine do not decide it."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, *args], capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    # Measured beside a training run: typer 0.2 s, --help 0.3 s, train --help 0.5 s, importing
    # torch alone 2.3 s. Load slows every child alike, so the bound follows typer's time.
    typer = min(seconds("-c", "import typer, rich.console") for _ in range(3))
    bound = max(0.5, 4 * typer)
    assert min(seconds("-m", "emcaps_cli", "--help") for _ in range(3)) <= bound
    assert min(seconds("-m", "emcaps_cli", "train", "--help") for _ in range(3)) <= bound


def test_boolean_flags_are_shown_as_flags() -> None:
    text = run_emcaps("train", "--help").stdout
    assert "<bool>" not in text
    json_line = next(line for line in text.splitlines() if line.strip().startswith("--json"))
    assert json_line.split()[1] == "Print"  # no value placeholder after the flag
    assert "--augment / --no-augment" in text


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(files: dict[str, Path]) -> None:
    script = (
        "import os, signal, sys\n"
        "import emcaps_cli.utils.device as device\n"
        "from emcaps_cli.cli import main\n"
        "def interrupted(name):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "device.resolve_device = interrupted\n"
        # as in a terminal: a shell's background job may have inherited SIGINT as ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"sys.argv = ['emcaps', 'evaluate', {str(files['cnn'])!r}, '--data', "
        f"{str(files['cache'])!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 130
    assert result.stderr.strip().splitlines() == ["interrupted (Ctrl-C)"]


# --- output paths are checked before any work ---------------------------------------------


def test_prepare_out_an_existing_directory_is_refused_before_work(tmp_path: Path) -> None:
    target = tmp_path / "cache.h5"
    target.mkdir()
    assert_error_line(run_emcaps("prepare", tmp_path / "no-raw", "--out", target), "is a directory")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    "command", ["prepare", "synth", pytest.param("attack", marks=pytest.mark.slow)]
)
def test_an_output_under_a_regular_file_is_refused_before_work(
    files: dict[str, Path], tmp_path: Path, command: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    args = {
        "prepare": ("prepare", tmp_path, "--out", blocker / "c.h5"),
        "synth": ("synth", blocker / "raw", "--views", 1),
        "attack": ("attack", files["cnn"], "--data", files["cache"], "--plot", blocker / "a.png"),
    }[command]
    result = run_emcaps(*args)
    assert_error_line(result, str(blocker), "is not a directory")
    assert result.stdout == ""


def test_synth_out_dir_that_is_a_file_and_zero_workers_are_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "raw"
    blocker.write_text("x")
    assert_error_line(run_emcaps("synth", blocker, "--views", 1), "OUT_DIR", "is a file")
    assert_error_line(run_emcaps("synth", tmp_path / "new", "--workers", 0), "--workers 0")
    assert not (tmp_path / "new").exists()


# --- caches and checkpoints that evaluate and attack refuse ----------------------------------


def small_images_cache(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        h5.attrs["format_version"] = 1
        h5.attrs["image_size"] = 24
        for split in ("train", "test"):
            h5[f"{split}/images"] = np.zeros((5, 2, 24, 24), np.uint8)
            h5[f"{split}/labels"] = np.arange(5, dtype=np.int64)
            h5[f"{split}/info"] = np.zeros((5, 4), np.int64)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "attack"])
def test_images_smaller_than_the_crop_are_refused(
    files: dict[str, Path], tmp_path: Path, command: str
) -> None:
    cache = small_images_cache(tmp_path / "small.h5")
    result = run_emcaps(command, files["cnn"], "--data", cache)
    assert_error_line(result, "small.h5", "24px", "32px crop")


@pytest.mark.slow
def test_evaluate_refuses_a_cache_with_a_label_out_of_range(tmp_path: Path, files) -> None:
    cache = write_cache(tmp_path / "c.h5", n_test=10, n_train=10)
    with h5py.File(cache, "a") as h5:
        h5["test/labels"][3] = 7
    result = run_emcaps("evaluate", files["cnn"], "--data", cache)
    assert_error_line(result, "c.h5: /test/labels: label 7 at record 3")


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_with_a_flipped_bit(files: dict[str, Path], tmp_path) -> None:
    from test_checkpoint import flip_bit_in_largest_record

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(files["cnn"].read_bytes())
    flip_bit_in_largest_record(damaged)
    result = run_emcaps("evaluate", damaged, "--data", files["cache"])
    assert_error_line(result, "damaged.pt", "checkpoint is damaged")
    assert result.stdout == ""


def test_a_read_only_output_location_is_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from typer.testing import CliRunner

    from emcaps_cli.cli import app

    real_access = os.access
    read_only = tmp_path / "ro"
    read_only.mkdir()

    def access(path, mode, **kw):  # what access(2) answers on a read-only file system
        if Path(path) == read_only and mode & os.W_OK:
            return False
        return real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    result = CliRunner().invoke(app, ["prepare", str(tmp_path), "--out", str(read_only / "c.h5")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --out") and "cannot write in" in line and "read-only" in line


def test_attack_prints_its_table_before_writing_the_plot(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from emcaps_cli import plots
    from emcaps_cli.cli import app

    def disk_full(results, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_attack_curves", disk_full)
    png = tmp_path / "curves.png"
    args = ["attack", files["cnn"], "--data", files["cache"], "--limit", 5, "--eps", "0,0.1"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--plot", png]])
    assert result.exit_code == 2
    assert "FGSM accuracy" in result.stderr  # the results came out first
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --plot {png}") and "No space left" in last


@pytest.mark.slow
def test_transfer_report_names_the_source_checkpoint(files: dict[str, Path]) -> None:
    args = ["--source", files["other"], "--eps", "0.1", "--limit", 5, "--data", files["cache"]]
    result = run_emcaps("attack", files["cnn"], *args)
    assert result.returncode == 0, result.stderr
    assert f"examples made with the gradients of {files['other']}" in result.stderr


def test_a_bad_kernels_variable_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from emcaps_cli.cli import app
    from emcaps_cli.routing import backend

    monkeypatch.setattr(backend, "_choice", "foo")  # as if EMCAPS_KERNELS=foo
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "none.pt")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "EMCAPS_KERNELS" in line


def test_choices_are_listed_in_help() -> None:
    text = run_emcaps("train", "--help").stdout
    for choices in ("capsnet|cnn", "spread|margin|cross-entropy", "auto|triton|c|torch"):
        assert choices in text
    assert "fgsm|bim" in run_emcaps("attack", "--help").stdout


def test_a_value_outside_the_choices_is_one_error_line() -> None:
    assert_error_line(run_emcaps("train", "--pose", "tensor"), "--pose", "'tensor'")

"""Shared test helpers. Keep additions self-contained: several test modules use this file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

# The Triton kernels' tests (test_triton_kernels.py) run in Triton's interpreter when there is
# no GPU. Triton reads TRITON_INTERPRET when it is first imported, and importing torch._dynamo
# (any module using torch.compiler.disable) imports it, so the variable is set here, before any
# test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Several tests compare two runs bit for bit (resume, kernel paths): a fixed thread count keeps
# the thread policy (emcaps_cli/utils/threads.py) from following the machine's load mid-suite. The
# CLI tests' subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- training: tiny HDF5 caches in the layout of emcaps_cli/data/cache.py --------------------


def _grating_images(labels: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (N, 2, size, size): class k is a grating at k·36° with random phase, plus noise.

    Orientation survives random crops, brightness, contrast and standardisation, so even a
    tiny network learns it in a few steps.
    """
    n = len(labels)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = labels.astype(np.float32) * np.pi / 5  # (N,)
    phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    wave = np.cos(
        0.6 * (np.cos(angle)[:, None, None] * xs + np.sin(angle)[:, None, None] * ys)
        + phase[:, None, None]
    )  # (N, size, size)
    pair = np.stack([wave, wave], axis=1)  # (N, 2, size, size)
    noisy = 128 + 60 * pair + rng.normal(0, 25, size=pair.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_cache(
    path: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0, size: int = 48
) -> Path:
    """Write a learnable cache (format_version 1) with every viewpoint represented.

    info rows cycle through instance, elevation 0..8, azimuth 0, 2, ..., 34 and lighting 0..5,
    so every --split has familiar and novel images.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        h5.attrs["format_version"] = 1
        h5.attrs["image_size"] = size
        for split, n in (("train", n_train), ("test", n_test)):
            labels = np.arange(n, dtype=np.int64) % 5
            i = np.arange(n)
            info = np.stack([i % 10, (i // 5) % 9, 2 * ((i // 3) % 18), i % 6], axis=1)
            group = h5.create_group(split)
            group.create_dataset("images", data=_grating_images(labels, rng, size))
            group.create_dataset("labels", data=labels)
            group.create_dataset("info", data=info.astype(np.int64))
    return path


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Path:
    """A 200-train / 100-test learnable cache."""
    return make_cache(tmp_path / "tiny.h5")


@pytest.fixture
def single_thread():
    """One intra-op thread: on a shared 2-core machine this is several times faster for
    tiny models than two contending threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- routing kernels: run a test on the C kernels and on the PyTorch path ---------------------


@pytest.fixture(params=["c", "torch"])
def kernels(request):
    """Routes through the C kernels ("c") or PyTorch ops only ("torch"), then restores."""
    from emcaps_cli.routing import backend as routing_backend
    from emcaps_cli.routing.c import ffi

    if request.param == "c":
        try:
            ffi.library()
        except routing_backend.KernelsUnavailable as err:  # no C compiler on this machine
            pytest.skip(str(err))
    before = routing_backend.backend()
    routing_backend.set_backend(request.param)
    yield request.param
    routing_backend.set_backend(before)


# --- the real `emcaps` command in a subprocess ------------------------------------------------


def run_emcaps(*args: object, cwd: str | Path | None = None, timeout: float = 300):
    """`python -m emcaps_cli ARGS` (the `emcaps` entry point), one thread, captured output."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "emcaps_cli", *(str(a) for a in args)]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def assert_error_line(result, *fragments: str) -> str:
    """Exit code 2, no traceback, stderr exactly one `error: ...` line holding `fragments`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]

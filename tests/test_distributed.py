"""Two CPU processes under torchrun (gloo): DDP training, reduced metrics, rank-0 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_cache

from emcaps_cli.checkpoint import load_model
from emcaps_cli.data.cache import load_split
from emcaps_cli.data.transforms import eval_batch

pytestmark = pytest.mark.slow  # two torchrun processes, a whole training run


def test_two_process_gloo_run(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=21)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "emcaps_cli",
        "train",
        "--data",
        str(cache),
        "--out",
        str(run),
        "--model",
        "cnn",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--limit-train",
        "30",
        "--split",
        "elevation",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["test_novel_error"] is not None
    saved = torch.load(run / "last.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and saved["world_size"] == 2
    assert not any(k.startswith("module.") for k in saved["model_state"])

    # The test error is reduced over both ranks' shards (11 + 10 images): recompute it here.
    model, _ = load_model(run / "last.pt")
    test = load_split(cache, "test")
    with torch.no_grad():
        scores = model(eval_batch(torch.from_numpy(test.images), channels=2))
    wrong = (scores.argmax(dim=1) != torch.from_numpy(test.labels)).sum().item()
    assert metrics["test_error"] == wrong / 21
    assert done.stderr.count("done after") == 1  # only rank 0 reports

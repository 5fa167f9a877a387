"""benchmarks/routing_check.py: the same weights routed with fewer iterations, and how far each
layer's assignments are from uniform after training."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark, make_cache

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_routing_check_reports_errors_by_iterations_and_assignments(tmp_path):
    cache = make_cache(tmp_path / "c.h5", n_train=24, n_test=12)
    model = ModelConfig(arch=(8, 4, 4, 4), iters=2)
    config = TrainConfig(data=str(cache), out=str(tmp_path / "run"), model=model, epochs=1,
                         batch_size=8, device="cpu", diagnostics=False)  # fmt: skip
    train(config.resolved())
    out = tmp_path / "check.json"
    args = [str(tmp_path / "run" / "last.pt"), "--data", str(cache), "--iters", "1,2,3"]
    args += ["--powers", "1,1,1", "0.1,0.1,1"]
    assert load_benchmark("routing_check").main([*args, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert set(row["test_error_by_iters"]) == {"1", "2"}  # never more than it was trained with
    assert all(0 <= e <= 1 for e in row["test_error_by_iters"].values())
    assert set(row["test_error_by_layer_powers"]) == {"1,1,1", "0.1,0.1,1"}
    for layer in ("conv_caps1", "conv_caps2", "class_caps"):
        r = row["routing"][layer]
        assert 0 < r["uniform"] <= r["max_assignment"] + 1e-6 <= 1 + 1e-6

"""benchmarks/probe_gradients.py: per-layer gradient norm and batch-to-batch agreement at init."""

from __future__ import annotations

import json

from conftest import load_benchmark, make_cache


def test_probe_reports_every_layer_and_tau_needs_an_e_step(tmp_path):
    cache = make_cache(tmp_path / "tiny.h5", n_train=48, n_test=16)
    out = tmp_path / "probe.json"
    args = ["--data", str(cache), "--arch", "8,4,4,4", "--iters", "1,2", "--powers", "1,0.2"]
    assert (
        load_benchmark("probe_gradients").main(
            [*args, "--batches", "3", "--batch-size", "8", "--json", str(out)]
        )
        == 0
    )
    rows = {(r["iters"], r["likelihood_power"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(1, 1.0), (1, 0.2), (2, 1.0), (2, 0.2)}
    for row in rows.values():
        for layer in ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps"):
            assert row[layer]["grad_norm"] > 0 and -1 <= row[layer]["cosine"] <= 1
    # One iteration has no E-step, so τ changes nothing; with two it changes the lower layers.
    assert rows[(1, 1.0)]["conv1"] == rows[(1, 0.2)]["conv1"]
    assert rows[(2, 1.0)]["conv1"]["grad_norm"] != rows[(2, 0.2)]["conv1"]["grad_norm"]

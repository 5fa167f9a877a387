"""benchmarks/probe_gradients.py: per-layer gradient norm, batch-to-batch agreement and how hard
each layer routes, at initialisation or for a trained checkpoint."""

from __future__ import annotations

import json

from conftest import load_benchmark, make_cache


def test_probe_reports_every_layer_and_tau_needs_an_e_step(tmp_path):
    cache = make_cache(tmp_path / "tiny.h5", n_train=48, n_test=16)
    out = tmp_path / "probe.json"
    sets = {
        "1it-tau1": "iters=1,likelihood_power=1",
        "1it-tau0.2": "iters=1,likelihood_power=0.2",
        "2it-tau1": "iters=2,likelihood_power=1",
        "2it-tau0.2": "iters=2,likelihood_power=0.2",
        "2it-small-w": "iters=2,likelihood_power=1,w_scale=0.01",
    }
    args = ["--data", str(cache), "--arch", "8,4,4,4", "--batches", "3", "--batch-size", "8"]
    for name, body in sets.items():
        args += ["--set", f"{name}={body}"]
    assert load_benchmark("probe_gradients").main([*args, "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == set(sets)
    for row in rows.values():
        for layer in ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps"):
            assert row[layer]["grad_norm"] > 0 and -1 <= row[layer]["cosine"] <= 1
        for layer in ("conv_caps1", "conv_caps2", "class_caps"):
            uniform = row[layer]["max_assignment_uniform"]
            assert 0 < uniform <= row[layer]["max_assignment"] + 1e-6 <= 1 + 1e-6
    # One iteration has no E-step, so τ changes nothing; with two it changes the lower layers.
    assert rows["1it-tau1"]["conv1"] == rows["1it-tau0.2"]["conv1"]
    assert rows["2it-tau1"]["conv1"]["grad_norm"] != rows["2it-tau0.2"]["conv1"]["grad_norm"]
    # Votes far below the variance floor leave the assignments uniform.
    small = rows["2it-small-w"]["class_caps"]
    assert small["max_assignment"] < 1.01 * small["max_assignment_uniform"]

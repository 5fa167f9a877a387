"""The exponential moving average of the weights that `--ema-decay` evaluates and saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_cache
from test_training import TinyNet, cnn_config, train_tiny
from torch import nn

from emcaps_cli.config import TrainConfig
from emcaps_cli.data.cache import load_cache
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.errors import EmcapsError
from emcaps_cli.training.averaging import WeightAverage, average_decay
from emcaps_cli.training.loop import resume_config

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_average_follows_its_recurrence_with_the_early_step_warm_up() -> None:
    net = nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.9)
    expected = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for step in range(1, 30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        average.update(net, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v
    assert average_decay(0.9, 1) == pytest.approx(2 / 11)
    assert average_decay(0.9, 1000) == 0.9
    for k, v in expected.items():
        torch.testing.assert_close(average.state[k], v, rtol=1e-5, atol=1e-6)


def test_applied_swaps_the_average_in_and_the_raw_weights_back() -> None:
    net = nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.5)
    raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for k in average.state:
        average.state[k].fill_(7.0)
    with average.applied(net):
        assert all(bool((v == 7.0).all()) for v in net.state_dict().values())
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k])


def test_the_decay_must_lie_in_0_1() -> None:
    with pytest.raises(EmcapsError, match="--ema-decay"):
        TrainConfig(ema_decay=1.0)
    assert TrainConfig().ema_decay == 0.98


def test_the_run_is_evaluated_and_saved_with_the_average(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=40)
    run = tmp_path / "run"
    train_tiny(cnn_config(cache, run, epochs=2, ema_decay=0.8))
    saved = torch.load(run / "last.pt", weights_only=True)
    # model_state is the average, train_state the weights training continues from.
    assert set(saved["train_state"]) == set(saved["model_state"])
    assert any(
        not torch.equal(saved["train_state"][k], saved["model_state"][k])
        for k in saved["model_state"]
    )
    # The metrics line is the error of the saved (averaged) network on the test images.
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    net = TinyNet(cnn_config(cache, run).model)
    net.load_state_dict(saved["model_state"])
    net.eval()
    test = load_cache(str(cache)).test
    with torch.no_grad():
        scores = net(eval_batch(torch.from_numpy(test.images[:]), 2))
    wrong = scores.argmax(1) != torch.from_numpy(test.labels[:]).long()
    assert metrics["test_error"] == pytest.approx(wrong.double().mean().item())


def test_a_resumed_run_with_an_average_matches_a_straight_run(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    straight, split_run = tmp_path / "straight", tmp_path / "split"
    train_tiny(cnn_config(cache, straight, epochs=2, ema_decay=0.8))
    train_tiny(cnn_config(cache, split_run, epochs=1, ema_decay=0.8))
    train_tiny(resume_config(split_run, epochs=2), resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split_run / "last.pt", weights_only=True)
    for key in ("model_state", "train_state"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)

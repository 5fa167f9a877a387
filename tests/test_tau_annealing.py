"""Deterministic annealing of the E-step: the network trains with τ rising from --tau-start to
the model's likelihood power, and is always evaluated with the model's own E-step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_cache

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.models import build_model
from emcaps_cli.training.loop import train
from emcaps_cli.training.schedule import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")


def _schedule(**kw) -> Schedule:
    config = TrainConfig(model=ModelConfig(likelihood_power=1.0), **kw).resolved()
    return Schedule.of(config, n_train=100, world=1)


def test_tau_holds_then_rises_geometrically_to_the_models_power() -> None:
    s = _schedule(tau_start=0.1, tau_hold_epochs=2, tau_anneal_epochs=3)
    taus = [s.likelihood_power(e) for e in range(7)]
    expected = [0.1, 0.1, 0.1 * 10 ** (1 / 3), 0.1 * 10 ** (2 / 3), 1.0, 1.0, 1.0]
    assert all(math.isclose(a, b) for a, b in zip(taus, expected, strict=True))


def test_without_tau_start_training_routes_with_the_models_power() -> None:
    assert {_schedule().likelihood_power(e) for e in range(5)} == {1.0}


def test_bad_tau_options_are_refused() -> None:
    with pytest.raises(EmcapsError, match="--tau-start"):
        TrainConfig(tau_start=0.0)
    with pytest.raises(EmcapsError, match="--tau-anneal-epochs"):
        TrainConfig(tau_anneal_epochs=-1.0)


def test_training_uses_the_annealed_power_and_evaluation_the_models(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=24, n_test=8)
    seen: list[tuple[bool, float]] = []

    def recording_model(config: ModelConfig):
        model = build_model(config)
        hook = lambda module, args: seen.append((module.training, module.likelihood_power))  # noqa: E731
        model.class_caps.register_forward_pre_hook(hook)
        return model

    model = ModelConfig(arch=(8, 4, 4, 4), likelihood_power=1.0, var_floor=0.01)
    config = TrainConfig(
        data=str(cache), out=str(tmp_path / "run"), model=model, epochs=3, batch_size=8,
        device="cpu", limit_test=8, diagnostics=False, tau_start=0.25, tau_hold_epochs=1,
        tau_anneal_epochs=2,
    )  # fmt: skip
    train(config.resolved(), build_model=recording_model)
    trained = sorted({tau for training, tau in seen if training})
    evaluated = {tau for training, tau in seen if not training}
    assert trained == pytest.approx([0.25, 0.5, 1.0]) and evaluated == {1.0}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_likelihood_power"] for m in lines] == pytest.approx([0.25, 0.5, 1.0])

"""The learning-rate schedules: exponential decay per epoch, or a cosine from lr to 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_cache

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.training.loop import train
from emcaps_cli.training.schedule import Schedule


def _rates(**options) -> list[float]:
    config = TrainConfig(lr=1e-2, epochs=10, **options).resolved()
    schedule = Schedule.of(config, n_train=100, world=1)
    return [schedule.learning_rate(e) for e in range(12)]


def test_the_exponential_schedule_multiplies_by_the_decay_every_epoch() -> None:
    assert TrainConfig().lr_schedule == "exponential"
    assert _rates(lr_decay=0.9) == pytest.approx([1e-2 * 0.9**e for e in range(12)])


def test_the_cosine_schedule_falls_from_lr_to_zero_over_the_run() -> None:
    rates = _rates(lr_schedule="cosine")
    assert rates[0] == 1e-2  # the first epoch at the full rate
    assert rates[5] == pytest.approx(0.5e-2)  # half way: half the rate
    assert rates[9] == pytest.approx(1e-2 * (1 + math.cos(0.9 * math.pi)) / 2)
    assert rates[10] == rates[11] == pytest.approx(0.0, abs=1e-18)
    assert all(a > b for a, b in zip(rates[:10], rates[1:11], strict=True))
    assert _rates(lr_schedule="cosine", lr_decay=0.5) == rates  # the decay is not used


def test_the_cosine_length_defaults_to_the_epochs_and_can_be_set() -> None:
    assert TrainConfig(epochs=7, lr_schedule="cosine").resolved().lr_anneal_epochs == 7.0
    rates = _rates(lr_schedule="cosine", lr_anneal_epochs=4)
    assert rates[2] == pytest.approx(0.5e-2) and rates[4] == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"lr_schedule": "step"}, "--lr-schedule"), ({"lr_anneal_epochs": 0.0}, "--lr-anneal")],
)
def test_a_bad_schedule_is_refused_by_name(options: dict, flag: str) -> None:
    with pytest.raises(EmcapsError, match=flag):
        TrainConfig(**options)


@pytest.mark.slow
def test_a_cosine_run_records_its_rates_and_cannot_be_extended_past_zero(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=60, n_test=20)
    run = tmp_path / "run"
    config = TrainConfig(
        data=str(cache), out=str(run), model=ModelConfig(model="cnn"), epochs=2,
        batch_size=20, lr=1e-3, device="cpu", lr_schedule="cosine", diagnostics=False,
    )  # fmt: skip
    train(config, False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "epoch" in r] == pytest.approx([1e-3, 0.5e-3])
    stored = json.loads((run / "config.json").read_text())
    stored = stored["train_config"]
    assert stored["lr_schedule"] == "cosine" and stored["lr_anneal_epochs"] == 2.0
    from emcaps_cli.training.loop import resume_config

    longer = resume_config(str(run), epochs=3)
    with pytest.raises(EmcapsError, match="cosine learning rate .* reaches 0 after 2 epochs"):
        train(longer, True)

"""Images per optimiser step (`--batch-size`): 16 for both models, stored with the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_cache
from test_training import cnn_config, train_tiny

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_both_models_default_to_batches_of_16() -> None:
    assert TrainConfig().resolved().batch_size == 16
    assert TrainConfig(model=ModelConfig(model="cnn")).resolved().batch_size == 16


def test_a_batch_below_one_image_is_refused() -> None:
    with pytest.raises(EmcapsError, match="--batch-size 0"):
        TrainConfig(batch_size=0)


def test_the_run_stores_its_batch_and_takes_that_many_steps(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=10)
    run = tmp_path / "run"
    defaults = TrainConfig()
    # 40 images, 10% held out for validation: 36 training images in batches of 16 -> 3 steps
    train_tiny(cnn_config(cache, run, batch_size=defaults.batch_size))
    stored = json.loads((run / "config.json").read_text())
    assert stored["train_config"]["batch_size"] == 16 and stored["steps_per_epoch"] == 3
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3

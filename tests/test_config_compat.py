"""Stored configs (checkpoints, config.json) load only as written by this version of emcaps."""

from __future__ import annotations

import re

import pytest

from emcaps_cli.config import REMOVED_MODEL_FIELDS, ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError


def test_a_stored_config_round_trips() -> None:
    config = TrainConfig(model=ModelConfig(arch=(8, 4, 4, 4), class_iters=2), epochs=3)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(config.model.to_dict()) == config.model


@pytest.mark.parametrize(
    ("cls", "field", "what"),
    [(ModelConfig, "var_floor", "model config"), (TrainConfig, "ema_decay", "train config")],
)
def test_a_config_that_lacks_a_field_is_refused_in_one_line(cls, field, what) -> None:
    stored = cls().to_dict()
    del stored[field]
    with pytest.raises(EmcapsError) as err:
        cls.from_dict(stored, "runs/old/last.pt")
    message = str(err.value)
    assert message == (
        f"runs/old/last.pt: {what} lacks {field}: written by an older emcaps; retrain"
    )


def test_a_train_config_whose_model_config_lacks_a_field_names_the_model_config() -> None:
    stored = TrainConfig().to_dict()
    del stored["model"]["class_iters"]
    with pytest.raises(EmcapsError, match=r"^last\.pt: model config lacks class_iters: written"):
        TrainConfig.from_dict(stored, "last.pt")


def test_removed_options_at_the_value_that_remains_load_without_them() -> None:
    # Checkpoints of the previous version store both keys, at these values unless set.
    assert REMOVED_MODEL_FIELDS == {"conv2_final_lambda": None, "conv_beta_a_scale": 1.0}
    stored = {**ModelConfig().to_dict(), **REMOVED_MODEL_FIELDS}
    assert ModelConfig.from_dict(stored) == ModelConfig()
    train = {**TrainConfig().to_dict(), "model": stored}
    assert TrainConfig.from_dict(train) == TrainConfig()


@pytest.mark.parametrize(
    ("key", "value"), [("conv2_final_lambda", 0.15), ("conv_beta_a_scale", 10.0)]
)
def test_removed_options_at_another_value_are_refused(key, value) -> None:
    stored = {**ModelConfig().to_dict(), key: value}
    with pytest.raises(EmcapsError) as err:
        ModelConfig.from_dict(stored, "best.pt")
    assert str(err.value) == (
        f"best.pt: model config sets {key} = {value!r}, an option emcaps no longer has: "
        "written by an older emcaps; retrain"
    )


def test_a_checkpoint_of_an_older_emcaps_is_refused_with_its_path(tmp_path) -> None:
    from emcaps_cli.checkpoint import load_model, save_checkpoint
    from emcaps_cli.models import build_model
    from emcaps_cli.training.state import resume_config

    config = TrainConfig(model=ModelConfig(arch=(8, 4, 4, 4), iters=1), out=str(tmp_path))
    model_config = {**config.model.to_dict(), "conv_beta_a_scale": 10.0}
    train_config = config.to_dict()
    del train_config["grad_clip"]
    path = tmp_path / "last.pt"
    payload = {
        "model_config": model_config,
        "model_state": build_model(config.model).state_dict(),
        "train_config": train_config,
    }
    save_checkpoint(path, payload)
    where = re.escape(str(path))
    with pytest.raises(EmcapsError, match=rf"^{where}: model config sets conv_beta_a_scale = 10"):
        load_model(path)
    with pytest.raises(EmcapsError, match=rf"^{where}: train config lacks grad_clip: written"):
        resume_config(tmp_path)

"""Named recipes (emcaps_cli/presets/*.toml): what each sets, how options override them, and
what a run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_cache
from typer.testing import CliRunner

from emcaps_cli.cli import app
from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.defaults import PRESETS
from emcaps_cli.errors import EmcapsError
from emcaps_cli.presets import load_preset, preset_config, routing_rule

runner = CliRunner()


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_names_only_config_fields(name: str) -> None:
    preset = load_preset(name)
    assert preset.description
    for model in ("capsnet", "cnn"):
        config = preset_config(name, {"model": model})
        assert config.preset == name and config.resolved().model.model == model


@pytest.mark.parametrize("model", ["capsnet", "cnn"])
def test_the_defaults_are_the_tempered_preset(model: str) -> None:
    plain = TrainConfig(model=ModelConfig(model=model)).resolved()
    assert plain == preset_config("tempered", {"model": model}).resolved()


def test_paper_and_released_route_with_procedure_1() -> None:
    for name in ("paper", "released"):
        model = preset_config(name).model
        assert model.likelihood_power == 1.0 and model.var_floor <= 0.01
        assert "Procedure 1" in routing_rule(model) and "not" not in routing_rule(model)
    assert "not the paper's Procedure 1" in routing_rule(ModelConfig())


def test_the_cnn_keeps_its_own_learning_rate_under_a_preset() -> None:
    assert preset_config("paper").resolved().lr == 1e-2
    assert preset_config("paper", {"model": "cnn"}).resolved().lr == 3e-4
    assert preset_config("paper", {"model": "cnn"}).batch_size == 64


def test_unknown_preset_is_one_line() -> None:
    with pytest.raises(EmcapsError, match="--preset nope"):
        load_preset("nope")
    result = runner.invoke(app, ["train", "--preset", "nope"])
    assert result.exit_code == 2


def test_train_records_the_preset_and_options_override_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=24, n_test=8)
    run = tmp_path / "run"
    args = ["train", "--data", str(cache), "--out", str(run), "--device", "cpu"]
    args += ["--arch", "8,4,4,4", "--epochs", "1", "--limit-test", "8", "--no-diagnostics"]
    result = runner.invoke(app, [*args, "--preset", "paper", "--batch-size", "8", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    assert "Procedure 1" in result.stderr
    config = json.loads((run / "config.json").read_text())
    train, model = config["train_config"], config["model_config"]
    assert train["preset"] == "paper"
    assert (train["batch_size"], train["lr"]) == (8, 3e-3)  # typed: they override the preset
    assert (train["ema_decay"], model["likelihood_power"], model["var_floor"]) == (0.0, 1.0, 5e-4)
    assert config["routing"] == routing_rule(ModelConfig.from_dict(model))


def test_a_bad_preset_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    import emcaps_cli.presets as presets

    (tmp_path / "tempered.toml").write_text("[model]\nno_such_field = 1\n")
    monkeypatch.setattr(presets.resources, "files", lambda _: tmp_path)
    with pytest.raises(EmcapsError, match="no_such_field"):
        load_preset("tempered")

"""The command line's options: defaults and choices come from the library, values reach it."""

from __future__ import annotations

import typer

from emcaps_cli.cli import app
from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.defaults import Kernels, Loss, values


def command_params(name: str, *args: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return command.make_context(name, list(args)).params


def test_train_defaults_are_the_config_defaults() -> None:
    from emcaps_cli.cli.train import new_config

    assert new_config(command_params("train")) == TrainConfig()


def test_summary_defaults_are_the_model_config_defaults() -> None:
    from emcaps_cli.cli import model_options as opts

    params = command_params("summary")
    params.pop("json_out")
    assert opts.model_config(**params) == ModelConfig()


def test_typed_choices_reach_the_config_as_plain_values() -> None:
    from emcaps_cli.cli.train import new_config

    config = new_config(command_params("train", "--model", "cnn", "--loss", "cross-entropy"))
    assert type(config.model.model) is str and config.model.model == "cnn"
    assert type(config.loss) is str and config.loss == "cross-entropy"
    assert type(config.split) is str and config.split == "full"


def test_kernel_choices_are_the_routing_backends() -> None:
    from emcaps_cli.routing import backend as routing_backend

    assert set(values(Kernels)) == set(routing_backend.BACKENDS)


def test_loss_choices_are_the_losses() -> None:
    from emcaps_cli.losses import get_loss

    for name in values(Loss):
        get_loss(name)


def test_class_iters_reaches_the_model_config() -> None:
    from emcaps_cli.cli.train import new_config

    config = new_config(command_params("train", "--iters", "3", "--class-iters", "2"))
    assert (config.model.iters, config.model.class_iters) == (3, 2)


def test_every_train_option_is_declared_once_and_listed_under_its_panel() -> None:
    from typer.testing import CliRunner

    from emcaps_cli.cli.options import PANELS
    from emcaps_cli.cli.train import TRAIN_OPTIONS

    names = [row.name for row in TRAIN_OPTIONS]
    assert len(set(names)) == len(names)
    command = typer.main.get_command(app).commands["train"]
    assert [param.name for param in command.params] == names  # the command is the table
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    headings, panel_of = [], {}
    for line in help_text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            headings.append(line[:-1])
        elif line.startswith("  --"):
            flag = line.split()[0]
            assert flag not in panel_of, f"{flag} listed twice"
            panel_of[flag] = headings[-1]
    assert headings == [panel or "Options" for panel in PANELS]
    expected = {row.spelling.split("/")[0]: row.panel or "Options" for row in TRAIN_OPTIONS}
    assert panel_of == {**expected, "--help": "Options"}


def test_the_options_table_lists_every_option_with_its_config_default() -> None:
    from emcaps_cli.cli.options_table import main, markdown
    from emcaps_cli.cli.train import TRAIN_OPTIONS

    text = markdown(TRAIN_OPTIONS)
    listed = [line.split("`")[1].split()[0] for line in text.splitlines() if line.startswith("| `")]
    assert sorted(listed) == sorted(row.spelling.split("/")[0] for row in TRAIN_OPTIONS)
    assert f"| `--epochs` | `{TrainConfig().epochs}` |" in text
    assert f"| `--iters` | `{ModelConfig().iters}` |" in text
    assert main(["nonsense"]) == 2

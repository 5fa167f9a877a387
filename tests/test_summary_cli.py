"""`emcaps summary`: parameter counts through the real command."""

import json

from typer.testing import CliRunner

from emcaps_cli.cli import app

runner = CliRunner()


def test_summary_json_reports_paper_parameter_count():
    result = runner.invoke(app, ["summary", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert 300_000 < info["parameters"] < 320_000
    assert [layer["name"] for layer in info["layers"]] == [
        "conv1",
        "primary_caps",
        "conv_caps1",
        "conv_caps2",
        "class_caps",
    ]
    assert info["layers"][-1]["output"] == [[5, 16], [5]]
    assert sum(layer["parameters"] for layer in info["layers"]) == info["parameters"]


def test_summary_small_model_and_cnn():
    small = json.loads(runner.invoke(app, ["summary", "--json", "--arch", "64,8,16,16"]).stdout)
    assert 66_000 < small["parameters"] < 70_000
    cnn = json.loads(runner.invoke(app, ["summary", "--json", "--model", "cnn"]).stdout)
    assert 4_100_000 < cnn["parameters"] < 4_300_000


def test_summary_bad_arch_is_one_line_error():
    result = runner.invoke(app, ["summary", "--arch", "1,2"])
    assert result.exit_code == 2
    assert "--arch" in result.output and "Traceback" not in result.output

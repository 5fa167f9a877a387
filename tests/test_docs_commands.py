"""Every `--option` the README and docs give an `emcaps` command is an option of that command."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emcaps_cli.cli import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_RE = re.compile(r"emcaps (" + "|".join(COMMANDS) + r")\b([^`&|#\n]*)")


def documented_options() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {name: set() for name in COMMANDS}
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")  # join continued shell lines
        for command, rest in COMMAND_RE.findall(text):
            found[command].update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))
    return found


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_options_exist(command):
    options = documented_options()[command]
    text = help_text(command)
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, f"documented but not options of `emcaps {command}`: {missing}"


def test_the_docs_mention_options_at_all():
    """Guards the parser above: the quick start alone names --views, --out, --arch, --epochs."""
    found = documented_options()
    assert {"--views"} <= found["synth"] and {"--arch", "--epochs", "--out"} <= found["train"]

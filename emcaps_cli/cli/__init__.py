"""The `emcaps` command line: a thin Typer layer, one module per command.

main.py assembles the commands into `app` and holds `main()`, the console-script entry point
(also `python -m emcaps_cli`). Each command module imports torch and the library inside its
command function, so `--help` stays fast.
"""

from emcaps_cli.cli.main import COMMANDS, app, main

__all__ = ["COMMANDS", "app", "main"]

"""Package-level settings."""

import os
import subprocess
import sys

import pytest


def test_importing_emcaps_changes_no_environment_variable():
    # torch first: what torch itself sets on import is not emcaps' doing.
    code = (
        "import json, os, torch\n"
        "before = dict(os.environ)\n"
        "import emcaps_cli, emcaps_cli.models, emcaps_cli.cli\n"
        "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))\n"
        "print(json.dumps(sorted(set(before) - set(os.environ))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["{}", "[]"], out.stderr


def test_allocator_tuning_applies_on_glibc_and_can_be_turned_off():
    # In a child process: mallopt settings last as long as the process, and the tests that
    # follow should run on the allocator they started with.
    code = (
        "import platform\n"
        "from emcaps_cli.utils.allocator import keep_freed_memory\n"
        "print(platform.libc_ver()[0] == 'glibc', keep_freed_memory())\n"
    )
    for setting, applies in (("1", True), ("0", False)):
        env = {**os.environ, "EMCAPS_KEEP_FREED_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        glibc, applied = out.stdout.split()
        assert applied == str(applies and glibc == "True"), out.stderr


@pytest.mark.parametrize(("user", "expected"), [(None, "1"), ("0", "0")])
def test_the_emcaps_command_tunes_the_allocator(monkeypatch, user, expected):
    from emcaps_cli.cli import main as cli_main

    called = []
    module = sys.modules[cli_main.__module__]  # emcaps_cli.cli.main, the module
    monkeypatch.setattr(module, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["emcaps", "--help"])
    if user is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", user)
    with pytest.raises(SystemExit):
        cli_main()
    assert called == [True]
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == expected  # huge pages unless the user chose

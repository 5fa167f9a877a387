"""Package-level settings."""

import os
import subprocess
import sys


def test_importing_emcaps_turns_on_huge_pages_unless_the_user_chose():
    code = "import emcaps_cli, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1", out.stderr
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0", out.stderr


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


def test_the_emcaps_command_tunes_the_allocator(monkeypatch):
    import pytest

    from emcaps_cli.cli import main as cli_main

    called = []
    module = sys.modules[cli_main.__module__]  # emcaps_cli.cli.main, the module
    monkeypatch.setattr(module, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["emcaps", "--help"])
    with pytest.raises(SystemExit):
        cli_main()
    assert called == [True]

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


def test_allocator_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from emcaps_cli.utils.allocator import keep_freed_memory

    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
    monkeypatch.setenv("EMCAPS_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_the_emcaps_command_tunes_the_allocator(monkeypatch):
    import pytest

    import emcaps_cli.cli as cli

    called = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["emcaps", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert called == [True]

"""Every function of the package fits on a screen: at most MAX_LINES lines, decorators
excluded, docstring included. The C kernels (routing/c/kernels.c) are outside this rule."""

from __future__ import annotations

import ast
from pathlib import Path

import emcaps_cli

MAX_LINES = 80


def long_functions(root: Path, limit: int) -> list[str]:
    """`path:line name (n lines)` of every function or method in `root` longer than `limit`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    where = path.relative_to(root.parent)
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_of_the_package_is_longer_than_a_screen():
    assert long_functions(Path(emcaps_cli.__file__).parent, MAX_LINES) == []


def test_the_check_finds_a_long_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (package / "mod.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(package, MAX_LINES) == ["pkg/mod.py:5 long (82 lines)"]

"""The package's module-level imports form no cycle.

A static check: every module of emcaps_cli is parsed with `ast`, and its module-level imports
of emcaps_cli modules (not those inside functions, nor under `if TYPE_CHECKING:`) are the
edges of a graph that must be acyclic. Importing `a.b.c` also runs the `__init__` of `a.b`,
so that package is an edge too, unless the importer is inside it.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import emcaps_cli

PACKAGE = "emcaps_cli"


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package in directory `root`, by dotted name (packages by their
    __init__), found with pkgutil without importing any."""
    modules = {package: root / "__init__.py"}
    for info in pkgutil.iter_modules([str(root)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            modules.update(package_modules(root / info.name, name))
        else:
            modules[name] = root / f"{info.name}.py"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported (not in functions or classes'
    methods, not under `if TYPE_CHECKING:`)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)
        elif isinstance(node, ast.ClassDef):
            yield from _module_level_imports(node.body)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path], package: str) -> dict[str, set[str]]:
    """module -> the package modules its module-level imports run.

    An import names its target; the packages above the target run too, except those the
    importer is inside (they are already importing). `from pkg import mod` of a submodule
    needs only pkg's __init__ to have started, so it counts pkg as such an enclosing package.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        named: set[str] = set()  # must have finished importing
        above: set[str] = set()  # run, unless the importer is inside them
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    named.add(alias.name)
                    above.update(_ancestors(alias.name))
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                anchor = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)
            named.update(submodules)
            (named if len(submodules) < len(node.names) else above).add(base)
            above.update(_ancestors(base))
        inside = {name, *_ancestors(name)}
        graph[name] = {m for m in named if m in modules and m != name} | {
            m for m in above if m in modules and m not in inside
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    root = Path(emcaps_cli.__file__).parent
    modules = package_modules(root, PACKAGE)
    assert f"{PACKAGE}.config" in modules and f"{PACKAGE}.routing.fused" in modules
    cycle = find_cycle(import_graph(modules, PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_is_a_leaf():
    """config.py imports no emcaps module but errors and defaults."""
    root = Path(emcaps_cli.__file__).parent
    graph = import_graph(package_modules(root, PACKAGE), PACKAGE)
    assert graph[f"{PACKAGE}.config"] <= {f"{PACKAGE}.errors", f"{PACKAGE}.defaults"}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_check_names_a_module_level_cycle(tmp_path):
    # A models module and a network module that import each other's names at module level.
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "models.py": "from pkg.baseline import CNN\nclass Config: ...\n",
            "baseline.py": "from pkg.models import Config\nclass CNN: ...\n",
        },
    )
    modules = package_modules(tmp_path / "pkg", "pkg")
    cycle = find_cycle(import_graph(modules, "pkg"))
    assert cycle == ["pkg.baseline", "pkg.models", "pkg.baseline"]


def test_the_check_ignores_imports_in_functions_and_under_type_checking(tmp_path):
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "models.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.baseline import CNN\n"
                "def build():\n    from pkg.baseline import CNN\n    return CNN()\n"
            ),
            "baseline.py": "from pkg.models import build\nclass CNN: ...\n",
            "sub/__init__.py": "from pkg.sub import leaf\n",
            "sub/leaf.py": "from . import other\n",
            "sub/other.py": "",
        },
    )
    modules = package_modules(tmp_path / "pkg", "pkg")
    graph = import_graph(modules, "pkg")
    assert graph["pkg.models"] == set()
    assert graph["pkg.sub.leaf"] == {"pkg.sub.other"}
    assert find_cycle(graph) is None


def test_a_module_importing_names_of_its_own_package_init_is_a_cycle(tmp_path):
    # pkg/sub/__init__.py imports leaf at module level, and leaf a name of pkg.sub.
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "sub/__init__.py": "from pkg.sub.leaf import x\ndef build(): ...\n",
            "sub/leaf.py": "from pkg.sub import build\nx = 1\n",
        },
    )
    cycle = find_cycle(import_graph(package_modules(tmp_path / "pkg", "pkg"), "pkg"))
    assert cycle == ["pkg.sub", "pkg.sub.leaf", "pkg.sub"]


def test_importing_a_subpackage_runs_its_init(tmp_path):
    # pkg.a imports pkg.sub.leaf, which runs pkg/sub/__init__.py, which imports pkg.a.
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from pkg.sub.leaf import x\n",
            "sub/__init__.py": "from pkg.a import *\n",
            "sub/leaf.py": "x = 1\n",
        },
    )
    cycle = find_cycle(import_graph(package_modules(tmp_path / "pkg", "pkg"), "pkg"))
    assert cycle == ["pkg.a", "pkg.sub", "pkg.a"]

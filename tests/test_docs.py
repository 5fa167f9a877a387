"""The Python examples in the README and docs import names that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def import_lines(page: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    return [
        line.split("#")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith(("from emcaps_cli", "import emcaps_cli"))
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_example_imports_resolve(page):
    for line in import_lines(page):
        exec(line, {})  # raises ImportError naming the missing name

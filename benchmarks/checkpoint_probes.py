"""What the checkpoint probes (probe_class_iters.py, probe_fit.py) share: probe each
checkpoint in turn, print one line per checkpoint as it is done, report bad input in one line,
and write the rows as a JSON report atomically."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import atomic_path


def run_probes(
    data: str,
    checkpoints: list[str],
    load: Callable[[str], Any],
    probe: Callable[[str, Any], dict],
    line: Callable[[dict], str],
    json_path: str | None,
) -> int:
    """`load(data)` once, then `probe(checkpoint, loaded)` for every checkpoint, printing
    `line(row)`; exit status 0, or 2 after a one-line error (nothing written)."""
    try:
        loaded = load(data)
        rows = []
        for path in checkpoints:
            rows.append(probe(path, loaded))
            print(line(rows[-1]), flush=True)
    except EmcapsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if json_path:
        with atomic_path(Path(json_path)) as tmp:
            tmp.write_text(json.dumps({"data": data, "runs": rows}, indent=1) + "\n")
    return 0

"""Table 2's protocol on a cache: novel-viewpoint error of the CNN and the capsule network when
both are matched on familiar viewpoints (section 5.1).

For each split (azimuth, elevation): train the CNN on the familiar viewpoints; take the familiar
test error of its best.pt epoch (chosen on validation images) as the target; train the capsule
network with `--stop-at-error` at that target; compare the two novel-viewpoint errors. A capsule
run that never reaches the target is reported as such, with its best familiar error.

    python benchmarks/bench_viewpoints.py --data data/synth100.h5 --seeds 0,1,2 \
        --cnn "--epochs 10" --capsnet "--arch 64,8,16,16 --epochs 30" --json runs/viewpoints.json

Seeds run in turn, each in RUNS/seedS. The JSON report holds one entry per seed under "runs";
`python benchmarks/report.py` renders it when it lies in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning import (  # noqa: E402
    EMCAPS,
    last_json_object,
    machine_info,
    parse_seeds,
    read_metrics,
)

from emcaps_cli.utils.atomic import atomic_path  # noqa: E402

SPLITS = ("azimuth", "elevation")


def run_train(data: Path, run_dir: Path, options: list[str]) -> tuple[dict[str, Any], float]:
    """One `emcaps train` subprocess: (its JSON result, wall seconds); exits on failure."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [*EMCAPS, "train", "--data", str(data), "--out", str(run_dir), *options, "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = last_json_object(done.stdout)
    if done.returncode != 0 or result is None:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        sys.exit(f"error: `{shlex.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return result, wall


def row_at(run_dir: Path, epoch: int) -> dict[str, Any]:
    return next(r for r in read_metrics(run_dir) if r["epoch"] == epoch)


def one_split(args: argparse.Namespace, split: str, seed: int) -> dict[str, Any]:
    base = ["--split", split, "--seed", str(seed)]
    runs = args.runs / f"seed{seed}"
    cnn_dir = runs / f"{split}-cnn"
    cnn, cnn_wall = run_train(args.data, cnn_dir, [*base, "--model", "cnn", *args.cnn])
    cnn_row = row_at(cnn_dir, cnn["best_epoch"])
    target = cnn_row["test_familiar_error"]
    caps_dir = runs / f"{split}-capsnet"
    caps, caps_wall = run_train(
        args.data, caps_dir, [*base, "--stop-at-error", f"{target:.6f}", *args.capsnet]
    )
    caps_rows = read_metrics(caps_dir)
    last = caps_rows[-1]
    return {
        "split": split,
        "target_familiar_error": target,
        "cnn": {"epoch": cnn["best_epoch"], "row": cnn_row, "wall_seconds": cnn_wall},
        "capsnet": {
            "reached": caps["stopped"] == "stop-at-error",
            "epoch": last["epoch"],
            "row": last,
            "best_familiar_error": min(r["test_familiar_error"] for r in caps_rows),
            "wall_seconds": caps_wall,
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'split':<10} {'CNN ep':>6} {'CNN familiar':>12} {'CNN novel':>10}  "
        f"{'caps ep':>7} {'caps familiar':>13} {'caps novel':>10}  matched"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        c, k = r["cnn"], r["capsnet"]
        lines.append(
            f"{r['split']:<10} {c['epoch']:>6} {100 * c['row']['test_familiar_error']:>11.1f}% "
            f"{100 * c['row']['test_novel_error']:>9.1f}%  {k['epoch']:>7} "
            f"{100 * k['row']['test_familiar_error']:>12.1f}% "
            f"{100 * k['row']['test_novel_error']:>9.1f}%  "
            + ("yes" if k["reached"] else f"no (best {100 * k['best_familiar_error']:.1f}%)")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="HDF5 cache from `emcaps prepare`")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated (default: both)")
    p.add_argument(
        "--seeds",
        "--seed",
        type=parse_seeds,
        default=[0],
        help="comma-separated seeds, run in turn (default: 0)",
    )
    p.add_argument("--cnn", default="--epochs 10", help="options of the CNN runs")
    p.add_argument(
        "--capsnet",
        default="--arch 64,8,16,16 --epochs 30",
        help="options of the capsule runs (--epochs is the most they may take)",
    )
    p.add_argument("--runs", type=Path, default=Path("runs/bench_viewpoints"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"error: --data {args.data}: no such file (write one with `emcaps prepare`)")
    splits = args.splits.split(",")
    if unknown := [s for s in splits if s not in SPLITS]:
        sys.exit(f"error: --splits {unknown[0]}: expected azimuth or elevation")
    report = {
        "kind": "viewpoints",
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "data": str(args.data),
        "cnn": args.cnn,
        "capsnet": args.capsnet,
        "seeds": args.seeds,
        "machine": machine_info(),
        "runs": [],
    }
    args.cnn, args.capsnet = shlex.split(args.cnn), shlex.split(args.capsnet)
    for seed in args.seeds:
        results = []
        for split in splits:
            results.append(one_split(args, split, seed))
            print(f"seed {seed} {split}: done", file=sys.stderr, flush=True)
        print(f"seed {seed}\n{table(results)}")
        report["runs"].append({"seed": seed, "results": results})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

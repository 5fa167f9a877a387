"""Learning benchmark: `emcaps train` for several option sets × seeds on one cache, then a table
of error rates (mean ± sample sd over seeds), speed and wall time, and optionally a JSON report.

Each run is its own subprocess writing RUNS/NAME-seedS (replaced if it exists); the numbers are
read back from that run's metrics.jsonl. A failed run is reported with its stderr and makes the
script exit 1 after the table.

    python benchmarks/bench_learning.py                        # capsnet 3/2/1 iterations and cnn
    python benchmarks/bench_learning.py --set "capsnet=--arch 64,8,16,16" --set "cnn=--model cnn" \
        --seeds 0,1 --epochs 5 --extra "--device cpu" --json runs/bench_learning.json

`--combine A.json B.json ...` trains nothing: it pools the runs of reports written by this
script (more seeds of the same sets, run at another time) into one table and, with --json, one
report. The reports must agree on the cache, the epochs and each shared set's options, and no
set may hold the same seed twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from emcaps_cli.utils.atomic import atomic_path

DEFAULT_DATA = Path("data/smallnorb.h5")
QUICK_START_VIEWS = 40  # the README's quick-start synthetic set
SMALL_CAPSNET = "--arch 64,8,16,16"
DEFAULT_SETS = {
    "capsnet-3iters": SMALL_CAPSNET,
    "capsnet-2iters": f"{SMALL_CAPSNET} --iters 2",
    "capsnet-1iter": f"{SMALL_CAPSNET} --iters 1",
    "cnn": "--model cnn",
}
EMCAPS = [sys.executable, "-m", "emcaps_cli"]  # `emcaps`, from this interpreter's environment
STDERR_TAIL_LINES = 15

# Per-run fields summarised over seeds (fractions, as in metrics.jsonl) and their table headers.
ERROR_FIELDS = (
    ("test_error", "test err %"),
    ("best_test_error", "best.pt test %"),
    ("train_error", "train err %"),
    ("test_familiar_error", "familiar %"),
    ("test_novel_error", "novel %"),
)
SPLIT_FIELDS = ("test_familiar_error", "test_novel_error")  # only --split runs record these
SPEED_FIELDS = (("images_per_second", "img/s"), ("wall_seconds", "wall s"))


class BenchError(Exception):
    """A one-line error for the user (bad option, missing data)."""


# --- command line ----------------------------------------------------------------------------


def parse_set(text: str) -> tuple[str, str]:
    """`NAME=OPTIONS` -> (name, options); OPTIONS must split with shlex."""
    name, sep, options = text.partition("=")
    name = name.strip()
    if not sep or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=OPTIONS (NAME without '/')")
    try:
        shlex.split(options)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
    return name, options.strip()


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 0,1,2") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct integers like 0,1,2")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    defaults = "\n".join(f"  {name}={options}" for name, options in DEFAULT_SETS.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"default sets:\n{defaults}\n\nA single option needs '=': --extra=--amp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="HDF5 cache (default: %(default)s; built the README way if missing)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        type=parse_set,
        action="append",
        metavar="NAME=OPTIONS",
        help="an option set for `emcaps train`, repeatable (default: the sets below)",
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[0, 1, 2],
        help="comma-separated seeds (default: 0,1,2)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=10,
        help="epochs, unless a set gives --epochs (default: %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/bench_learning"),
        help="parent of the run directories NAME-seedS (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="write the report here (atomically)")
    p.add_argument("--extra", default="", metavar="OPTS", help="options appended to every set")
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="REPORT",
        help="pool the runs of these JSON reports into one table instead of training",
    )
    return p


def option_sets(args: argparse.Namespace) -> dict[str, str]:
    """name -> options string, from --set (or the defaults); names must be unique."""
    if not args.sets:
        return dict(DEFAULT_SETS)
    sets: dict[str, str] = {}
    for name, options in args.sets:
        if name in sets:
            raise BenchError(f"--set {name}: given twice")
        sets[name] = options
    return sets


# --- data --------------------------------------------------------------------------------------


def ensure_data(path: Path) -> None:
    """A missing default cache is built as in the README's quick start; any other is an error."""
    if path.is_file():
        return
    if path != DEFAULT_DATA:
        raise BenchError(f"--data {path}: no such file (write one with `emcaps prepare`)")
    raw = path.parent / "synth"
    steps = (
        ["synth", str(raw), "--views", str(QUICK_START_VIEWS)],
        ["prepare", str(raw), "--out", str(path)],
    )
    for step in steps:
        print(
            f"{path} missing, building the quick-start cache: emcaps {shlex.join(step)}",
            file=sys.stderr,
        )
        if subprocess.run([*EMCAPS, *step]).returncode != 0:
            raise BenchError(f"`emcaps {shlex.join(step)}` failed while building {path}")


# --- one run -----------------------------------------------------------------------------------


def has_option(tokens: list[str], option: str) -> bool:
    return any(t == option or t.startswith(option + "=") for t in tokens)


def train_command(
    data: Path, run_dir: Path, seed: int, epochs: int, options: list[str]
) -> list[str]:
    """`emcaps train ... --json`; --epochs only where the options do not set it."""
    command = [*EMCAPS, "train", "--data", str(data), "--out", str(run_dir), "--seed", str(seed)]
    if not has_option(options, "--epochs"):
        command += ["--epochs", str(epochs)]
    return [*command, *options, "--json"]


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object in `text`: pretty-printed, it starts on a line that is exactly '{'."""
    lines = text.splitlines()
    for start in reversed([i for i, line in enumerate(lines) if line == "{"]):
        try:
            value = json.loads("\n".join(lines[start:]))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows, one per epoch; [] if the run wrote none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(text: str, n: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def run_record(rows: list[dict[str, Any]], result: dict[str, Any] | None) -> dict[str, Any]:
    """What one finished run measured: final and best.pt errors, speed, diagnostics."""
    last = rows[-1]
    best_epoch = (result or {}).get("best_epoch")
    best_row = next((r for r in rows if r["epoch"] == best_epoch), None)
    speeds = [r["images_per_second"] for r in rows if r.get("images_per_second") is not None]
    record = {
        "epochs_completed": (result or {}).get("epochs_completed", len(rows)),
        "stopped": (result or {}).get("stopped"),
        "best_epoch": best_epoch,
        "test_error": last.get("test_error"),
        "train_error": last.get("train_error"),
        "validation_error": last.get("validation_error"),
        "best_test_error": best_row.get("test_error") if best_row else None,
        "images_per_second": statistics.fmean(speeds) if speeds else None,
    }
    for key in SPLIT_FIELDS:
        if key in last:
            record[key] = last[key]
    if "diagnostics" in last:
        record["diagnostics"] = last["diagnostics"]
    return record


def run_one(
    data: Path, run_dir: Path, seed: int, epochs: int, options: list[str]
) -> dict[str, Any]:
    """Train once in a subprocess; the run's record, with ok=False and stderr if it failed."""
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        run_dir.unlink()
    command = train_command(data, run_dir, seed, epochs, options)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    base = {
        "seed": seed,
        "run_dir": str(run_dir),
        "command": shlex.join(command),
        "returncode": done.returncode,
        "wall_seconds": time.perf_counter() - start,
    }
    rows = read_metrics(run_dir) if done.returncode == 0 else []
    if not rows:
        reason = tail(done.stderr) or "(no stderr)"
        if done.returncode == 0:
            reason = f"exit 0 but no rows in {run_dir / 'metrics.jsonl'}\n{reason}"
        return {**base, "ok": False, "stderr_tail": reason}
    return {**base, "ok": True, **run_record(rows, last_json_object(done.stdout))}


def progress_line(name: str, run: dict[str, Any], k: int, total: int) -> str:
    head = f"[{k}/{total}] {name} seed {run['seed']}:"
    if not run["ok"]:
        last_line = run["stderr_tail"].splitlines()[-1] if run["stderr_tail"] else ""
        return f"{head} FAILED (exit {run['returncode']}) {last_line}"
    return (
        f"{head} test {format_percent(run['test_error'])}%  "
        f"train {format_percent(run['train_error'])}%  "
        f"{run['epochs_completed']} epochs  {run['wall_seconds']:.1f} s"
    )


# --- summary and table ---------------------------------------------------------------------------


def summarise(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample sd with n−1) of the values that are not None; sd None for one value,
    both None for none."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean = statistics.fmean(present)
    return mean, statistics.stdev(present) if len(present) > 1 else None


def summarise_set(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, and {mean, sd} over the successful runs of every error and speed field."""
    ok = [r for r in runs if r["ok"]]
    summary: dict[str, Any] = {"runs": len(runs), "ok": len(ok), "failed": len(runs) - len(ok)}
    fields = [key for key, _ in ERROR_FIELDS] + [key for key, _ in SPEED_FIELDS]
    for key in fields:
        if key in SPLIT_FIELDS and not any(key in r for r in ok):
            continue
        mean, sd = summarise([r.get(key) for r in ok])
        summary[key] = {"mean": mean, "sd": sd}
    return summary


def format_percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def format_mean_sd(stat: dict[str, float | None] | None) -> str:
    """Error fractions as '12.34 ± 1.23' (%), sd '—' for one run, '—' for no value."""
    if stat is None or stat["mean"] is None:
        return "—"
    return f"{format_percent(stat['mean'])} ± {format_percent(stat['sd'])}"


def format_mean(stat: dict[str, float | None] | None, digits: int = 1) -> str:
    if stat is None or stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f}"


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per set: seeds, failures, error rates mean ± sd (%), img/s and wall s means.
    The familiar/novel columns appear only when some set has them."""
    shown = [(k, h) for k, h in ERROR_FIELDS if k not in SPLIT_FIELDS]
    shown += [
        (k, h)
        for k, h in ERROR_FIELDS
        if any(k in s for s in summaries.values()) and k in SPLIT_FIELDS
    ]
    header = ["set", "seeds", "failed", *(h for _, h in shown), *(h for _, h in SPEED_FIELDS)]
    body = [
        [name, str(s["ok"]), str(s["failed"]), *(format_mean_sd(s.get(k)) for k, _ in shown)]
        + [format_mean(s.get(k)) for k, _ in SPEED_FIELDS]
        for name, s in summaries.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def failure_report(sets: dict[str, dict[str, Any]]) -> str:
    """Every failed run: set, seed, exit status and its stderr tail, indented."""
    blocks = []
    for name, entry in sets.items():
        for run in entry["runs"]:
            if not run["ok"]:
                text = "\n".join("    " + line for line in run["stderr_tail"].splitlines())
                blocks.append(
                    f"FAILED: set {name!r} seed {run['seed']} (exit {run['returncode']}): "
                    f"{run['command']}\n{text}"
                )
    return "\n".join(blocks)


# --- report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "nproc": nproc,
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    """The report as indented JSON, written atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


# --- pooling reports ----------------------------------------------------------------------------


def read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BenchError(f"{path}: cannot read a report ({err})") from err
    if not isinstance(report, dict) or not isinstance(report.get("sets"), dict):
        raise BenchError(f"{path}: not a report of this script (no 'sets')")
    return report


def pooling_value(report: dict[str, Any], key: str) -> Any:
    """What must agree between pooled reports: the value of `key`, the cache path made absolute
    (relative ones against the working directory), so that `data/x.h5` and `/repo/data/x.h5`
    of one checkout agree."""
    value = report.get(key)
    return os.path.abspath(value) if key == "data" and value is not None else value


def combine_reports(paths: list[Path]) -> dict[str, Any]:
    """One report whose sets hold the runs of every report, in the order given."""
    reports = [read_report(path) for path in paths]
    first = reports[0]
    sets: dict[str, dict[str, Any]] = {}
    for path, report in zip(paths, reports, strict=True):
        for key in ("data", "epochs", "extra"):
            if pooling_value(report, key) != pooling_value(first, key):
                raise BenchError(
                    f"{path}: {key} {report.get(key)!r} differs from {paths[0]}'s "
                    f"{first.get(key)!r}"
                )
        for name, entry in report["sets"].items():
            pooled = sets.setdefault(name, {"options": entry["options"], "runs": []})
            if entry["options"] != pooled["options"]:
                raise BenchError(
                    f"{path}: set {name} has options {entry['options']!r}, "
                    f"elsewhere {pooled['options']!r}"
                )
            seen = {run["seed"] for run in pooled["runs"]}
            if repeated := sorted(seen & {run["seed"] for run in entry["runs"]}):
                raise BenchError(f"{path}: set {name} repeats seed(s) {repeated}")
            pooled["runs"].extend(entry["runs"])
    for entry in sets.values():
        entry["summary"] = summarise_set(entry["runs"])
    seeds = sorted({run["seed"] for entry in sets.values() for run in entry["runs"]})
    return {
        "command": [sys.argv[0], "--combine", *map(str, paths)],
        "data": first.get("data"),
        "epochs": first.get("epochs"),
        "seeds": seeds,
        "extra": first.get("extra"),
        "machine": first.get("machine"),
        "sets": sets,
    }


# --- main --------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, sets: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every set × seed, in order, with a progress line on stderr after each run."""
    extra = shlex.split(args.extra)
    total, k = len(sets) * len(args.seeds), 0
    results: dict[str, dict[str, Any]] = {}
    for name, options in sets.items():
        runs = []
        for seed in args.seeds:
            run_dir = args.runs / f"{name}-seed{seed}"
            run = run_one(args.data, run_dir, seed, args.epochs, [*shlex.split(options), *extra])
            runs.append(run)
            k += 1
            print(progress_line(name, run, k, total), file=sys.stderr, flush=True)
        results[name] = {"options": options, "runs": runs, "summary": summarise_set(runs)}
    return results


def publish(report: dict[str, Any], json_path: Path | None) -> None:
    """The report's table on stdout and, with --json, the report itself."""
    print(format_table({name: entry["summary"] for name, entry in report["sets"].items()}))
    if json_path:
        write_json(json_path, report)
        print(f"wrote {json_path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.combine:
            publish(combine_reports(args.combine), args.json)
            return 0
        if args.epochs < 1:
            raise BenchError(f"--epochs {args.epochs}: expected at least 1")
        shlex.split(args.extra)
        sets = option_sets(args)
        ensure_data(args.data)
    except (BenchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_all(args, sets)
    report = {
        "command": [sys.argv[0], *argv],
        "data": str(args.data),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "extra": args.extra,
        "machine": machine_info(),
        "sets": results,
    }
    publish(report, args.json)
    failures = failure_report(results)
    if failures:
        print(failures, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

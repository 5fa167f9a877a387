"""benchmarks/report.py: docs/results.md rendered from benchmarks/results/*.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import load_benchmark

report = load_benchmark("report")

# Sections the README and docs link to.
LINKED_ANCHORS = {
    "learning-quick-start-set",
    "table-1-routing-iterations",
    "paper-model",
    "viewpoint-generalisation-table-2-protocol",
    "speed",
}


def write(path: Path, value: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def learning_run(seed: int, test_error: float, **fields) -> dict:
    return {"seed": seed, "ok": True, "test_error": test_error, **fields}


def health(conv_caps1_std: float) -> dict:
    return {"conv1": {"grad_norm": 1.0}, "conv_caps1": {"activation_std": conv_caps1_std}}


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip("|").split(" | ")]
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_the_committed_results_page_is_what_the_results_render_to(capsys):
    code = report.main(["--check"])
    assert code == 0, capsys.readouterr().err


def test_the_committed_page_has_the_sections_the_docs_link_to():
    text = report.OUTPUT.read_text()
    anchors = {report.github_anchor(t) for t in re.findall(r"^## (.+)$", text, flags=re.M)}
    assert LINKED_ANCHORS <= anchors
    assert text.splitlines()[2] == report.HEADER


def test_a_bench_learning_report_renders_mean_sd_and_every_seed(tmp_path):
    # A report as `bench_learning.py --json` writes it: no kind, title or description.
    write(
        tmp_path / "results" / "tiny_screen.json",
        {
            "command": ["benchmarks/bench_learning.py", "--seeds", "0,1,2", "--set", "a=--x 1"],
            "data": "data/tiny.h5",
            "epochs": 3,
            "seeds": [0, 1, 2],
            "extra": "",
            "machine": {"cpu": "Test CPU", "nproc": 2, "torch": "9.9"},
            "sets": {
                "zeta": {"options": "--x 1", "runs": [learning_run(0, 0.5)]},
                "alpha": {
                    "options": "--arch 64,8,16,16",
                    "runs": [
                        learning_run(2, 0.60, train_error=0.25),
                        learning_run(0, 0.10, train_error=0.25, diagnostics=health(0.4)),
                        learning_run(1, 0.20, train_error=0.25, diagnostics=health(0.2)),
                        {"seed": 3, "ok": False, "returncode": 1, "stderr_tail": "boom"},
                    ],
                },
            },
        },
    )
    out = tmp_path / "results.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    text = out.read_text()

    assert "## Tiny screen" in text
    assert "python benchmarks/bench_learning.py --seeds 0,1,2 --set 'a=--x 1'" in text
    row = table_row(text, "alpha")
    # 10, 20, 60 %: mean 30, sample sd sqrt((400 + 100 + 900) / 2) = 26.458
    assert row[2:5] == ["3 (1 failed)", "30.00 ± 26.46", "0: 10.00 · 1: 20.00 · 2: 60.00"]
    assert row[6] == "25.00 ± 0.00"
    assert table_row(text, "zeta")[3] == "50.00"  # one seed: no sd
    assert text.index("| alpha |") < text.index("| zeta |")  # sorted by name
    assert "Machine: Test CPU, 2 CPUs, torch 9.9." in text
    assert table_row(text, "alpha | conv_caps1")[2:4] == ["2", "0.200–0.400"]

    # Same input, same bytes; --check agrees, then catches an edit.
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out), "--check"]) == 0
    out.write_text(text.replace("30.00", "31.00"))
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out), "--check"]) == 1


def test_check_reports_a_stale_page_in_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    write(results / "t.json", {"sets": {"a": {"options": "", "runs": [learning_run(0, 0.1)]}}})
    out = tmp_path / "results.md"
    out.write_text("old\n")
    assert report.main(["--results", str(results), "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "out of date" in err
    assert out.read_text() == "old\n"


def viewpoint_split(split: str, cnn_novel: float, caps_novel: float, reached: bool) -> dict:
    def row(epoch: int, familiar: float, novel: float) -> dict:
        return {"epoch": epoch, "test_familiar_error": familiar, "test_novel_error": novel}

    return {
        "split": split,
        "target_familiar_error": 0.05,
        "cnn": {"epoch": 3, "row": row(3, 0.05, cnn_novel)},
        "capsnet": {"reached": reached, "epoch": 9, "row": row(9, 0.04, caps_novel)},
    }


def test_viewpoint_reports_of_one_and_several_seeds(tmp_path):
    results = tmp_path / "results"
    # A single-seed report as bench_viewpoints.py wrote it before --seeds: the seed is in the
    # command.
    write(
        results / "a_one_seed.json",
        {
            "command": ["benchmarks/bench_viewpoints.py", "--seed", "4"],
            "data": "d.h5",
            "results": [viewpoint_split("azimuth", 0.20, 0.10, True)],
        },
    )
    write(
        results / "b_seeds.json",
        {
            "kind": "viewpoints",
            "title": "Viewpoints",
            "runs": [
                {"seed": 0, "results": [viewpoint_split("elevation", 0.30, 0.20, True)]},
                {"seed": 1, "results": [viewpoint_split("elevation", 0.30, 0.40, False)]},
            ],
        },
    )
    out = tmp_path / "results.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    one, several = text.split("## Viewpoints")
    assert "| azimuth | capsules | 1 | 4.00 | 10.00 | 4: 10.00 |" in one
    caps = table_row(several, "elevation | capsules")
    assert caps[4:6] == ["30.00 ± 14.14", "0: 20.00 · 1: 40.00"]
    assert caps[-2:] == ["1 of 2", "1 of 2"]  # matched, novel lower
    assert table_row(several, "elevation | CNN")[4] == "30.00 ± 0.00"


def test_a_bench_model_report_renders_one_row_per_configuration(tmp_path):
    def run(batch: int, speed: float | None, memory: float) -> dict:
        config = {"model": "paper", "mode": "train", "impl": "fused", "batch": batch}
        config |= {"routing": "exact", "precision": "fp32", "compile": "off"}
        if speed is None:
            return {**config, "error": "skipped: --budget-s"}
        return {**config, "images_per_s": speed, "peak_memory_mb": memory}

    results = tmp_path / "results"
    machine = {"cpus": 2, "threads": "auto", "torch": "9.9", "processor": ""}
    write(
        results / "speed.json",
        {
            "kind": "speed",
            "reports": [
                {"machine": machine, "runs": [run(16, 60.0, 590.4), run(8, 100.0, 400)]},
                {"machine": machine, "runs": [run(16, 70.0, 600.2), run(8, None, 0)]},
            ],
        },
    )
    out = tmp_path / "results.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| paper | train | fused | 8 | exact, fp32 | 1 (1 failed or skipped) | 100.0 |" in text
    row = table_row(text, "paper | train | fused | 16")
    assert row[5:] == ["2", "65.0 ± 7.1", "60.0 · 70.0", "590–600"]
    assert text.index("| fused | 8 |") < text.index("| fused | 16 |")  # batches numerically


def test_an_unknown_file_is_an_error_naming_it(tmp_path, capsys):
    write(tmp_path / "results" / "odd.json", {"rows": []})
    out = tmp_path / "results.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 2
    assert "odd.json" in capsys.readouterr().err and not out.exists()


def test_github_anchors():
    assert report.github_anchor("Learning: quick-start set") == "learning-quick-start-set"
    assert report.github_anchor("Viewpoint generalisation (Table 2 protocol)") == (
        "viewpoint-generalisation-table-2-protocol"
    )

"""benchmarks/report.py: docs/results.md rendered from benchmarks/results/*.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import load_benchmark

report = load_benchmark("report")

# Sections the README and docs link to: the tables, and each default's comparison.
LINKED_ANCHORS = {
    "learning-quick-start-set",
    "table-1-routing-iterations",
    "paper-model",
    "viewpoint-generalisation-table-2-protocol",
    "speed",
    "gradient-probe-at-initialisation",
    "recipe-ablations-routing",
    "variance-floor",
    "tempered-e-step",
    "conv-capsule-lambda-max",
    "class-capsule-threshold-scale",
    "conv-capsule-lambda-max-by-layer-width",
    "recipe-ablations-training",
    "cnn-learning-rate",
    "capsule-learning-rate",
    "learning-rate-schedule",
    "augmentation-warm-up",
    "weight-average",
    "front-learning-rate-scale",
    "crop-standardisation",
    "gradient-clipping",
    "batch-size",
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
    headings = re.findall(r"^###? (.+)$", text, flags=re.M)
    anchors = [report.github_anchor(t) for t in headings]
    assert LINKED_ANCHORS <= set(anchors)
    assert len(anchors) == len(set(anchors))  # GitHub would suffix a repeated one
    assert text.splitlines()[2] == report.HEADER
    # Every in-page link points at a heading of the page.
    assert set(re.findall(r"\]\(#([^)]+)\)", text)) <= set(anchors)


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


def test_labelled_speed_reports_keep_their_runs_apart(tmp_path):
    """Reports of two variants of the code ("label") give a row each, in the labels' order."""
    config = {"model": "paper", "mode": "train", "impl": "fused", "batch": 32}
    config |= {"routing": "exact", "precision": "fp32", "compile": "off"}

    def sub(label: str, speed: float) -> dict:
        return {"label": label, "runs": [{**config, "images_per_s": speed, "peak_memory_mb": 1}]}

    reports = [sub("before", 10.0), sub("after", 30.0), sub("before", 12.0), sub("after", 32.0)]
    write(tmp_path / "results" / "speed.json", {"kind": "speed", "reports": reports})
    out = tmp_path / "results.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    text = out.read_text()
    before = table_row(text, "paper | train | fused | 32 | before: exact, fp32")
    after = table_row(text, "paper | train | fused | 32 | after: exact, fp32")
    assert before[5:7] == ["2", "11.0 ± 1.4"] and after[5:7] == ["2", "31.0 ± 1.4"]
    assert text.index("before: exact") < text.index("after: exact")


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


def grouped_report() -> dict:
    machine = {"cpu": "Old CPU", "nproc": 2}

    def runs(source: str, *pairs: tuple[int, float]) -> list[dict]:
        return [learning_run(seed, err, source=source) for seed, err in pairs]

    return {
        "kind": "learning",
        "title": "Ablations",
        "epochs": 10,
        "recipes": {
            "abc1234": {
                "date": "2026-01-01",
                "adopted": "knob adopted",
                "defaults": "the old defaults",
                "capsnet_options": "--knob 0",
                "cnn_options": "",
            }
        },
        "sources": {
            "a.json": {"file": "benchmarks/a.json", "commit": "abc1234", "machine": machine},
            "b.json": {"file": "benchmarks/b.json", "commit": "def5678"},
        },
        "sets": {
            "zz before": {
                "recipe": "abc1234",
                "options": "--knob 0",
                "runs": runs("a.json", (0, 0.30), (1, 0.50), (2, 0.40)),
            },
            "aa after": {
                "recipe": "abc1234",
                "options": "--knob 1",
                "description": "ran on a scratch copy",
                "runs": runs("a.json", (0, 0.10), (1, 0.20), (2, 0.30))
                + runs("b.json", (3, 0.60), (4, 0.80)),
            },
            "one seed": {"recipe": "abc1234", "options": "", "runs": runs("a.json", (0, 0.9))},
        },
        "groups": [
            {
                "title": "Knob",
                "default": "`--knob 1`",
                "adopted": "abc1234",
                "description": "Before against after.",
                "sets": ["zz before", "aa after", "one seed"],
            },
            {"title": "Knob again", "sets": ["aa after"]},
        ],
    }


def test_groups_render_a_table_each_in_the_order_listed(tmp_path):
    write(tmp_path / "results" / "ablations.json", grouped_report())
    out = tmp_path / "results.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    text = out.read_text()

    # Table of contents: the file and its groups.
    assert "* [Ablations](#ablations)" in text and "  * [Knob again](#knob-again)" in text
    assert "* `abc1234` (2026-01-01; knob adopted): the old defaults." in text
    assert "With today's options: capsules `--knob 0`." in text
    knob = text[text.index("### Knob\n") : text.index("### Knob again")]
    assert "Default: `--knob 1`, adopted in abc1234.\nBefore against after." in knob
    assert knob.index("| zz before |") < knob.index("| aa after |")  # as listed, not sorted
    header = next(line for line in knob.splitlines() if line.startswith("| set |"))
    assert "| recipe |" in header and "img/s" not in header
    # The seeds all sets of several seeds share (0-2): a column, "—" for a set without them.
    assert "| seeds 0–2 % |" in header
    after = table_row(knob, "aa after")
    assert after[1:3] == ["`abc1234`", "`--knob 1`"]
    # 10, 20, 30, 60, 80 %: sample sd sqrt(3400 / 4) = 29.15; seeds 0-2 alone 20 ± 10.
    assert after[4:6] == ["40.00 ± 29.15", "0: 10.00 · 1: 20.00 · 2: 30.00 · 3: 60.00 · 4: 80.00"]
    assert after[6] == "20.00 ± 10.00"
    assert table_row(knob, "one seed")[6] == "—"
    assert "* aa after: ran on a scratch copy." in knob
    assert (
        "Runs from `benchmarks/a.json` at abc1234: “zz before”, “aa after” (seeds 0–2), "
        "“one seed”; `benchmarks/b.json` at def5678: “aa after” (seeds 3, 4)." in knob
    )
    assert "(sets “aa after”, “one seed”, “zz before”)" in knob  # Old CPU: a.json's machine
    assert "Machines: not recorded (set “aa after”); Old CPU, 2 CPUs (sets" in knob
    # A group of one set's seeds: no shared-seed column.
    again = text[text.index("### Knob again") :]
    assert "seeds 0–2 %" not in again


def test_a_group_naming_an_unknown_set_or_a_repeated_heading_is_an_error(tmp_path, capsys):
    value = grouped_report()
    value["groups"][1]["sets"] = ["missing"]
    write(tmp_path / "results" / "ablations.json", value)
    out = tmp_path / "results.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err

    value["groups"][1] = {"title": "Knob", "sets": ["aa after"]}
    write(tmp_path / "results" / "ablations.json", value)
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 2
    assert "repeated" in capsys.readouterr().err and not out.exists()


def probe_row(cosine: float, **setting) -> dict:
    layers = ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps")
    row = {layer: {"grad_norm": 2.967e-5, "cosine": cosine} for layer in layers}
    return {**setting, **row}


def test_a_gradient_probe_renders_settings_by_layers(tmp_path):
    results = tmp_path / "results"
    # As probe_gradients.py --iters/--powers wrote it: a bare list of rows.
    write(
        results / "a_probe.json",
        [
            probe_row(0.1026, iters=3, likelihood_power=1.0, class_max_assignment=0.2312),
            probe_row(0.88, iters=1, likelihood_power=0.1, class_max_assignment=0.2),
        ],
    )
    # Named settings, the class layer's assignment inside its layer.
    row = probe_row(-0.5, name="tempered", settings={"likelihood_power": 0.1})
    row["class_caps"]["max_assignment"] = 0.5
    write(results / "b_probe.json", {"kind": "gradient_probe", "title": "B", "rows": [row]})
    out = tmp_path / "results.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    cells = table_row(text, "3 iterations, τ 1")
    assert cells[1] == "3.0e-05 (+0.10)" and cells[-1] == "0.23"
    assert table_row(text, "1 iteration, τ 0.1")[1] == "3.0e-05 (+0.88)"
    assert table_row(text, "tempered (likelihood_power 0.1)")[5:] == ["3.0e-05 (-0.50)", "0.50"]


def test_a_routing_check_renders_errors_by_iterations_and_powers(tmp_path):
    results = tmp_path / "results"
    routing = {
        layer: {"max_assignment": 0.5, "uniform": 0.2, "assignment_entropy": 0.5}
        for layer in ("conv_caps1", "conv_caps2", "class_caps")
    }
    run = {
        "checkpoint": "runs/x/last.pt",
        "iters": 3,
        "likelihood_power": 0.1,
        "test_error_by_iters": {"1": 0.8, "3": 0.0712},
        "test_error_by_layer_powers": {"1,1,1": 0.77},
        "routing": routing,
    }
    write(results / "c.json", {"kind": "routing_check", "title": "C", "runs": [run]})
    out = tmp_path / "results.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    cells = table_row(out.read_text(), "`runs/x/last.pt`")
    assert cells[1:] == ["80.00", "7.12", "77.00", "2.5 / 2.5 / 2.5"]

"""Does a trained capsule network route? For each checkpoint: the test error when every layer
routes with fewer iterations than it was trained with (the same weights), the test error with
other E-step likelihood powers τ per layer (`--powers "1,1,1"`: conv caps 1, conv caps 2,
class caps), and each routing layer's mean largest assignment R per child after training
against its value under uniform assignments.

    python benchmarks/routing_check.py runs/routing_study/tempered-seed0/last.pt ... \
        --data data/smallnorb.h5 --iters 1,2,3 --json routing_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from emcaps_cli.capsules.health import ROUTING_LAYERS, capsule_health
from emcaps_cli.checkpoint import load_model
from emcaps_cli.data.cache import load_cache
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.losses import spread_loss
from emcaps_cli.models import build_model


def rebuilt(model: torch.nn.Module, **fields) -> torch.nn.Module:
    """The same weights in a network whose ModelConfig differs by `fields`."""
    other = build_model(dataclasses.replace(model.config, **fields))
    other.load_state_dict(model.state_dict())
    return other.eval()


@torch.no_grad()
def test_error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    wrong = 0
    for start in range(0, len(labels), 100):
        scores = model(images[start : start + 100])
        wrong += int((scores.argmax(1) != labels[start : start + 100]).sum())
    return wrong / len(labels)


def with_powers(model: torch.nn.Module, powers: list[float]) -> torch.nn.Module:
    """The same network routing with likelihood power powers[k] in routing layer k."""
    other = rebuilt(model)
    for name, power in zip(ROUTING_LAYERS, powers, strict=True):
        getattr(other, name).likelihood_power = power
    return other


def check(path, images_u8, labels, iters: list[int], powers: list[list[float]]) -> dict:
    model, _ = load_model(path)
    config = model.config
    images = eval_batch(torch.from_numpy(images_u8), config.channels, order=config.standardize)
    errors = {
        str(k): test_error(rebuilt(model, iters=k, class_iters=None), images, labels)
        for k in iters
        if k <= config.iters
    }
    by_power = {
        ",".join(f"{p:g}" for p in ps): test_error(with_powers(model, ps), images, labels)
        for ps in powers
    }
    health = capsule_health(model, images[:16], labels[:16], spread_loss, 0.9)
    routing = {
        name: {
            "max_assignment": health[name]["max_assignment"],
            "uniform": health[name]["max_assignment_uniform"],
            "assignment_entropy": health[name]["assignment_entropy"],
        }
        for name in ROUTING_LAYERS
    }
    return {"checkpoint": str(path), "iters": config.iters,
            "likelihood_power": config.likelihood_power, "test_error_by_iters": errors,
            "test_error_by_layer_powers": by_power, "routing": routing}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=Path("data/smallnorb.h5"))
    p.add_argument("--iters", default="1,2,3", help="comma-separated iteration counts to try")
    p.add_argument("--limit", type=int, default=1000, help="test images used (the first N)")
    p.add_argument(
        "--powers",
        nargs="*",
        default=[],
        help='E-step τ per routing layer to try, e.g. "1,1,1" "0.1,0.1,1" (conv 1, conv 2, class)',
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    test = load_cache(args.data).test
    n = min(args.limit, len(test.labels))
    images = np.ascontiguousarray(test.images[:n])
    labels = torch.from_numpy(test.labels[:n]).long()
    iters = [int(v) for v in args.iters.split(",")]
    powers = [[float(v) for v in text.split(",")] for text in args.powers]
    if any(len(ps) != len(ROUTING_LAYERS) for ps in powers):
        p.error("--powers: three values each (conv caps 1, conv caps 2, class caps)")
    rows = []
    for path in args.checkpoints:
        row = check(path, images, labels, iters, powers)
        rows.append(row)
        errors = "  ".join(f"{k} it {100 * e:.1f}%" for k, e in row["test_error_by_iters"].items())
        errors += "".join(
            f"  τ {k}: {100 * e:.1f}%" for k, e in row["test_error_by_layer_powers"].items()
        )
        routes = "  ".join(
            f"{name} R {r['max_assignment']:.3f} ({r['max_assignment'] / r['uniform']:.1f}x)"
            for name, r in row["routing"].items()
        )
        print(f"{path}: {errors}\n    {routes}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"kind": "routing_check", "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

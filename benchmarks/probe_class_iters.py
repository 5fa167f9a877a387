"""How much a trained capsule network relies on its class layer's routing: the test error of
each checkpoint evaluated again with the class-capsule layer's routing iterations set to other
counts (the conv-capsule layers and every weight unchanged).

A network trained with 3 iterations whose error stays put at 1 or 2 class iterations uses the
class layer's E-steps little; one whose error jumps has learned weights that only work with
them.

    python benchmarks/probe_class_iters.py --data data/smallnorb.h5 \
        --checkpoints runs/bench_defaults4/capsnet-3iters-seed0/last.pt ... --iters 1,2,3,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_probes import run_probes  # noqa: E402

from emcaps_cli.capsules.layers import ClassCaps  # noqa: E402
from emcaps_cli.checkpoint import load_model  # noqa: E402
from emcaps_cli.errors import EmcapsError  # noqa: E402
from emcaps_cli.evaluation import load_test_images, predict_scores  # noqa: E402


def class_layer(model: torch.nn.Module, checkpoint: str) -> ClassCaps:
    layers = [m for m in model.modules() if isinstance(m, ClassCaps)]
    if len(layers) != 1:
        raise EmcapsError(f"{checkpoint}: expected a capsule network with one class-capsule layer")
    return layers[0]


def probe(checkpoint: str, images, labels: torch.Tensor, iters: list[int]) -> dict:
    """{"trained_iters": n, "test_error": {k: error with k class iterations}} for one run."""
    model, _ = load_model(checkpoint)
    model.eval()
    layer = class_layer(model, checkpoint)
    trained = layer.iters
    errors = {}
    for k in iters:
        layer.iters = k
        predicted = predict_scores(model, images).argmax(dim=1)
        errors[str(k)] = float((predicted != labels).float().mean())
    layer.iters = trained
    return {"checkpoint": checkpoint, "trained_iters": trained, "test_error": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/smallnorb.h5", help="HDF5 cache (its test split)")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="last.pt or best.pt files")
    parser.add_argument("--iters", default="1,2,3,4", help="class-layer iterations to try")
    parser.add_argument("--json", help="write the results here (atomically)")
    args = parser.parse_args(argv)
    iters = [int(k) for k in args.iters.split(",")]
    if min(iters) < 1:
        parser.error("--iters: every count must be at least 1")

    def line(row: dict) -> str:
        cells = "  ".join(f"{k}: {100 * e:5.1f}%" for k, e in row["test_error"].items())
        return f"{row['checkpoint']}  (trained with {row['trained_iters']})  {cells}"

    def probe_one(path: str, split) -> dict:
        return probe(path, split.images, torch.from_numpy(split.labels), iters)

    return run_probes(args.data, args.checkpoints, load_test_images, probe_one, line, args.json)


if __name__ == "__main__":
    sys.exit(main())

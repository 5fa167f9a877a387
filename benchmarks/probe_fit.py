"""Does a trained network underfit, or fail to generalise, and how far does a shift of the
crop move its error? For each checkpoint: the error on the centre crops of the images it
trained on, of its validation images and of the test set (every test row the run used, novel
viewpoints included for a --split run), then the test error with the 32×32 crop moved away
from the centre (the four half-way diagonal offsets of multi-crop testing and the four
corners of the 48×48 image, the largest shifts random-crop training sees).

A network whose training-image error is about its test error has not fitted its data (more
training or a better optimiser would help); one with a low training error and a high test
error has fitted the training instances and fails on new ones.

    python benchmarks/probe_fit.py --data data/smallnorb.h5 \
        --checkpoints runs/bench_defaults4/capsnet-3iters-seed0/last.pt ... --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_probes import run_probes  # noqa: E402

from emcaps_cli.checkpoint import load_model  # noqa: E402
from emcaps_cli.config import TrainConfig  # noqa: E402
from emcaps_cli.data.cache import load_cache  # noqa: E402
from emcaps_cli.data.transforms import CROP_SIZE  # noqa: E402
from emcaps_cli.errors import EmcapsError  # noqa: E402
from emcaps_cli.evaluation import predict_scores  # noqa: E402
from emcaps_cli.training.data import config_split  # noqa: E402


def crop_offsets(image_size: int, size: int = CROP_SIZE) -> dict[str, tuple[int, int]]:
    """(top, left) of the crops probed, by name: the centre, the four half-way diagonal offsets
    (the multi-crop test's) and the four corners."""
    far, c = image_size - size, (image_size - size) // 2
    d = c // 2
    return {
        "centre": (c, c),
        "half-way, top left": (c - d, c - d),
        "half-way, top right": (c - d, c + d),
        "half-way, bottom left": (c + d, c - d),
        "half-way, bottom right": (c + d, c + d),
        "corner, top left": (0, 0),
        "corner, top right": (0, far),
        "corner, bottom left": (far, 0),
        "corner, bottom right": (far, far),
    }


def error_rate(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, offset: tuple[int, int]
) -> float:
    """Share of uint8 images (N, 2, H, W) misclassified from the crop at `offset`."""
    if len(labels) == 0:
        return float("nan")
    predicted = predict_scores(model, images, offset=offset).argmax(dim=1).numpy()
    return float(np.mean(predicted != labels))


def probe(checkpoint: str, cache) -> dict:
    """The errors of one checkpoint: centre crops of its train / validation / test rows, and
    the test set at every offset of `crop_offsets`."""
    model, data = load_model(checkpoint)
    if not isinstance(data.get("train_config"), dict) or "seed" not in data["train_config"]:
        raise EmcapsError(f"{checkpoint}: holds no training config (not written by emcaps train)")
    config = TrainConfig.from_dict(data["train_config"])
    rows = config_split(config, cache)
    offsets = crop_offsets(cache.image_size, int(model.config.input_size))
    centre = offsets["centre"]
    train, test = cache.train, cache.test
    test_images, test_labels = test.images[rows.test], test.labels[rows.test]
    return {
        "checkpoint": checkpoint,
        "model": model.config.model,
        "centre_error": {
            "train": error_rate(model, train.images[rows.train], train.labels[rows.train], centre),
            "validation": error_rate(
                model, train.images[rows.validation], train.labels[rows.validation], centre
            ),
            "test": error_rate(model, test_images, test_labels, centre),
        },
        "test_error_by_crop": {
            name: error_rate(model, test_images, test_labels, offset)
            for name, offset in offsets.items()
        },
    }


def _line(row: dict) -> str:
    c = row["centre_error"]
    shifted = row["test_error_by_crop"]
    half = np.mean([v for k, v in shifted.items() if k.startswith("half-way")])
    corner = np.mean([v for k, v in shifted.items() if k.startswith("corner")])
    return (
        f"{row['checkpoint']}  centre: train {100 * c['train']:.1f}%  validation "
        f"{100 * c['validation']:.1f}%  test {100 * c['test']:.1f}%  |  test, half-way crops "
        f"{100 * half:.1f}%  corners {100 * corner:.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/smallnorb.h5", help="the HDF5 cache the runs used")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="last.pt or best.pt files")
    parser.add_argument("--json", help="write the results here (atomically)")
    args = parser.parse_args(argv)
    return run_probes(args.data, args.checkpoints, load_cache, probe, _line, args.json)


if __name__ == "__main__":
    sys.exit(main())

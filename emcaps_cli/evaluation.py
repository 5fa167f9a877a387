"""Test-set evaluation (section 5, Table 2): centre-crop or multi-crop error, broken down by class,
azimuth and elevation, and for viewpoint-split checkpoints by familiar and novel viewpoints.

Images go through `eval_batch` exactly as in training (per-image standardisation, then a 32x32
crop); `class_scores` is the one forward pass every prediction uses, so `emcaps attack` at ε = 0
reproduces `emcaps evaluate` image for image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from emcaps_cli.data.cache import Split, load_split, require_image_size
from emcaps_cli.data.smallnorb import CATEGORIES
from emcaps_cli.data.transforms import CROP_SIZE, eval_batch, multicrop_offsets
from emcaps_cli.data.viewpoints import azimuth_degrees, elevation_degrees, familiar_mask
from emcaps_cli.defaults import EVAL_BATCH_SIZE
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.threads import keep_fair

Progress = Callable[[int], None]
DEFAULT_BATCH_SIZE = EVAL_BATCH_SIZE


def load_test_images(path: str | os.PathLike, limit: int | None = None) -> Split:
    """The test images of an HDF5 cache; with `limit`, N evenly spaced ones (indices
    round(linspace(0, total − 1, N))). Files are often sorted by class and viewpoint, so the
    first N would all be one class; evenly spaced ones cover every class and viewpoint, and
    evaluate and attack pick the same images."""
    if limit is not None and limit < 1:
        raise EmcapsError(f"--limit {limit}: expected a positive number of images")
    split = load_split(path, "test")
    require_image_size(path, split.images.shape[-1], CROP_SIZE)
    total = len(split.labels)
    if total == 0:
        raise EmcapsError(f"{path}: the test split holds no images")
    if limit is None or limit >= total:
        rows = np.arange(total)
    else:
        rows = np.linspace(0, total - 1, num=limit).round().astype(np.int64)
    return Split(
        images=np.asarray(split.images[rows]),
        labels=np.asarray(split.labels[rows], dtype=np.int64),
        info=np.asarray(split.info[rows], dtype=np.int64),
    )


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `batch_size` covering range(n); the one batching rule."""
    if batch_size < 1:
        raise EmcapsError(f"--batch-size {batch_size}: expected a positive number")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def model_channels(model: nn.Module) -> int:
    return int(model.config.channels)


def model_standardize(model: nn.Module) -> str:
    """Where the network's input is standardised (ModelConfig.standardize)."""
    return str(model.config.standardize)


def class_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Standardised crops (N, channels, 32, 32) -> class scores (N, K), without autograd."""
    with torch.no_grad():
        return model(x)


def predict_scores(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int = DEFAULT_BATCH_SIZE,
    multicrop: bool = False,
    progress: Progress | None = None,
    offset: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Class scores (N, K) on the CPU for uint8 images (N, 2, 48, 48).

    Centre crop (or the single crop at (top, left) `offset`): the model's raw scores.
    Multi-crop: the mean over the crops of `multicrop_offsets()` of the class activations
    (capsules) or of the softmax probabilities (CNN: logits are not comparable across crops,
    probabilities are).
    """
    if multicrop and offset is not None:
        raise ValueError("predict_scores: give multicrop or one crop offset, not both")
    device = next(model.parameters()).device
    channels = model_channels(model)
    size = int(model.config.input_size)  # the crop the network was built for
    order = model_standardize(model)
    offsets = multicrop_offsets(images.shape[-1], size) if multicrop else [offset]
    out = []
    for sl in batch_slices(len(images), batch_size):
        if device.type == "cpu":
            keep_fair()  # threads sized to the CPUs other processes leave free
        batch = torch.from_numpy(np.ascontiguousarray(images[sl])).to(device)
        total = None
        for at in offsets:
            x = eval_batch(batch, channels, size=size, offset=at, order=order)  # (B, C, s, s)
            scores = class_scores(model, x)  # (B, K)
            if multicrop and model.score_kind == "logit":
                scores = scores.softmax(dim=1)
            total = scores if total is None else total + scores
        out.append((total / len(offsets)).float().cpu())
        if progress is not None:
            progress(batch.shape[0])
    return torch.cat(out)


def _rate(errors: int, n: int) -> dict[str, Any]:
    errors, n = int(errors), int(n)
    return {
        "n": n,
        "errors": errors,
        "error_rate": errors / n if n else None,
        "accuracy": (n - errors) / n if n else None,
    }


def _by_code(
    wrong: np.ndarray, codes: np.ndarray, name: str, degrees: Callable[[int], int]
) -> list[dict[str, Any]]:
    """Error rate per viewpoint code present, keyed by the angle in degrees."""
    return [
        {name: degrees(int(code)), **_rate(wrong[codes == code].sum(), (codes == code).sum())}
        for code in np.unique(codes)
    ]


def summarize(
    predictions: np.ndarray, labels: np.ndarray, info: np.ndarray, split: str = "full"
) -> dict[str, Any]:
    """Error rates of predictions (N,) against labels (N,), overall and by class / viewpoint.

    `info` rows are (instance, elevation, azimuth, lighting). For a checkpoint trained on a
    viewpoint split ("azimuth" or "elevation") the result also holds "familiar" and "novel".
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    wrong = predictions != labels
    k = len(CATEGORIES)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    result: dict[str, Any] = {
        **_rate(wrong.sum(), len(labels)),
        "per_class": [
            {"label": c, "class": name, **_rate(wrong[labels == c].sum(), (labels == c).sum())}
            for c, name in enumerate(CATEGORIES)
        ],
        "confusion_labels": list(CATEGORIES),
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
        "by_azimuth": _by_code(wrong, info[:, 2], "azimuth", azimuth_degrees),
        "by_elevation": _by_code(wrong, info[:, 1], "elevation", elevation_degrees),
        "split": split,
    }
    if split != "full":
        familiar = familiar_mask(info, split)
        result["familiar"] = _rate(wrong[familiar].sum(), familiar.sum())
        result["novel"] = _rate(wrong[~familiar].sum(), (~familiar).sum())
    return result


def checkpoint_split(ckpt: dict[str, Any]) -> str:
    """The viewpoint split a checkpoint was trained on; "full" when the writer did not say."""
    return str(ckpt.get("split") or "full")


def evaluate_model(
    model: nn.Module,
    data: Split,
    split: str = "full",
    batch_size: int = DEFAULT_BATCH_SIZE,
    multicrop: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Predict every image of `data` and summarise the errors (see `summarize`)."""
    scores = predict_scores(model, data.images, batch_size, multicrop, progress)
    result = summarize(scores.argmax(dim=1).numpy(), data.labels, data.info, split)
    result["multicrop"] = multicrop
    size = int(model.config.input_size)
    result["crops"] = len(multicrop_offsets(data.images.shape[-1], size)) if multicrop else 1
    return result

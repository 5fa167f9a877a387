"""Tiny caches, checkpoints and handmade models for the evaluation and attack tests."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch
from torch import nn

from emcaps_cli.checkpoint import save_checkpoint
from emcaps_cli.config import ModelConfig, default_loss
from emcaps_cli.data.transforms import train_batch
from emcaps_cli.defaults import DEFAULT_STANDARDIZE
from emcaps_cli.losses import get_loss
from emcaps_cli.models import build_model


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learnable fake smallNORB: class c is a bright blob at a class-specific spot, plus noise.

    Returns uint8 images (n, 2, 48, 48), int64 labels (n,), int64 info (n, 4) cycling through
    every azimuth code (0, 2, .., 34) and elevation (0..8).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 5
    images = rng.integers(0, 100, size=(n, 2, 48, 48)).astype(np.int64)
    spots = [(12, 12), (12, 28), (20, 20), (28, 12), (28, 28)]
    for i, c in enumerate(labels):
        top, left = spots[c]
        images[i, :, top : top + 8, left : left + 8] += 35
    info = np.stack(
        [
            np.arange(n) % 10,
            (np.arange(n) // 5) % 9,
            2 * ((np.arange(n) // 3) % 18),
            np.arange(n) % 6,
        ],
        axis=1,
    )
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64), info.astype(np.int64)


def write_cache(path: Path, n_test: int = 60, n_train: int = 100) -> Path:
    """An HDF5 cache in the layout of emcaps_cli.data.cache (format_version 1)."""
    with h5py.File(path, "w") as h5:
        h5.attrs["format_version"] = 1
        h5.attrs["image_size"] = 48
        for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
            images, labels, info = fake_split(n, seed)
            h5[f"{split}/images"] = images
            h5[f"{split}/labels"] = labels
            h5[f"{split}/info"] = info
    return path


def make_checkpoint(
    path: Path,
    model: str = "cnn",
    train_steps: int = 0,
    seed: int = 0,
    split: str | None = None,
    loss: str | None = None,
    **config: object,
) -> Path:
    """Save a `build_model` network, optionally trained for a few steps on fake data."""
    torch.manual_seed(seed)
    net = build_model(ModelConfig(model=model, **config))
    if train_steps:
        images, labels, _ = fake_split(100, seed=1)
        loss_fn = get_loss(loss or default_loss(model))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(train_steps):
            index = torch.randint(0, len(labels), (32,), generator=generator)
            batch = torch.from_numpy(images[index.numpy()])
            x = train_batch(batch, net.config.channels, generator, order=net.config.standardize)
            optimizer.zero_grad()
            loss_fn(net(x), torch.from_numpy(labels[index.numpy()]), 0.9).backward()
            optimizer.step()
        net.eval()
    payload: dict = {"model_config": net.config.to_dict(), "model_state": net.state_dict()}
    if split is not None:
        payload["split"] = split
    if loss is not None:
        payload["train_config"] = {"loss": loss}
    save_checkpoint(path, payload)
    return path


class LinearScores(nn.Module):
    """scores = W flatten(x) + b: the input gradient of any loss is known in closed form."""

    score_kind = "logit"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        channels: int = 2,
        standardize: str = DEFAULT_STANDARDIZE,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, C*32*32)
        self.bias = nn.Parameter(bias)  # (K,)
        self.config = SimpleNamespace(
            channels=channels,
            num_classes=weight.shape[0],
            model="lin",
            input_size=32,
            standardize=standardize,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias  # (N, K)


class OvershootBump(nn.Module):
    """Class 1 wins only near mean(x) = 0.5; from mean(x) = 0 its score grows with mean(x).

    One FGSM step of ε = 1 jumps past the bump (still class 0); BIM with small steps stops on it.
    """

    score_kind = "logit"

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(channels=2, num_classes=5, model="bump", input_size=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(1, 2, 3))  # (N,)
        bump = 1 - 100 * (s - 0.5) ** 2
        rest = torch.full_like(s, -10.0)
        return torch.stack([torch.zeros_like(s), bump, rest, rest, rest], dim=1)  # (N, 5)


@functools.cache
def shared_files() -> dict[str, Path]:
    """Made once per test session and shared by the test modules (trained models are slow):
    a 30-image cache, a CNN trained for 20 steps ("cnn", about 90% accurate on the cache), an
    untrained CNN ("other") and an untrained CNN tagged with the azimuth split ("azimuth")."""
    root = Path(tempfile.mkdtemp(prefix="emcaps-eval-"))
    atexit.register(shutil.rmtree, root, True)
    return {
        "cache": write_cache(root / "cache.h5", n_test=30),
        "cnn": make_checkpoint(root / "cnn.pt", train_steps=20, seed=0),
        "other": make_checkpoint(root / "other.pt", seed=5),
        "azimuth": make_checkpoint(root / "azimuth.pt", seed=6, split="azimuth"),
    }


class RunsCode:
    """Unpickling this would call os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save(
        {"format": "emcaps-checkpoint", "format_version": 1, "payload": RunsCode(marker)}, path
    )
    return path

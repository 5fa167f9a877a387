"""The images a run trains, validates and tests on: the split into rows, the per-epoch
shuffling, and the whole chosen set on the training device as uint8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emcaps_cli.config import TrainConfig
from emcaps_cli.data.cache import load_cache, require_image_size
from emcaps_cli.data.viewpoints import familiar_mask
from emcaps_cli.errors import EmcapsError
from emcaps_cli.training.rng import Stream, derive_seed


@dataclass
class SplitIndices:
    """Row indices into the cache: training and validation rows of /train, test rows of /test,
    and which test rows have familiar viewpoints (all of them for split "full")."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    test_familiar: np.ndarray  # bool, aligned with `test`

    def sizes(self) -> dict[str, int]:
        """Image counts, as config.json records them."""
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "test_familiar": int(self.test_familiar.sum()),
        }


def split_indices(
    train_info: np.ndarray,
    test_info: np.ndarray,
    split: str = "full",
    validation_fraction: float = 0.1,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> SplitIndices:
    """Choose the rows a run trains, validates and tests on.

    Training pool: /train rows with familiar viewpoints for `split` (section 5.1), optionally
    a random `limit_train` of them; a random `validation_fraction` of the pool is held out.
    Test: all /test rows (or a random `limit_test`), each marked familiar or novel.
    """
    pool = np.flatnonzero(familiar_mask(train_info, split))
    if len(pool) == 0:
        raise EmcapsError(f"--split {split}: no training image has a familiar viewpoint")
    rng = np.random.default_rng(derive_seed(seed, Stream.SPLIT))
    if limit_train is not None and limit_train < len(pool):
        pool = np.sort(rng.choice(pool, size=limit_train, replace=False))
    shuffled = rng.permutation(pool)
    n_val = int(round(validation_fraction * len(pool)))
    if len(pool) - n_val < 1:
        raise EmcapsError(
            f"--validation-fraction {validation_fraction}: leaves no training image "
            f"(pool of {len(pool)})"
        )
    validation, train = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
    test = np.arange(len(test_info))
    if limit_test is not None and limit_test < len(test):
        subset = np.random.default_rng(derive_seed(seed, Stream.TEST_SUBSET))
        test = np.sort(subset.choice(test, limit_test, False))
    return SplitIndices(train, validation, test, familiar_mask(test_info[test], split))


def config_split(config: TrainConfig, cache: Any) -> SplitIndices:
    """The rows a run of `config` uses in a loaded cache (`data.cache.load_cache`)."""
    return split_indices(
        cache.train.info,
        cache.test.info,
        config.split,
        config.validation_fraction,
        config.seed,
        config.limit_train,
        config.limit_test,
    )


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffling of epoch `epoch`: a function of (seed, epoch) only, the same on every rank,
    so resuming needs no shuffling state."""
    gen = torch.Generator().manual_seed(derive_seed(seed, Stream.EPOCH_ORDER, epoch))
    return torch.randperm(n, generator=gen)


@dataclass
class LabelledImages:
    """uint8 images (N, 2, H, W), labels (N,) and a familiar-viewpoint mask (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    familiar: torch.Tensor


@dataclass
class DeviceData:
    """A run's three sets on the training device, and their sizes for config.json."""

    train: LabelledImages
    validation: LabelledImages
    test: LabelledImages
    sizes: dict[str, int]


def load_device_data(config: TrainConfig, device: torch.device) -> DeviceData:
    """Read the cache `config.data`, choose the run's rows, move them to `device` as uint8.

    Raises EmcapsError when the cache's images are smaller than the model's input crop."""
    cache = load_cache(config.data)
    require_image_size(config.data, cache.image_size, config.model.input_size)
    rows = config_split(config, cache)

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    def rows_of(split: Any, index: np.ndarray, familiar: np.ndarray | None) -> LabelledImages:
        mask = np.ones(len(index), dtype=bool) if familiar is None else familiar
        return LabelledImages(
            on_device(split.images[index]), on_device(split.labels[index]), on_device(mask)
        )

    return DeviceData(
        train=rows_of(cache.train, rows.train, None),
        validation=rows_of(cache.train, rows.validation, None),
        test=rows_of(cache.test, rows.test, rows.test_familiar),
        sizes=rows.sizes(),
    )

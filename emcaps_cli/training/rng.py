"""Random streams of a training run: seeds derived per purpose and rank, and their state.

Every stream gets its own seed from `derive_seed(seed, Stream.X, ...)`, so no two share one.
The Stream values are part of a run's identity: changing one changes every run's numbers.
States are stored as tensors and plain types, so checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import enum
import random
from typing import Any

import numpy as np
import torch


class Stream(enum.IntEnum):
    """The purpose a seed is derived for (the second part of every `derive_seed` call)."""

    SPLIT = 1  # training pool subset and validation hold-out (split_indices)
    TEST_SUBSET = 2  # the --limit-test subset of /test
    EPOCH_ORDER = 3  # the shuffling of each epoch (epoch_permutation)
    TORCH = 4  # the global torch generator: dropout, per rank
    NUMPY = 5  # numpy's global generator, per rank
    PYTHON = 6  # python's `random`, per rank
    AUGMENT = 7  # the augmentation generator on the training device, per rank


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so independent streams never share a seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_rngs(seed: int, rank: int, augment: torch.Generator, salt: int = 0) -> None:
    """Per-rank streams for dropout (global torch), numpy, python random and augmentation."""
    torch.manual_seed(derive_seed(seed, Stream.TORCH, rank, salt))
    np.random.seed(derive_seed(seed, Stream.NUMPY, rank, salt) % 2**32)
    random.seed(derive_seed(seed, Stream.PYTHON, rank, salt))
    augment.manual_seed(derive_seed(seed, Stream.AUGMENT, rank, salt))


def rng_state(augment: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This process's generators (torch CPU and CUDA, augmentation, numpy, python)."""
    np_key, np_state, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "device_type": device.type,
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augment.get_state(),
        "numpy": {
            "key": np_key,
            "state": torch.from_numpy(np_state.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any], augment: torch.Generator, device: torch.device) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and state["torch_cuda"] is not None:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    augment.set_state(state["augment"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["key"],
            n["state"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))

"""The viewpoint protocol of section 5.1: which images are familiar and which are novel.

`info` rows are (instance, elevation, azimuth, lighting) as in the raw smallNORB files:
azimuth codes 0, 2, ..., 34 mean 0°, 20°, ..., 340°; elevation codes 0..8 mean 30°..70°
(`azimuth_degrees`, `elevation_degrees`).
"""

from __future__ import annotations

import numpy as np

from emcaps_cli.defaults import SPLITS
from emcaps_cli.errors import EmcapsError


def azimuth_degrees(code: int) -> int:
    """Azimuth code a (0, 2, ..., 34) -> 10 a degrees."""
    return 10 * int(code)


def elevation_degrees(code: int) -> int:
    """Elevation code e (0..8) -> 30 + 5 e degrees."""
    return 30 + 5 * int(code)


# Azimuths 300°, 320°, 340°, 0°, 20°, 40°: codes 30, 32, 34, 0, 2, 4.
FAMILIAR_AZIMUTHS = (30, 32, 34, 0, 2, 4)
# The three smallest elevations, 30°–40°.
FAMILIAR_ELEVATIONS = (0, 1, 2)


def familiar_mask(info: np.ndarray, split: str) -> np.ndarray:
    """Boolean (N,) mask of the viewpoints a model trained on `split` has seen."""
    if split == "full":
        return np.ones(len(info), dtype=bool)
    if split == "azimuth":
        return np.isin(info[:, 2], FAMILIAR_AZIMUTHS)
    if split == "elevation":
        return np.isin(info[:, 1], FAMILIAR_ELEVATIONS)
    raise EmcapsError(f"--split {split}: expected one of {', '.join(SPLITS)}")

"""Defaults and choice names that `--help` shows, in a leaf that imports nothing heavy.

The command modules read these when their options are defined, so `emcaps --help` and each
command's `--help` never import torch, numpy or h5py. The library modules that use a value
import it from here, so each default is written once.
"""

from __future__ import annotations

CACHE_IMAGE_SIZE = 48  # side of the downsampled images `emcaps prepare` writes
ALL_VIEWS = 18 * 9 * 6  # 972 (azimuth, elevation, lighting) combinations per smallNORB instance
EVAL_BATCH_SIZE = 128  # evaluate and attack batch alike, so ε = 0 reproduces evaluate exactly
LOSSES = ("spread", "margin", "cross-entropy")
SPLITS = ("full", "azimuth", "elevation")  # viewpoint splits of training (section 5.1)
PARAMETRISATIONS = ("paper", "released")

DEFAULT_EPS = tuple(round(0.05 * i, 2) for i in range(11))  # Fig. 3 left: 0 .. 0.5
DEFAULT_TARGETED_EPS = tuple(round(0.05 * i, 2) for i in range(6))  # Fig. 3 right: 0 .. 0.25
DEFAULT_STEPS = 10
# BIM default step size α = 2.5 ε / steps: the iterate can cross the whole ε-ball and then
# move along its faces (the rule of Madry et al. 2018).
STEP_SIZE_FACTOR = 2.5

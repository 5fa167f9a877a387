"""Defaults and choices that `--help` shows, in a leaf that imports nothing heavy.

The command modules read these when their options are defined, so `emcaps --help` and each
command's `--help` never import torch, numpy or h5py. The library modules that use a value
import it from here, so each default and each set of choices is written once.

Every fixed set of choices is a `Choice` enum (str-valued, so a member equals its value); the
command line parses options into members and hands the library their `.value`. The tuples
below (`LOSSES`, `SPLITS`, ...) are the same values for the library's own checks.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):  # noqa: UP042 (str mixin: the value prints as itself)
    """A fixed set of option values: str-valued, printed as the value itself."""

    def __str__(self) -> str:
        return self.value


class Model(Choice):
    capsnet = "capsnet"  # the capsule network of Fig. 1
    cnn = "cnn"  # the baseline CNN of section 5


class Pose(Choice):
    matrix = "matrix"  # 4x4 pose matrices, 4x4 transformation matrices W
    vector = "vector"  # 16-vector poses, 16x16 W


class Routing(Choice):
    exact = "exact"  # a child's assignments normalised over all parents that hold it
    patch = "patch"  # each K x K patch routed on its own


class Parametrisation(Choice):
    paper = "paper"  # β_u, β_a as in Procedure 1
    released = "released"  # the authors' released code


class Standardize(Choice):
    """Where an image is standardised to zero mean and unit variance (data/transforms.py)."""

    image = "image"  # the 48x48 image, before cropping; then brightness/contrast (section 5)
    crop = "crop"  # the 32x32 crop the network reads (the authors' released code)


class Loss(Choice):
    spread = "spread"
    margin = "margin"
    cross_entropy = "cross-entropy"


class PresetName(Choice):
    """Named recipes, one TOML file each in emcaps_cli/presets/."""

    tempered = "tempered"  # emcaps' recipe: tempered EM routing (τ = 0.1) — not Procedure 1
    paper = "paper"  # Procedure 1 and section 5; the released code's values where it is silent
    released = "released"  # the authors' released code as far as emcaps expresses it


class LrSchedule(Choice):
    """How the learning rate falls from epoch to epoch (training/schedule.py)."""

    exponential = "exponential"  # lr · lr_decay^epoch
    cosine = "cosine"  # lr · ½(1 + cos(π · epoch / anneal epochs))


class ViewpointSplit(Choice):
    """Viewpoint splits of training (section 5.1)."""

    full = "full"
    azimuth = "azimuth"
    elevation = "elevation"


class Kernels(Choice):
    """Which code runs the routing's vote-sized work (emcaps_cli/routing/c/ffi.py)."""

    auto = "auto"
    triton = "triton"
    c = "c"
    torch = "torch"


class AttackMethod(Choice):
    fgsm = "fgsm"  # Goodfellow et al. 2014
    bim = "bim"  # Kurakin et al. 2016


def values(choice: type[Choice]) -> tuple[str, ...]:
    """The values of a Choice enum, in definition order."""
    return tuple(member.value for member in choice)


MODELS = values(Model)
POSES = values(Pose)
ROUTINGS = values(Routing)
PARAMETRISATIONS = values(Parametrisation)
STANDARDIZES = values(Standardize)
# ModelConfig's standardisation (docs/model.md, "Input standardisation")
DEFAULT_STANDARDIZE = Standardize.crop.value
LOSSES = values(Loss)
LR_SCHEDULES = values(LrSchedule)
PRESETS = values(PresetName)
SPLITS = values(ViewpointSplit)
METHODS = values(AttackMethod)

DEFAULT_DATA = "data/smallnorb.h5"  # the HDF5 cache `emcaps prepare` writes, training reads
CACHE_IMAGE_SIZE = 48  # side of the downsampled images `emcaps prepare` writes
ALL_VIEWS = 18 * 9 * 6  # 972 (azimuth, elevation, lighting) combinations per smallNORB instance
EVAL_BATCH_SIZE = 128  # evaluate and attack batch alike, so ε = 0 reproduces evaluate exactly

DEFAULT_EPS = tuple(round(0.05 * i, 2) for i in range(11))  # Fig. 3 left: 0 .. 0.5
DEFAULT_TARGETED_EPS = tuple(round(0.05 * i, 2) for i in range(6))  # Fig. 3 right: 0 .. 0.25
DEFAULT_STEPS = 10
# BIM default step size α = 2.5 ε / steps: the iterate can cross the whole ε-ball and then
# move along its faces (the rule of Madry et al. 2018).
STEP_SIZE_FACTOR = 2.5

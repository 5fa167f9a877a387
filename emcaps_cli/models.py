"""Model configuration and construction: the one place that turns a config into a network.

Every network maps standardized images (N, channels, 32, 32) to class scores (N, num_classes):
the capsule network returns class-capsule activations in (0, 1), the CNN returns logits.
`model.score_kind` says which ("activation" or "logit"). Prediction is the argmax either way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emcaps_cli.defaults import PARAMETRISATIONS
from emcaps_cli.errors import EmcapsError

if TYPE_CHECKING:
    from torch import nn

MODELS = ("capsnet", "cnn")
# Values of later fields for configs (checkpoints) written before the field existed.
LEGACY_DEFAULTS = {"var_floor": 1e-4, "likelihood_power": 1.0}
POSES = ("matrix", "vector")
ROUTINGS = ("exact", "patch")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every checkpoint.

    arch            (A, B, C, D) of Fig. 1: ReLU-conv channels; primary, conv1, conv2 capsule types
    iters           EM routing iterations (Table 1: 1, 2, 3, 5)
    pose            "matrix": 4x4 poses and 4x4 W; "vector": 16-vector poses and 16x16 W (Table 1)
    coord_add       Coordinate Addition in the class-capsule layer (section 4)
    channels        2: both stereo views as channels (as the authors' released code);
                    1: the left view only
    routing         "exact": a child's assignments are normalised over every parent whose receptive
                    field holds it (section 4); "patch": each K x K patch routed on its own
    final_lambda    λ_max of the inverse-temperature schedule λ_t = λ_max (1 - 0.95^(t+1))
    var_floor       added to every σ² in the M-step, in squared pose units (docs/model.md)
    likelihood_power τ of the E-step: R_ij ∝ a_j p_ij^τ; 1 is Procedure 1, τ < 1 tempers the
                    assignments (docs/model.md)
    parametrisation how β_u, β_a and λ enter the routing and are initialised: "paper" or
                    "released" (the authors' code; capsules/parametrisation.py)
    """

    model: str = "capsnet"
    arch: tuple[int, int, int, int] = (32, 32, 32, 32)
    iters: int = 3
    pose: str = "matrix"
    coord_add: bool = True
    channels: int = 2
    routing: str = "exact"
    final_lambda: float = 0.01
    var_floor: float = 0.1
    likelihood_power: float = 0.1
    parametrisation: str = "paper"
    num_classes: int = 5
    input_size: int = 32

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise EmcapsError(f"--model {self.model}: expected one of {', '.join(MODELS)}")
        if self.pose not in POSES:
            raise EmcapsError(f"--pose {self.pose}: expected one of {', '.join(POSES)}")
        if self.parametrisation not in PARAMETRISATIONS:
            raise EmcapsError(
                f"--parametrisation {self.parametrisation}: expected one of "
                + ", ".join(PARAMETRISATIONS)
            )
        if self.routing not in ROUTINGS:
            raise EmcapsError(f"--routing {self.routing}: expected one of {', '.join(ROUTINGS)}")
        if len(self.arch) != 4 or any(int(v) < 1 for v in self.arch):
            raise EmcapsError(f"--arch {self.arch}: expected four positive integers A,B,C,D")
        if self.iters < 1:
            raise EmcapsError(f"--iters {self.iters}: need at least one routing iteration")
        if not (math.isfinite(self.var_floor) and self.var_floor > 0):
            raise EmcapsError(f"--var-floor {self.var_floor}: expected a positive number")
        if not (math.isfinite(self.likelihood_power) and self.likelihood_power > 0):
            raise EmcapsError(
                f"--likelihood-power {self.likelihood_power}: expected a positive number"
            )
        if self.channels not in (1, 2):
            raise EmcapsError(f"--channels {self.channels}: expected 1 or 2")
        object.__setattr__(self, "arch", tuple(int(v) for v in self.arch))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = list(self.arch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EmcapsError(f"model config has unknown keys: {', '.join(sorted(unknown))}")
        # Fields added after a config was written take the value those runs used.
        d = {**LEGACY_DEFAULTS, **d}
        if "arch" in d:
            d["arch"] = tuple(d["arch"])
        return cls(**d)


def parse_arch(text: str) -> tuple[int, int, int, int]:
    """Parse `--arch A,B,C,D` (e.g. "32,32,32,32" or "64,8,16,16")."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EmcapsError(f"--arch {text!r}: expected four integers A,B,C,D") from None
    if len(values) != 4 or min(values) < 1:
        raise EmcapsError(f"--arch {text!r}: expected four positive integers A,B,C,D")
    return values  # type: ignore[return-value]


def build_model(config: ModelConfig) -> nn.Module:
    """Build the network a config describes (parameters on the CPU, float32)."""
    if config.model == "cnn":
        from emcaps_cli.baseline import BaselineCNN

        return BaselineCNN(config)
    from emcaps_cli.capsules.network import CapsNet

    return CapsNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Named recipes: one TOML file per preset in this folder, every value a ModelConfig or
TrainConfig field.

    tempered   emcaps' own recipe (the defaults): tempered EM routing, τ = 0.1, σ² floor 0.1
    paper      Procedure 1 and section 5 as written; the released code's values where the
               paper is silent
    released   the authors' released code (google-research capsule_em) as far as emcaps
               expresses it

A preset fills the fields it names; options given on the command line override it
(`emcaps train --preset paper --lr 3e-3`). A leaf module like config.py: no torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError

PRESETS = ("tempered", "paper", "released")
DEFAULT_PRESET = "tempered"


@dataclass(frozen=True)
class Preset:
    """A named recipe: description, and the ModelConfig / TrainConfig fields it sets."""

    name: str
    description: str
    model: dict[str, Any]
    train: dict[str, Any]


def _check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - {"model"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EmcapsError(f"preset {where}: unknown {cls.__name__} fields {', '.join(unknown)}")


def load_preset(name: str) -> Preset:
    """Read and check preset `name` (one of PRESETS)."""
    if name not in PRESETS:
        raise EmcapsError(f"--preset {name}: expected one of {', '.join(PRESETS)}")
    text = resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    extra = sorted(set(data) - {"description", "model", "train"})
    if extra:
        raise EmcapsError(f"preset {name}: unknown sections {', '.join(extra)}")
    model, train = dict(data.get("model", {})), dict(data.get("train", {}))
    _check_fields(ModelConfig, model, name)
    _check_fields(TrainConfig, train, name)
    return Preset(name, str(data.get("description", "")), model, train)


def routing_rule(config: ModelConfig) -> str:
    """One line naming the routing a network runs: Procedure 1 or the tempered E-step."""
    if config.model != "capsnet":
        return "no routing (CNN)"
    if config.likelihood_power == 1.0:
        return f"EM routing, Procedure 1 (σ² floor {config.var_floor:g})"
    return (
        f"tempered EM routing (τ = {config.likelihood_power:g}, σ² floor {config.var_floor:g})"
        " — not the paper's Procedure 1"
    )

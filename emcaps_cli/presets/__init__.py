"""Named recipes: one TOML file per preset in this folder, every value a ModelConfig or
TrainConfig field.

    tempered   emcaps' own recipe (the defaults): tempered EM routing, τ = 0.1, σ² floor 0.1
    paper      Procedure 1 and section 5 as written; the released code's values where the
               paper is silent
    released   the authors' released code (google-research capsule_em) as far as emcaps
               expresses it

A file has a `description`, a `[model]` table (ModelConfig fields), a `[train]` table
(TrainConfig fields for either network) and a `[capsnet]` table (TrainConfig fields that
apply to the capsule network only, such as its learning rate: the CNN keeps its own). A preset
fills the fields it names; options given on the command line override it
(`emcaps train --preset paper --lr 3e-3`). A leaf module like config.py: no torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.defaults import PRESETS
from emcaps_cli.errors import EmcapsError


@dataclass(frozen=True)
class Preset:
    """A named recipe: description, and the ModelConfig / TrainConfig fields it sets."""

    name: str
    description: str
    model: dict[str, Any]
    train: dict[str, Any]
    capsnet: dict[str, Any]  # TrainConfig fields for the capsule network only

    def train_fields(self, model: str) -> dict[str, Any]:
        """The TrainConfig fields this preset sets for a network of kind `model`."""
        return {**self.train, **(self.capsnet if model == "capsnet" else {})}

    def config(self, model: dict[str, Any] | None = None, **train: Any) -> TrainConfig:
        """The TrainConfig of this preset with the given ModelConfig / TrainConfig fields over
        its values."""
        model_config = ModelConfig(**{**self.model, **(model or {})})
        fields = {**self.train_fields(model_config.model), **train}
        return TrainConfig(**fields, model=model_config, preset=self.name)


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
    extra = sorted(set(data) - {"description", "model", "train", "capsnet"})
    if extra:
        raise EmcapsError(f"preset {name}: unknown sections {', '.join(extra)}")
    model, train = dict(data.get("model", {})), dict(data.get("train", {}))
    capsnet = dict(data.get("capsnet", {}))
    _check_fields(ModelConfig, model, name)
    _check_fields(TrainConfig, train, name)
    _check_fields(TrainConfig, capsnet, name)
    return Preset(name, str(data.get("description", "")), model, train, capsnet)


def preset_config(name: str, model: dict[str, Any] | None = None, **train: Any) -> TrainConfig:
    """The TrainConfig of preset `name`, with the given ModelConfig / TrainConfig fields over
    its values: `preset_config("paper", {"arch": (64, 8, 16, 16)}, epochs=20)`."""
    return load_preset(name).config(model, **train)


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

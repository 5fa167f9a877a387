"""The model options shared by `train` and `summary`: one definition, one help text."""

from __future__ import annotations

from typing import Any

import typer

from emcaps_cli.config import ModelConfig, parse_arch

MODEL = typer.Option("capsnet", "--model", help="capsnet (Fig. 1) | cnn (section 5 baseline).")
ARCH = typer.Option(
    "32,32,32,32",
    "--arch",
    metavar="A,B,C,D",
    help="Fig. 1 sizes: ReLU-conv channels A; primary, conv-caps-1, conv-caps-2 types B, C, D.",
)
ITERS = typer.Option(3, "--iters", help="EM routing iterations.")
POSE = typer.Option(
    "matrix", "--pose", help="matrix (4x4 pose, 4x4 W) | vector (16-vector pose, 16x16 W)."
)
COORD_ADD = typer.Option(
    True, "--coord-add/--no-coord-add", help="Coordinate Addition in the class capsules."
)
CHANNELS = typer.Option(2, "--channels", help="2: both stereo views as channels; 1: left view.")
ROUTING = typer.Option(
    "exact",
    "--routing",
    help="exact (a child's assignments normalised over all parents whose receptive field "
    "holds it, section 4) | patch (each K×K patch routed alone).",
)
_DEFAULT = ModelConfig()

FINAL_LAMBDA = typer.Option(
    _DEFAULT.final_lambda,
    "--final-lambda",
    help="λ_max of the inverse-temperature schedule λ_t = λ_max(1−0.95^(t+1)).",
)


VAR_FLOOR = typer.Option(
    _DEFAULT.var_floor,
    "--var-floor",
    help="Added to every σ² in EM routing's M-step, in squared pose units: a larger floor "
    "keeps the first E-steps soft (docs/model.md).",
)


LIKELIHOOD_POWER = typer.Option(
    _DEFAULT.likelihood_power,
    "--likelihood-power",
    help="τ of EM routing's E-step, R ∝ a·p^τ: 1 is Procedure 1; below 1 the assignments stay "
    "softer, which lets 3 iterations train (docs/model.md).",
)


PARAMETRISATION = typer.Option(
    _DEFAULT.parametrisation,
    "--parametrisation",
    help="paper (β_u, β_a as Procedure 1, initialised to 0) | released (the authors' released "
    "code: β_a = −2500·a_b, β_u = 1.42·s_b, λ ×2, class layer λ/4, their initial values; "
    "docs/model.md).",
)


def model_config(
    model: str,
    arch: str,
    iters: int,
    pose: str,
    coord_add: bool,
    channels: int,
    routing: str,
    final_lambda: float,
    **routing_options: Any,
) -> ModelConfig:
    return ModelConfig(
        **routing_options,
        model=model,
        arch=parse_arch(arch),
        iters=iters,
        pose=pose,
        coord_add=coord_add,
        channels=channels,
        routing=routing,
        final_lambda=final_lambda,
    )

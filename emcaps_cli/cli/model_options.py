"""The model options shared by `train` and `summary`: one definition, one help text.

Defaults are ModelConfig's (emcaps_cli/config.py), so the command line and the library agree.
"""

from __future__ import annotations

from typing import Any

import typer

from emcaps_cli.config import ModelConfig, parse_arch
from emcaps_cli.defaults import Model, Parametrisation, Pose, Routing, Standardize

DEFAULT = ModelConfig()

MODEL = typer.Option(
    Model(DEFAULT.model), "--model", help="capsnet (Fig. 1) | cnn (section 5 baseline)."
)
ARCH = typer.Option(
    ",".join(str(v) for v in DEFAULT.arch),
    "--arch",
    metavar="A,B,C,D",
    help="Fig. 1 sizes: ReLU-conv channels A; primary, conv-caps-1, conv-caps-2 types B, C, D.",
)
ITERS = typer.Option(DEFAULT.iters, "--iters", help="EM routing iterations.")
POSE = typer.Option(
    Pose(DEFAULT.pose),
    "--pose",
    help="matrix (4x4 pose, 4x4 W) | vector (16-vector pose, 16x16 W).",
)
COORD_ADD = typer.Option(
    DEFAULT.coord_add,
    "--coord-add/--no-coord-add",
    help="Coordinate Addition in the class capsules.",
)
CHANNELS = typer.Option(
    DEFAULT.channels, "--channels", help="2: both stereo views as channels; 1: left view."
)
ROUTING = typer.Option(
    Routing(DEFAULT.routing),
    "--routing",
    help="exact (a child's assignments normalised over all parents whose receptive field "
    "holds it, section 4) | patch (each K×K patch routed alone).",
)
FINAL_LAMBDA = typer.Option(
    DEFAULT.final_lambda,
    "--final-lambda",
    help="λ_max of the inverse-temperature schedule λ_t = λ_max(1−0.95^(t+1)).",
)
CLASS_ITERS = typer.Option(
    DEFAULT.class_iters,
    "--class-iters",
    help="EM routing iterations of the class-capsule layer only (the conv capsules keep "
    "--iters); unset: --iters, as the paper (docs/model.md).",
)
CONV_FINAL_LAMBDA = typer.Option(
    DEFAULT.conv_final_lambda,
    "--conv-final-lambda",
    help="λ_max of the two conv-capsule layers only (the class layer keeps --final-lambda); "
    "above --final-lambda it lets their activations spread; the value of --final-lambda is "
    "the paper's single schedule (docs/model.md).",
)
CONV2_FINAL_LAMBDA = typer.Option(
    DEFAULT.conv2_final_lambda,
    "--conv2-final-lambda",
    help="λ_max of the second conv-capsule layer alone; unset: --conv-final-lambda for both "
    "(docs/model.md).",
)
CONV_LAMBDA_BY_WIDTH = typer.Option(
    DEFAULT.conv_lambda_by_width,
    "--conv-lambda-by-width/--no-conv-lambda-by-width",
    help="Scale each conv-capsule layer's λ_max by its parent types / child types (C/B, then "
    "D/C), so the routing's cost term reaches as far at any widths; ×1 for equal widths, as "
    "the paper model (docs/model.md).",
)
CLASS_BETA_A_SCALE = typer.Option(
    None,
    "--class-beta-a-scale",
    help="The class capsules' β_a is this multiple of its parameter, so Adam moves the "
    "activation threshold this many times faster; 1: the plain parameter (docs/model.md). "
    "[default: 1000, or 1 with --parametrisation released]",
    show_default=False,
)
CONV_BETA_A_SCALE = typer.Option(
    DEFAULT.conv_beta_a_scale,
    "--conv-beta-a-scale",
    help="The same scale for the two conv-capsule layers' β_a; larger values saturated "
    "their activations in our runs (docs/model.md).",
)
VAR_FLOOR = typer.Option(
    DEFAULT.var_floor,
    "--var-floor",
    help="Added to every σ² in EM routing's M-step, in squared pose units: a larger floor "
    "keeps the first E-steps soft (docs/model.md).",
)
LIKELIHOOD_POWER = typer.Option(
    DEFAULT.likelihood_power,
    "--likelihood-power",
    help="τ of EM routing's E-step, R ∝ a·p^τ: 1 is Procedure 1; below 1 the assignments stay "
    "softer, which lets 3 iterations train (docs/model.md).",
)
PARAMETRISATION = typer.Option(
    Parametrisation(DEFAULT.parametrisation),
    "--parametrisation",
    help="paper (β_u, β_a as Procedure 1, initialised to 0) | released (the authors' released "
    "code: β_a = −2500·a_b, β_u = 1.42·s_b, λ ×2, class layer λ/4, their initial values; "
    "docs/model.md).",
)
STANDARDIZE = typer.Option(
    Standardize(DEFAULT.standardize),
    "--standardize",
    help="Where each input is scaled to zero mean and unit variance: crop (the 32x32 crop the "
    "network reads, as the authors' released code; training augmentation is the random crop, "
    "the brightness/contrast jitter would cancel) | image (the 48x48 image, before the crop, "
    "then the jitter: section 5's text). Evaluation and attacks follow the checkpoint "
    "(docs/training.md).",
)


def model_config(
    model: Model | str,
    arch: str,
    iters: int,
    pose: Pose | str,
    coord_add: bool,
    channels: int,
    routing: Routing | str,
    final_lambda: float,
    parametrisation: Parametrisation | str | None = None,
    standardize: Standardize | str | None = None,
    **routing_options: Any,
) -> ModelConfig:
    """The ModelConfig of the options' values; a choice may be its member or its value."""
    if parametrisation is not None:
        routing_options["parametrisation"] = Parametrisation(parametrisation).value
    if standardize is not None:
        routing_options["standardize"] = Standardize(standardize).value
    return ModelConfig(
        **routing_options,
        model=Model(model).value,
        arch=parse_arch(arch),
        iters=iters,
        pose=Pose(pose).value,
        coord_add=coord_add,
        channels=channels,
        routing=Routing(routing).value,
        final_lambda=final_lambda,
    )

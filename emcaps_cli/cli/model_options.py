"""The model options shared by `train` and `summary`: one row each (emcaps_cli/cli/options.py).

Defaults are ModelConfig's (emcaps_cli/config.py), so the command line and the library agree.
"""

from __future__ import annotations

from typing import Any

from emcaps_cli.cli.options import ADVANCED, RUN, TABLE_1, Opt
from emcaps_cli.config import DEFAULT_CLASS_BETA_A_SCALE, ModelConfig, parse_arch
from emcaps_cli.defaults import Model, Parametrisation, Pose, Routing, Standardize


def _model(name: str, type_: Any, help: str, panel: str | None = ADVANCED, **kw: Any) -> Opt:
    return Opt(name, type_, help, panel=panel, config=ModelConfig, **kw)


MODEL_OPTIONS = (
    _model("model", Model, "capsnet (Fig. 1) | cnn (section 5 baseline).", RUN),
    _model(
        "arch",
        str,
        "Fig. 1 sizes: ReLU-conv channels A; primary, conv-caps-1, conv-caps-2 types B, C, D.",
        RUN,
        metavar="A,B,C,D",
        parse=parse_arch,
    ),
    _model("iters", int, "EM routing iterations.", RUN),
    _model("pose", Pose, "matrix (4x4 pose, 4x4 W) | vector (16-vector pose, 16x16 W).", TABLE_1),
    _model(
        "coord_add",
        bool,
        "Coordinate Addition in the class capsules.",
        TABLE_1,
        flag="--coord-add/--no-coord-add",
    ),
    _model("channels", int, "2: both stereo views as channels; 1: left view.", TABLE_1),
    _model(
        "routing",
        Routing,
        "exact (a child's assignments normalised over all parents whose receptive field "
        "holds it, section 4) | patch (each K×K patch routed alone).",
        TABLE_1,
    ),
    _model(
        "final_lambda",
        float,
        "λ_max of the inverse-temperature schedule λ_t = λ_max(1−0.95^(t+1)).",
    ),
    _model(
        "conv_final_lambda",
        float,
        "λ_max of the two conv-capsule layers only (the class layer keeps --final-lambda); "
        "above --final-lambda it lets their activations spread; the value of --final-lambda "
        "is the paper's single schedule (docs/model.md).",
    ),
    _model(
        "conv_lambda_by_width",
        bool,
        "Scale each conv-capsule layer's λ_max by its parent types / child types (C/B, then "
        "D/C), so the routing's cost term reaches as far at any widths; ×1 for equal widths, "
        "as the paper model (docs/model.md).",
        flag="--conv-lambda-by-width/--no-conv-lambda-by-width",
    ),
    _model(
        "class_beta_a_scale",
        float,
        "The class capsules' β_a is this multiple of its parameter, so Adam moves the "
        "activation threshold this many times faster; 1: the plain parameter (docs/model.md).",
        show_default=", or ".join(
            f"{scale:g} with --parametrisation {name}"
            for name, scale in DEFAULT_CLASS_BETA_A_SCALE.items()
        ),
    ),
    _model(
        "var_floor",
        float,
        "Added to every σ² in EM routing's M-step, in squared pose units; small or large only "
        "against the votes' spread (docs/model.md, \"Procedure 1 and learning\"). The paper "
        "and released presets: 5e-4.",
    ),
    _model(
        "likelihood_power",
        float,
        "τ of EM routing's E-step, R ∝ a·p^τ: 1 is Procedure 1 (the paper and released "
        "presets); the default 0.1 is a tempered E-step, not Procedure 1, whose softer "
        "assignments let 3 iterations train here (docs/model.md).",
    ),
    _model(
        "parametrisation",
        Parametrisation,
        "paper (β_u, β_a as Procedure 1, initialised to 0) | released (the authors' released "
        "code: β_a = −2500·a_b, β_u = 1.42·s_b, λ ×2, class layer λ/4, their initial values; "
        "docs/model.md).",
    ),
    _model(
        "standardize",
        Standardize,
        "Where each input is scaled to zero mean and unit variance: crop (the 32x32 crop the "
        "network reads, as the authors' released code; training augmentation is the random "
        "crop, the brightness/contrast jitter would cancel) | image (the 48x48 image, before "
        "the crop, then the jitter: section 5's text). Evaluation and attacks follow the "
        "checkpoint (docs/training.md).",
    ),
    _model(
        "class_iters",
        int,
        "EM routing iterations of the class-capsule layer only (the conv capsules keep "
        "--iters); unset: --iters, as the paper (docs/model.md).",
    ),
)
BY_NAME = {row.name: row for row in MODEL_OPTIONS}


def model_config(**values: Any) -> ModelConfig:
    """The ModelConfig of model options' values by name (any of them; the others keep their
    defaults); a choice may be its enum member or its value, --arch is its text."""
    return ModelConfig(**{name: BY_NAME[name].to_config(v) for name, v in values.items()})

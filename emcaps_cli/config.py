"""Run configuration: ModelConfig (the network) and TrainConfig (the training run).

Both are stored in every checkpoint and (TrainConfig) in a run's config.json, as plain dicts
(`to_dict` / `from_dict`). A leaf module: it imports nothing heavy and no other emcaps module
but errors and defaults, so the CLI can build configs and show its `--help` without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from emcaps_cli.defaults import (
    DEFAULT_DATA,
    DEFAULT_STANDARDIZE,
    LOSSES,
    LR_SCHEDULES,
    MODELS,
    PARAMETRISATIONS,
    POSES,
    PRESETS,
    ROUTINGS,
    SPLITS,
    STANDARDIZES,
)
from emcaps_cli.errors import EmcapsError

# The class layer's β_a scale when none is given, by parametrisation (docs/model.md).
DEFAULT_CLASS_BETA_A_SCALE = {"paper": 1000.0, "released": 1.0}


# Options of earlier versions, and the value that behaves as this version does: a stored
# config holding that value loads without the key, one holding another value is refused.
REMOVED_MODEL_FIELDS: dict[str, Any] = {"conv2_final_lambda": None, "conv_beta_a_scale": 1.0}


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    """Raise EmcapsError naming the keys of `d` that are not fields of the dataclass `cls`, or
    the fields it lacks (a config written by an older emcaps: no value is guessed for them)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise EmcapsError(f"{what} has unknown keys: {', '.join(sorted(unknown))}")
    missing = known - set(d)
    if missing:
        raise EmcapsError(
            f"{what} lacks {', '.join(sorted(missing))}: written by an older emcaps; retrain"
        )


def _drop_removed(d: dict[str, Any], what: str) -> dict[str, Any]:
    """`d` without the REMOVED_MODEL_FIELDS that hold the value this version behaves as; any
    other value of them is an EmcapsError (the network would not be the one trained)."""
    for key, same in REMOVED_MODEL_FIELDS.items():
        if key in d and d[key] != same:
            raise EmcapsError(
                f"{what} sets {key} = {d[key]!r}, an option emcaps no longer has: "
                "written by an older emcaps; retrain"
            )
    return {k: v for k, v in d.items() if k not in REMOVED_MODEL_FIELDS}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every checkpoint.

    arch            (A, B, C, D) of Fig. 1: ReLU-conv channels; primary, conv1, conv2 capsule types
    iters           EM routing iterations (Table 1: 1, 2, 3, 5)
    class_iters     EM routing iterations of the class-capsule layer only; None: iters, as the
                    paper (docs/model.md)
    pose            "matrix": 4x4 poses and 4x4 W; "vector": 16-vector poses and 16x16 W (Table 1)
    coord_add       Coordinate Addition in the class-capsule layer (section 4)
    channels        2: both stereo views as channels (as the authors' released code);
                    1: the left view only
    routing         "exact": a child's assignments are normalised over every parent whose receptive
                    field holds it (section 4); "patch": each K x K patch routed on its own
    final_lambda    λ_max of the inverse-temperature schedule λ_t = λ_max (1 - 0.95^(t+1))
    conv_final_lambda  λ_max of the two conv-capsule layers; None: final_lambda, as the paper
                    (docs/model.md)
    conv_lambda_by_width  each conv-capsule layer's λ_max is the conv one × (its parent types /
                    its child types): C/B for conv caps 1, D/C for conv caps 2, so a parent's
                    expected share of its children, which the cost term in the activation
                    logit grows with, does not depend on the layer widths; × 1 for equal widths
                    (the paper model); off: one λ_max for both (docs/model.md)
    class_beta_a_scale  the class layer's β_a is this multiple of its parameter, so that Adam
                    moves the class activations' threshold this many times faster; None: 1000
                    for "paper", 1 for "released" (which scales its own); 1 is the plain
                    parameter (docs/model.md)
    var_floor       added to every σ² in the M-step, in squared pose units (docs/model.md)
    likelihood_power τ of the E-step: R_ij ∝ a_j p_ij^τ; 1 is Procedure 1, τ < 1 tempers the
                    assignments (docs/model.md)
    parametrisation how β_u, β_a and λ enter the routing and are initialised: "paper" or
                    "released" (the authors' code; capsules/parametrisation.py)
    standardize     where the input is standardised to zero mean and unit variance: "crop",
                    the 32x32 crop the network reads (the authors' released code), or "image",
                    the 48x48 image before cropping, followed by the brightness/contrast jitter
                    (section 5's text); evaluation and attacks prepare images the same way
                    (data/transforms.py, docs/training.md)
    """

    model: str = "capsnet"
    arch: tuple[int, int, int, int] = (32, 32, 32, 32)
    iters: int = 3
    class_iters: int | None = None
    pose: str = "matrix"
    coord_add: bool = True
    channels: int = 2
    routing: str = "exact"
    final_lambda: float = 0.03
    conv_final_lambda: float | None = 0.3
    conv_lambda_by_width: bool = True
    class_beta_a_scale: float | None = None
    var_floor: float = 0.1
    likelihood_power: float = 0.1
    parametrisation: str = "paper"
    standardize: str = DEFAULT_STANDARDIZE
    num_classes: int = 5
    input_size: int = 32

    @property
    def conv_lambda_max(self) -> float:
        """The conv-capsule λ_max before any width scale: conv_final_lambda, else final_lambda."""
        return self.final_lambda if self.conv_final_lambda is None else self.conv_final_lambda

    def conv_lambdas(self) -> tuple[float, float]:
        """λ_max of conv caps 1 and conv caps 2 (docs/model.md, "Where emcaps departs from the
        paper and the released code")."""
        _, b, c, d = self.arch
        lam = self.conv_lambda_max
        if not self.conv_lambda_by_width:
            return lam, lam
        return lam * (c / b), lam * (d / c)

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
        if self.standardize not in STANDARDIZES:
            raise EmcapsError(
                f"--standardize {self.standardize}: expected one of {', '.join(STANDARDIZES)}"
            )
        if self.routing not in ROUTINGS:
            raise EmcapsError(f"--routing {self.routing}: expected one of {', '.join(ROUTINGS)}")
        if len(self.arch) != 4 or any(int(v) < 1 for v in self.arch):
            raise EmcapsError(f"--arch {self.arch}: expected four positive integers A,B,C,D")
        if self.iters < 1:
            raise EmcapsError(f"--iters {self.iters}: need at least one routing iteration")
        if self.class_iters is not None and self.class_iters < 1:
            raise EmcapsError(
                f"--class-iters {self.class_iters}: need at least one routing iteration"
            )
        class_scale = self.class_beta_a_scale
        if class_scale is None:
            class_scale = DEFAULT_CLASS_BETA_A_SCALE[self.parametrisation]
        positive = (
            ("final-lambda", self.final_lambda),
            ("conv-final-lambda", self.conv_lambda_max),
            ("class-beta-a-scale", class_scale),
            ("var-floor", self.var_floor),
            ("likelihood-power", self.likelihood_power),
        )
        for name, value in positive:
            if not (math.isfinite(value) and value > 0):
                raise EmcapsError(f"--{name} {value}: expected a positive number")
        object.__setattr__(self, "class_beta_a_scale", float(class_scale))
        if self.channels not in (1, 2):
            raise EmcapsError(f"--channels {self.channels}: expected 1 or 2")
        object.__setattr__(self, "arch", tuple(int(v) for v in self.arch))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = list(self.arch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> ModelConfig:
        """The config `to_dict` wrote; `source` (a checkpoint's path) starts any error."""
        what = f"{source}: model config" if source else "model config"
        d = _drop_removed(d, what)
        _check_keys(cls, d, what)
        return cls(**{**d, "arch": tuple(d["arch"])})


# The training loss by model when none is chosen: `default_loss`.
DEFAULT_LOSS = {"capsnet": "spread", "cnn": "cross-entropy"}


def default_loss(model: str) -> str:
    """The loss a network of kind `model` trains with when --loss is not given: the spread
    loss (Eq. 3) for the capsule network, softmax cross-entropy for the CNN baseline."""
    return DEFAULT_LOSS[model]


def parse_arch(text: str) -> tuple[int, int, int, int]:
    """Parse `--arch A,B,C,D` (e.g. "32,32,32,32" or "64,8,16,16")."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EmcapsError(f"--arch {text!r}: expected four integers A,B,C,D") from None
    if len(values) != 4 or min(values) < 1:
        raise EmcapsError(f"--arch {text!r}: expected four positive integers A,B,C,D")
    return values  # type: ignore[return-value]


# Adam's first-epoch learning rate by model (docs/training.md, "The recipe and why").
DEFAULT_LR = {"capsnet": 2e-2, "cnn": 3e-4}

# Largest gradient norm before Adam's step, by model; 0: no clipping (docs/training.md,
# "The recipe and why").
DEFAULT_GRAD_CLIP = {"capsnet": 1.0, "cnn": 0.0}


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in config.json and every checkpoint.

    preset          the named recipe the run started from (emcaps_cli/presets/); the fields
                    hold the resolved values, the preset's and any options given over it.
                    The defaults of both dataclasses are the "tempered" preset's values

    loss            None: `default_loss` of the model ("spread" for the capsule network,
                    "cross-entropy" for the CNN)
    batch_size      images per optimiser step per process (effective batch = × processes);
                    16 for both models (docs/training.md, "The recipe and why")
    lr, lr_decay    Adam learning rate of epoch e (0-based) is lr · lr_decay^e; lr None:
                    DEFAULT_LR of the model (docs/training.md)
    lr_schedule     "exponential" (the line above) or "cosine": lr · ½(1 + cos(π·e/H)) with
                    H = lr_anneal_epochs (None: epochs), lr_decay unused
    front_lr_scale  the capsule network's ordinary convolutions (conv1 and the primary
                    capsules' 1x1 convolutions) learn at this multiple of lr; the CNN ignores it
    grad_clip       before each Adam step the gradient of all parameters together is scaled
                    down to this L2 norm when it is longer; 0: no clipping; None:
                    DEFAULT_GRAD_CLIP of the model (docs/training.md)
    margin_epochs   spread-loss margin reaches 0.9 after this many epochs; None: epochs / 2
    validation_fraction  share of the (split-filtered) training images held out for best.pt
    stop_at_error   stop once the familiar-view test error (a fraction) is <= this value
    limit_train/test  reproducible random subsets (by `seed`) for quick runs
    augment         random 32x32 crop + brightness/contrast for training (section 5); off:
                    the centre crop, as for testing
    augment_warmup  epochs over which the augmentation's ranges grow linearly from none to
                    full (0: full from the first step, as the paper; docs/training.md)
    ema_decay       decay of an exponential moving average of the weights, which evaluation,
                    best.pt and last.pt's network use (training/averaging.py); 0: off, the
                    network is evaluated with its raw weights (docs/training.md)
    diagnostics     capsule-health statistics on a fixed batch after every epoch (capsnet)
    tau_start       deterministic annealing of the E-step: the capsule network trains with
                    likelihood power τ = tau_start for `tau_hold_epochs` epochs, then τ rises
                    geometrically to the model's likelihood_power over `tau_anneal_epochs`
                    (one value per epoch); evaluation always routes with the model's τ.
                    None: train at the model's τ throughout (training/schedule.py)
    """

    preset: str = "tempered"
    data: str = DEFAULT_DATA
    out: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: str | None = None
    epochs: int = 50
    batch_size: int = 16
    lr: float | None = None
    lr_decay: float = 0.96
    lr_schedule: str = "exponential"
    lr_anneal_epochs: float | None = None
    front_lr_scale: float = 0.3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    margin_epochs: float | None = None
    seed: int = 0
    device: str = "auto"
    validation_fraction: float = 0.1
    split: str = "full"
    stop_at_error: float | None = None
    amp: bool = False
    compile: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    augment: bool = True
    augment_warmup: float = 5.0
    ema_decay: float = 0.98
    diagnostics: bool = True
    tau_start: float | None = None
    tau_hold_epochs: float = 0.0
    tau_anneal_epochs: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        checks = (
            (
                self.preset in PRESETS,
                f"--preset {self.preset}: expected one of {', '.join(PRESETS)}",
            ),
            (self.epochs >= 1, f"--epochs {self.epochs}: need at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: need at least 1"),
            (
                self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
                f"--lr {self.lr}: expected a positive number",
            ),
            (0 < self.lr_decay <= 1, f"--lr-decay {self.lr_decay}: expected 0 < decay <= 1"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"--lr-schedule {self.lr_schedule}: expected one of {', '.join(LR_SCHEDULES)}",
            ),
            (
                self.lr_anneal_epochs is None or self.lr_anneal_epochs > 0,
                f"--lr-anneal-epochs {self.lr_anneal_epochs}: must be > 0",
            ),
            (
                math.isfinite(self.front_lr_scale) and self.front_lr_scale > 0,
                f"--front-lr-scale {self.front_lr_scale}: expected a positive number",
            ),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (
                self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip >= 0),
                f"--grad-clip {self.grad_clip}: expected a norm >= 0 (0: no clipping)",
            ),
            (
                math.isfinite(self.augment_warmup) and self.augment_warmup >= 0,
                f"--augment-warmup {self.augment_warmup}: expected epochs >= 0",
            ),
            (
                0 <= self.ema_decay < 1,
                f"--ema-decay {self.ema_decay}: expected 0 <= decay < 1 (0: off)",
            ),
            (
                0 <= self.validation_fraction < 1,
                f"--validation-fraction {self.validation_fraction}: expected 0 <= f < 1",
            ),
            (self.split in SPLITS, f"--split {self.split}: expected one of {', '.join(SPLITS)}"),
            (
                self.loss is None or self.loss in LOSSES,
                f"--loss {self.loss}: expected one of {', '.join(LOSSES)}",
            ),
            (
                self.stop_at_error is None or 0 <= self.stop_at_error <= 1,
                f"--stop-at-error {self.stop_at_error}: expected a fraction in [0, 1], "
                "e.g. 0.037 for 3.7%",
            ),
            (
                self.margin_epochs is None or self.margin_epochs > 0,
                f"--margin-epochs {self.margin_epochs}: must be > 0",
            ),
            (
                self.limit_train is None or self.limit_train >= 1,
                f"--limit-train {self.limit_train}: need at least 1",
            ),
            (
                self.limit_test is None or self.limit_test >= 1,
                f"--limit-test {self.limit_test}: need at least 1",
            ),
        )
        for ok, message in (*checks, *self._annealing_checks()):
            if not ok:
                raise EmcapsError(message)

    def _annealing_checks(self) -> tuple[tuple[bool, str], ...]:
        """(valid, error message) of the E-step annealing options."""
        return (
            (
                self.tau_start is None or (math.isfinite(self.tau_start) and self.tau_start > 0),
                f"--tau-start {self.tau_start}: expected a positive number",
            ),
            (
                math.isfinite(self.tau_hold_epochs) and self.tau_hold_epochs >= 0,
                f"--tau-hold-epochs {self.tau_hold_epochs}: expected epochs >= 0",
            ),
            (
                math.isfinite(self.tau_anneal_epochs) and self.tau_anneal_epochs >= 0,
                f"--tau-anneal-epochs {self.tau_anneal_epochs}: expected epochs >= 0",
            ),
        )

    def resolved(self) -> TrainConfig:
        """A copy with the defaults that depend on other options filled in."""
        loss = self.loss or default_loss(self.model.model)
        margin_epochs = self.margin_epochs if self.margin_epochs is not None else self.epochs / 2
        anneal = self.lr_anneal_epochs if self.lr_anneal_epochs is not None else self.epochs
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.model.model]
        clip = self.grad_clip if self.grad_clip is not None else DEFAULT_GRAD_CLIP[self.model.model]
        return dataclasses.replace(
            self,
            loss=loss,
            margin_epochs=margin_epochs,
            lr=lr,
            grad_clip=clip,
            lr_anneal_epochs=float(anneal),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> TrainConfig:
        """The config `to_dict` wrote; `source` (a checkpoint's path) starts any error."""
        _check_keys(cls, d, f"{source}: train config" if source else "train config")
        model = d["model"]
        if isinstance(model, dict):
            model = ModelConfig.from_dict(model, source)
        return cls(**{**d, "model": model})

"""`emcaps train`: train a capsule network or the baseline CNN on the HDF5 cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, TaskID

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import (
    console,
    data_option,
    friendly_errors,
    json_option,
    kernels_option,
    print_json,
    progress_display,
    use_kernels,
)
from emcaps_cli.config import DEFAULT_GRAD_CLIP, DEFAULT_LOSS, DEFAULT_LR, TrainConfig
from emcaps_cli.defaults import (
    Choice,
    Kernels,
    Loss,
    LrSchedule,
    Model,
    Parametrisation,
    Pose,
    Routing,
    Standardize,
    ViewpointSplit,
)
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.reporter import Reporter


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def epoch_line(m: dict[str, Any], show_margin: bool = False) -> str:
    """One human line per epoch. `show_margin`: the spread loss's margin, which rises over the
    first epochs and raises the loss with it, so a rising loss need not mean divergence."""
    parts = [f"epoch {m['epoch']}", f"loss {m['train_loss']:.4f}"]
    if show_margin:
        parts.append(f"(margin {m['margin']:.2f})")
    parts += [
        f"train {_pct(m['train_error'])}",
        f"val {_pct(m['validation_error'])}",
        f"test {_pct(m['test_error'])}",
    ]
    if "test_familiar_error" in m:
        parts.append(f"familiar {_pct(m['test_familiar_error'])}")
        parts.append(f"novel {_pct(m['test_novel_error'])}")
    parts += [f"lr {m['lr']:.2e}", f"{m['images_per_second']:.0f} img/s", f"{m['seconds']:.1f} s"]
    return "  ".join(parts)


class RichReporter(Reporter):
    """Epoch and batch bars on a terminal; only the per-epoch line when stderr is not one."""

    def __init__(self) -> None:
        self.bars = console.is_terminal
        self.progress: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        self.show_margin = False

    def start(self, info: dict[str, Any]) -> None:
        images = info["images"]
        resumed = info["resumed_at"]
        self.show_margin = info["config"]["loss"] == "spread"
        console.print(
            f"{'resuming' if resumed else 'training'} {info['config']['model']['model']} "
            f"({info['parameters']:,} parameters) on {info['device']}"
            + (f" × {info['world_size']} processes" if info["world_size"] > 1 else "")
            + f"; {images['train']} train / {images['validation']} validation / "
            f"{images['test']} test images -> {info['run_dir']}"
            + (f" (from epoch {resumed[0] + 1}, step {resumed[1]})" if resumed else "")
        )
        if self.bars:
            self.progress = progress_display()
            self.progress.start()
            epochs = info["config"]["epochs"]
            done = resumed[0] if resumed else 0
            self.epoch_task = self.progress.add_task(
                "epochs", total=epochs, completed=done, status=""
            )
            self.batch_task = self.progress.add_task("steps", total=1, status="")

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.progress is not None:
            self.progress.update(
                self.batch_task, description=f"epoch {epoch}", total=steps, completed=done
            )

    def step(self, done: int, loss: float, images_per_second: float) -> None:
        if self.progress is not None:
            self.progress.update(
                self.batch_task,
                completed=done,
                status=f"loss {loss:.4f}  {images_per_second:.0f} img/s",
            )

    def evaluating(self) -> None:
        if self.progress is not None:
            self.progress.update(self.batch_task, status="evaluating")

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.advance(self.epoch_task)
        console.print(epoch_line(metrics, self.show_margin), soft_wrap=True)

    def note(self, text: str) -> None:
        console.print(f"note: {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# Options that are not TrainConfig fields, and the fields whose option is named differently.
NOT_CONFIG = {"resume", "json_out", "kernels"}
RENAMED = {"compile_model": "compile"}
MODEL_OPTIONS = (
    "model",
    "arch",
    "iters",
    "class_iters",
    "pose",
    "coord_add",
    "channels",
    "routing",
    "final_lambda",
    "conv_final_lambda",
    "conv2_final_lambda",
    "conv_lambda_by_width",
    "class_beta_a_scale",
    "conv_beta_a_scale",
    "var_floor",
    "likelihood_power",
    "parametrisation",
    "standardize",
)


def _config_value(name: str, value: Any) -> Any:
    """An option's value as TrainConfig stores it: choices as their values, paths as text."""
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if name == "arch":
        return opts.parse_arch(value)
    return value


def new_config(params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a fresh run from the command's parameters."""
    values = {k: v for k, v in params.items() if k not in NOT_CONFIG}
    model = opts.model_config(**{name: values.pop(name) for name in MODEL_OPTIONS})
    fields = {RENAMED.get(k, k): _config_value(k, v) for k, v in values.items()}
    return TrainConfig(model=model, **fields)


def typed_options(ctx: typer.Context) -> dict[str, Any]:
    """The options typed on the command line, by training-option name, as values to compare
    with a stored run (source by enum name: Typer may vendor click)."""
    typed = {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    } - NOT_CONFIG
    typed.discard("out")
    return {RENAMED.get(n, n): _config_value(n, ctx.params[n]) for n in typed}


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 0.01 -> 1e-2


DEFAULT = TrainConfig()
LR_DEFAULTS = ", ".join(f"{_lr_text(lr)} for {model}" for model, lr in DEFAULT_LR.items())

OUT = typer.Option(
    None,
    "--out",
    metavar="RUN_DIR",
    help="Run directory (config.json, metrics.jsonl, last.pt, best.pt, curves.png).",
    show_default="runs/YYYYmmdd-HHMMSS",
)
LOSS = typer.Option(
    None,
    "--loss",
    help="Training loss (section 3: spread; or margin, cross-entropy).",
    show_default=", ".join(f"{loss} for {model}" for model, loss in DEFAULT_LOSS.items()),
)
EPOCHS = typer.Option(
    DEFAULT.epochs, "--epochs", help="Total epochs (passes over the training set)."
)
BATCH_SIZE = typer.Option(
    DEFAULT.batch_size,
    "--batch-size",
    help="Images per optimiser step per process (effective batch × processes).",
)
LR = typer.Option(
    DEFAULT.lr, "--lr", help="Adam learning rate of the first epoch.", show_default=LR_DEFAULTS
)
LR_DECAY = typer.Option(
    DEFAULT.lr_decay,
    "--lr-decay",
    help="Learning rate × this after every epoch (the exponential schedule).",
)
LR_SCHEDULE = typer.Option(
    LrSchedule(DEFAULT.lr_schedule),
    "--lr-schedule",
    help="exponential: lr × --lr-decay^epoch; cosine: lr × (1 + cos(π·epoch/H))/2, from the "
    "full rate in epoch 1 towards 0 after H = --lr-anneal-epochs epochs (--lr-decay unused).",
)
LR_ANNEAL_EPOCHS = typer.Option(
    DEFAULT.lr_anneal_epochs,
    "--lr-anneal-epochs",
    metavar="H",
    help="The cosine schedule's length in epochs.",
    show_default="--epochs",
)
FRONT_LR_SCALE = typer.Option(
    DEFAULT.front_lr_scale,
    "--front-lr-scale",
    metavar="F",
    help="Capsule network: conv1 and the primary capsules' 1x1 convolutions learn at F x the "
    "learning rate (the capsule layers at 1 x); the CNN ignores it.",
)
WEIGHT_DECAY = typer.Option(DEFAULT.weight_decay, "--weight-decay", help="Adam L2 weight decay.")
GRAD_CLIP = typer.Option(
    DEFAULT.grad_clip,
    "--grad-clip",
    metavar="NORM",
    help="Before each Adam step, scale the gradient of all parameters together down to this "
    "L2 norm when it is longer; 0: no clipping.",
    show_default=", ".join(f"{clip:g} for {model}" for model, clip in DEFAULT_GRAD_CLIP.items()),
)
MARGIN_EPOCHS = typer.Option(
    DEFAULT.margin_epochs,
    "--margin-epochs",
    help="Epochs over which the spread-loss margin rises linearly 0.2 -> 0.9.",
    show_default="half of --epochs",
)
SEED = typer.Option(DEFAULT.seed, "--seed", help="Seed of initialisation, shuffling, augmentation.")
DEVICE = typer.Option(DEFAULT.device, "--device", help="auto | cpu | cuda[:N].")
VALIDATION_FRACTION = typer.Option(
    DEFAULT.validation_fraction,
    "--validation-fraction",
    help="Fraction (0..1) of the training images held out to choose best.pt; "
    "the test set is never used for selection.",
)
SPLIT = typer.Option(
    ViewpointSplit(DEFAULT.split),
    "--split",
    help="full | azimuth | elevation: train on familiar viewpoints only (section 5.1) "
    "and report familiar and novel test errors.",
)
STOP_AT_ERROR = typer.Option(
    DEFAULT.stop_at_error,
    "--stop-at-error",
    metavar="E",
    help="Stop after the first epoch whose familiar-view test error is <= E "
    "(a fraction: 0.037 means 3.7%).",
)
RESUME = typer.Option(
    False, "--resume", help="Continue RUN_DIR/last.pt exactly; may raise --epochs."
)
AMP = typer.Option(
    DEFAULT.amp,
    "--amp",
    help="bf16 autocast (CUDA only; refused on CPU). EM routing stays float32.",
)
COMPILE = typer.Option(DEFAULT.compile, "--compile", help="torch.compile the network.")
LIMIT_TRAIN = typer.Option(
    DEFAULT.limit_train,
    "--limit-train",
    metavar="N",
    help="Use a random N training images (by --seed).",
)
LIMIT_TEST = typer.Option(
    DEFAULT.limit_test, "--limit-test", metavar="N", help="Use a random N test images (by --seed)."
)
AUGMENT = typer.Option(
    DEFAULT.augment,
    "--augment/--no-augment",
    help="Training images: random 32x32 crop of the 48x48 image (plus random brightness and "
    "contrast with --standardize image, section 5), or the centre crop only.",
)
AUGMENT_WARMUP = typer.Option(
    DEFAULT.augment_warmup,
    "--augment-warmup",
    metavar="EPOCHS",
    help="Epochs over which the augmentation grows linearly from none (centre crop) to the "
    "full ranges; 0: full from the first step, as the paper.",
)
EMA_DECAY = typer.Option(
    DEFAULT.ema_decay,
    "--ema-decay",
    metavar="D",
    help="Evaluate (and save in best.pt / last.pt) an exponential moving average of the "
    "weights, w̄ <- D·w̄ + (1-D)·w after every step; 0: off, the raw weights.",
)
DIAGNOSTICS = typer.Option(
    DEFAULT.diagnostics,
    "--diagnostics/--no-diagnostics",
    help="Capsule-health statistics on a fixed batch after every epoch (metrics.jsonl, "
    "diagnostics.png; capsnet only, under 2 s an epoch for the paper model).",
)


def print_result(result: Any) -> None:
    """Why the run stopped, which epoch best.pt holds, and where the run is; on stderr."""
    reason = "reached --stop-at-error" if result.stopped == "stop-at-error" else "done"
    if result.best_epoch is None:
        best = "no best.pt"
    else:
        best = f"best.pt = epoch {result.best_epoch}"
        if result.best_validation_error is not None:
            best += f" (validation {_pct(result.best_validation_error)})"
    console.print(f"{reason} after {result.epochs_completed} epochs; {best}; {result.run_dir}")


@friendly_errors
def train_command(
    ctx: typer.Context,
    data: Path = data_option(),
    out: Path | None = OUT,
    model: Model = opts.MODEL,
    arch: str = opts.ARCH,
    iters: int = opts.ITERS,
    class_iters: int | None = opts.CLASS_ITERS,
    pose: Pose = opts.POSE,
    coord_add: bool = opts.COORD_ADD,
    channels: int = opts.CHANNELS,
    routing: Routing = opts.ROUTING,
    final_lambda: float = opts.FINAL_LAMBDA,
    conv_final_lambda: float | None = opts.CONV_FINAL_LAMBDA,
    conv2_final_lambda: float | None = opts.CONV2_FINAL_LAMBDA,
    conv_lambda_by_width: bool = opts.CONV_LAMBDA_BY_WIDTH,
    class_beta_a_scale: float | None = opts.CLASS_BETA_A_SCALE,
    conv_beta_a_scale: float = opts.CONV_BETA_A_SCALE,
    var_floor: float = opts.VAR_FLOOR,
    likelihood_power: float = opts.LIKELIHOOD_POWER,
    parametrisation: Parametrisation = opts.PARAMETRISATION,
    standardize: Standardize = opts.STANDARDIZE,
    loss: Loss | None = LOSS,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float | None = LR,
    lr_decay: float = LR_DECAY,
    lr_schedule: LrSchedule = LR_SCHEDULE,
    lr_anneal_epochs: float | None = LR_ANNEAL_EPOCHS,
    front_lr_scale: float = FRONT_LR_SCALE,
    weight_decay: float = WEIGHT_DECAY,
    grad_clip: float | None = GRAD_CLIP,
    margin_epochs: float | None = MARGIN_EPOCHS,
    seed: int = SEED,
    device: str = DEVICE,
    kernels: Kernels | None = kernels_option(),
    validation_fraction: float = VALIDATION_FRACTION,
    split: ViewpointSplit = SPLIT,
    stop_at_error: float | None = STOP_AT_ERROR,
    resume: bool = RESUME,
    amp: bool = AMP,
    compile_model: bool = COMPILE,
    limit_train: int | None = LIMIT_TRAIN,
    limit_test: int | None = LIMIT_TEST,
    augment: bool = AUGMENT,
    augment_warmup: float = AUGMENT_WARMUP,
    ema_decay: float = EMA_DECAY,
    diagnostics: bool = DIAGNOSTICS,
    json_out: bool = json_option(),
) -> None:
    """Train on the smallNORB cache; write checkpoints, metrics and curves to RUN_DIR."""
    from emcaps_cli.training.loop import train
    from emcaps_cli.training.signals import TrainingInterrupted
    from emcaps_cli.training.state import resume_config

    use_kernels(kernels)
    if resume:
        if out is None:
            raise EmcapsError("--resume needs --out RUN_DIR (the run to continue)")
        config = resume_config(out, **typed_options(ctx))
    else:
        config = new_config(ctx.params)
    reporter = RichReporter()
    try:
        result = train(config, resume=resume, reporter=reporter)
    except TrainingInterrupted as exc:
        reporter.close()
        typer.echo(f"interrupted: {exc}", err=True)
        raise typer.Exit(128 + int(exc.signum)) from None
    finally:
        reporter.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print_result(result)
    if json_out:
        print_json(result.to_dict())

"""`emcaps train`: train a capsule network or the baseline CNN on the HDF5 cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, TaskID

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import (
    KERNELS_HELP,
    console,
    friendly_errors,
    print_json,
    progress_display,
    use_kernels,
)
from emcaps_cli.cli.options import ADVANCED, RUN, TABLE_1, TRAINING, Opt, with_options
from emcaps_cli.config import DEFAULT_GRAD_CLIP, DEFAULT_LOSS, DEFAULT_LR, TrainConfig
from emcaps_cli.defaults import Kernels, Loss, LrSchedule, PresetName, ViewpointSplit
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
        if info["config"]["model"]["model"] == "capsnet":
            console.print(f"routing: {info['routing']} (preset {info['config']['preset']})")
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


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 0.01 -> 1e-2


def _train(name: str, type_: Any, help: str, panel: str | None = TRAINING, **kw: Any) -> Opt:
    return Opt(name, type_, help, panel=panel, config=TrainConfig, **kw)


# Every option of `emcaps train`, once: the model options (model_options.py) among the training
# ones. `--help` shows them by panel (RUN first), in this order within a panel.
TRAIN_OPTIONS = (
    _train(
        "preset",
        PresetName,
        "Named recipe (emcaps_cli/presets/*.toml); options given with it override its values. "
        "tempered: emcaps' recipe, tempered EM routing (E-step R ∝ a·p^τ, τ = 0.1, σ² floor "
        "0.1) — not the paper's Procedure 1 | paper: Procedure 1 and section 5, the released "
        "code's values where the paper is silent | released: the authors' released code as "
        "far as emcaps expresses it (docs/model.md).",
        RUN,
    ),
    _train("data", Path, "HDF5 cache from `emcaps prepare`.", RUN),
    _train(
        "out",
        Path,
        "Run directory (config.json, metrics.jsonl, last.pt, best.pt, curves.png).",
        RUN,
        metavar="RUN_DIR",
        show_default="runs/YYYYmmdd-HHMMSS",
    ),
    Opt("resume", bool, "Continue RUN_DIR/last.pt exactly; may raise --epochs.", default=False),
    *opts.MODEL_OPTIONS,
    _train("epochs", int, "Total epochs (passes over the training set).", RUN),
    _train(
        "batch_size",
        int,
        "Images per optimiser step per process (effective batch × processes).",
        RUN,
    ),
    _train(
        "lr",
        float,
        "Adam learning rate of the first epoch.",
        RUN,
        show_default=", ".join(f"{_lr_text(lr)} for {m}" for m, lr in DEFAULT_LR.items()),
    ),
    _train("seed", int, "Seed of initialisation, shuffling, augmentation.", RUN),
    _train("device", str, "auto | cpu | cuda[:N].", RUN),
    _train(
        "split",
        ViewpointSplit,
        "full | azimuth | elevation: train on familiar viewpoints only (section 5.1) "
        "and report familiar and novel test errors.",
        RUN,
    ),
    Opt("kernels", Kernels, KERNELS_HELP, show_default=False),
    Opt("json_out", bool, "Print the result as JSON on stdout.", flag="--json", default=False),
    _train(
        "loss",
        Loss,
        "Training loss (section 3: spread; or margin, cross-entropy).",
        TABLE_1,
        show_default=", ".join(f"{loss} for {m}" for m, loss in DEFAULT_LOSS.items()),
    ),
    _train("lr_decay", float, "Learning rate × this after every epoch (the exponential schedule)."),
    _train(
        "lr_schedule",
        LrSchedule,
        "exponential: lr × --lr-decay^epoch; cosine: lr × (1 + cos(π·epoch/H))/2, from the "
        "full rate in epoch 1 towards 0 after H = --lr-anneal-epochs epochs (--lr-decay "
        "unused).",
    ),
    _train(
        "lr_anneal_epochs",
        float,
        "The cosine schedule's length in epochs.",
        metavar="H",
        show_default="--epochs",
    ),
    _train(
        "weight_decay", float, "Adam L2 weight decay: this × the weights is added to the gradient."
    ),
    _train(
        "margin_epochs",
        float,
        "Epochs over which the spread-loss margin rises linearly 0.2 -> 0.9.",
        show_default="half of --epochs",
    ),
    _train(
        "validation_fraction",
        float,
        "Fraction (0..1) of the training images held out to choose best.pt; "
        "the test set is never used for selection.",
    ),
    _train(
        "stop_at_error",
        float,
        "Stop after the first epoch whose familiar-view test error is <= E "
        "(a fraction: 0.037 means 3.7%).",
        metavar="E",
    ),
    _train(
        "augment",
        bool,
        "Training images: random 32x32 crop of the 48x48 image (plus random brightness and "
        "contrast with --standardize image, section 5), or the centre crop only.",
        flag="--augment/--no-augment",
    ),
    _train("limit_train", int, "Use a random N training images (by --seed).", metavar="N"),
    _train("limit_test", int, "Use a random N test images (by --seed).", metavar="N"),
    _train("amp", bool, "bf16 autocast (CUDA only; refused on CPU). EM routing stays float32."),
    _train("compile", bool, "torch.compile the network."),
    _train(
        "diagnostics",
        bool,
        "Capsule-health statistics on a fixed batch after every epoch (metrics.jsonl, "
        "diagnostics.png; capsnet only, under 2 s an epoch for the paper model).",
        flag="--diagnostics/--no-diagnostics",
    ),
    _train(
        "front_lr_scale",
        float,
        "Capsule network: conv1 and the primary capsules' 1x1 convolutions learn at F x the "
        "learning rate (the capsule layers at 1 x); the CNN ignores it.",
        ADVANCED,
        metavar="F",
    ),
    _train(
        "grad_clip",
        float,
        "Before each Adam step, scale the gradient of all parameters together down to this "
        "L2 norm when it is longer; 0: no clipping.",
        ADVANCED,
        metavar="NORM",
        show_default=", ".join(f"{clip:g} for {m}" for m, clip in DEFAULT_GRAD_CLIP.items()),
    ),
    _train(
        "augment_warmup",
        float,
        "Epochs over which the augmentation grows linearly from none (centre crop) to the "
        "full ranges; 0: full from the first step, as the paper.",
        ADVANCED,
        metavar="EPOCHS",
    ),
    _train(
        "ema_decay",
        float,
        "Evaluate (and save in best.pt / last.pt) an exponential moving average of the "
        "weights, w̄ <- D·w̄ + (1-D)·w after every step; 0: off, the raw weights.",
        ADVANCED,
        metavar="D",
    ),
    _train(
        "tau_start",
        float,
        "Deterministic annealing of the E-step: train with likelihood power τ = this for "
        "--tau-hold-epochs, then raise τ geometrically to --likelihood-power over "
        "--tau-anneal-epochs (one value per epoch); evaluation always routes with "
        "--likelihood-power. Unset: no annealing.",
        ADVANCED,
        metavar="TAU",
    ),
    _train("tau_hold_epochs", float, "Epochs trained at --tau-start.", ADVANCED, metavar="EPOCHS"),
    _train(
        "tau_anneal_epochs",
        float,
        "Epochs over which τ rises from --tau-start to --likelihood-power.",
        ADVANCED,
        metavar="EPOCHS",
    ),
)
CONFIG_OPTIONS = {row.name: row for row in TRAIN_OPTIONS if row.config is not None}
MODEL_NAMES = frozenset(row.name for row in opts.MODEL_OPTIONS)


def new_config(params: dict[str, Any], typed: frozenset[str] = frozenset()) -> TrainConfig:
    """The TrainConfig of a fresh run from the command's parameters: the preset's values for
    the options not in `typed` (those given on the command line), which keep theirs."""
    from emcaps_cli.presets import load_preset

    values = {name: row.to_config(params[name]) for name, row in CONFIG_OPTIONS.items()}
    preset = load_preset(values.pop("preset"))
    by_preset = (set(preset.model) | set(preset.train_fields(values["model"]))) - typed
    kept = {name: value for name, value in values.items() if name not in by_preset}
    model = {name: kept.pop(name) for name in MODEL_NAMES if name in kept}
    return preset.config(model, **kept)


def typed_names(ctx: typer.Context) -> frozenset[str]:
    """The parameters given on the command line (source by enum name: Typer may vendor click)."""
    return frozenset(
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    )


def typed_options(ctx: typer.Context) -> dict[str, Any]:
    """The training options typed on the command line, as values to compare with a stored run."""
    typed = typed_names(ctx) - {"out"}
    return {
        name: row.to_config(ctx.params[name])
        for name, row in CONFIG_OPTIONS.items()
        if name in typed
    }


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


@with_options(TRAIN_OPTIONS)
@friendly_errors
def train_command(ctx: typer.Context, **params: Any) -> None:
    """Train on the smallNORB cache; write checkpoints, metrics and curves to RUN_DIR."""
    from emcaps_cli.training.loop import train
    from emcaps_cli.training.signals import TrainingInterrupted
    from emcaps_cli.training.state import resume_config

    use_kernels(params["kernels"])
    if params["resume"]:
        if params["out"] is None:
            raise EmcapsError("--resume needs --out RUN_DIR (the run to continue)")
        config = resume_config(params["out"], **typed_options(ctx))
    else:
        config = new_config(params, typed_names(ctx))
    reporter = RichReporter()
    try:
        result = train(config, resume=params["resume"], reporter=reporter)
    except TrainingInterrupted as exc:
        reporter.close()
        typer.echo(f"interrupted: {exc}", err=True)
        raise typer.Exit(128 + int(exc.signum)) from None
    finally:
        reporter.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print_result(result)
    if params["json_out"]:
        print_json(result.to_dict())

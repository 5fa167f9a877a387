"""`emcaps train`: train a capsule network or the baseline CNN on the HDF5 cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from emcaps_cli.cli import model_options as opts
from emcaps_cli.cli._common import (
    console,
    friendly_errors,
    kernels_option,
    print_json,
    use_kernels,
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
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
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


def _typed_options(ctx: typer.Context) -> dict[str, Any]:
    """The options typed on the command line, by training-option name, as values to compare
    with a stored run (source by enum name: Typer may vendor click)."""
    typed = {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    } - {"resume", "json_out", "out", "kernels"}
    renamed = {"compile_model": "compile"}
    values = {renamed.get(n, n): ctx.params[n] for n in typed}
    if "arch" in values:
        values["arch"] = opts.parse_arch(values["arch"])
    if "data" in values:
        values["data"] = str(values["data"])
    return values


@friendly_errors
def train_command(
    ctx: typer.Context,
    data: Path = typer.Option(
        Path("data/smallnorb.h5"), "--data", help="HDF5 cache written by `emcaps prepare`."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        metavar="RUN_DIR",
        help="Run directory (config.json, metrics.jsonl, last.pt, best.pt, curves.png).",
        show_default="runs/YYYYmmdd-HHMMSS",
    ),
    model: str = opts.MODEL,
    arch: str = opts.ARCH,
    iters: int = opts.ITERS,
    pose: str = opts.POSE,
    coord_add: bool = opts.COORD_ADD,
    channels: int = opts.CHANNELS,
    routing: str = opts.ROUTING,
    final_lambda: float = opts.FINAL_LAMBDA,
    var_floor: float = opts.VAR_FLOOR,
    likelihood_power: float = opts.LIKELIHOOD_POWER,
    parametrisation: str = opts.PARAMETRISATION,
    loss: str | None = typer.Option(
        None,
        "--loss",
        help="spread | margin | cross-entropy.",
        show_default="spread for capsnet, cross-entropy for cnn",
    ),
    epochs: int = typer.Option(50, "--epochs", help="Total epochs (passes over the training set)."),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Images per step per process (effective batch × processes)."
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Adam learning rate of the first epoch.",
        show_default="2e-2 for capsnet, 3e-4 for cnn",
    ),
    lr_decay: float = typer.Option(
        0.96, "--lr-decay", help="Learning rate × this after every epoch (exponential decay)."
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Adam L2 weight decay."),
    margin_epochs: float | None = typer.Option(
        None,
        "--margin-epochs",
        help="Epochs over which the spread-loss margin rises linearly 0.2 -> 0.9.",
        show_default="half of --epochs",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, shuffling, augmentation."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    kernels: str | None = kernels_option(),
    validation_fraction: float = typer.Option(
        0.1,
        "--validation-fraction",
        help="Fraction (0..1) of the training images held out to choose best.pt; "
        "the test set is never used for selection.",
    ),
    split: str = typer.Option(
        "full",
        "--split",
        help="full | azimuth | elevation: train on familiar viewpoints only (section 5.1) "
        "and report familiar and novel test errors.",
    ),
    stop_at_error: float | None = typer.Option(
        None,
        "--stop-at-error",
        metavar="E",
        help="Stop after the first epoch whose familiar-view test error is <= E "
        "(a fraction: 0.037 means 3.7%).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue RUN_DIR/last.pt exactly; may raise --epochs."
    ),
    amp: bool = typer.Option(
        False, "--amp", help="bf16 autocast (CUDA only; refused on CPU). EM routing stays float32."
    ),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    limit_train: int | None = typer.Option(
        None, "--limit-train", metavar="N", help="Use a random N training images (by --seed)."
    ),
    limit_test: int | None = typer.Option(
        None, "--limit-test", metavar="N", help="Use a random N test images (by --seed)."
    ),
    augment: bool = typer.Option(
        True,
        "--augment/--no-augment",
        help="Training images: random 32x32 crop of the 48x48 image plus random brightness and "
        "contrast (section 5), or the centre crop only.",
    ),
    augment_warmup: float = typer.Option(
        5.0,
        "--augment-warmup",
        metavar="EPOCHS",
        help="Epochs over which the augmentation grows linearly from none (centre crop) to the "
        "full ranges; 0: full from the first step, as the paper.",
    ),
    diagnostics: bool = typer.Option(
        True,
        "--diagnostics/--no-diagnostics",
        help="Capsule-health statistics on a fixed batch after every epoch (metrics.jsonl, "
        "diagnostics.png; capsnet only, under 2 s an epoch for the paper model).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Train on the smallNORB cache; write checkpoints, metrics and curves to RUN_DIR."""
    from emcaps_cli.config import TrainConfig
    from emcaps_cli.training.loop import TrainingInterrupted, resume_config, train

    use_kernels(kernels)
    if resume:
        if out is None:
            raise EmcapsError("--resume needs --out RUN_DIR (the run to continue)")
        config = resume_config(out, **_typed_options(ctx))
    else:
        config = TrainConfig(
            data=str(data),
            out=None if out is None else str(out),
            model=opts.model_config(
                model,
                arch,
                iters,
                pose,
                coord_add,
                channels,
                routing,
                final_lambda,
                var_floor=var_floor,
                likelihood_power=likelihood_power,
                parametrisation=parametrisation,
            ),
            loss=loss,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            margin_epochs=margin_epochs,
            seed=seed,
            device=device,
            validation_fraction=validation_fraction,
            split=split,
            stop_at_error=stop_at_error,
            amp=amp,
            compile=compile_model,
            limit_train=limit_train,
            limit_test=limit_test,
            augment=augment,
            augment_warmup=augment_warmup,
            diagnostics=diagnostics,
        )
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
    reason = "reached --stop-at-error" if result.stopped == "stop-at-error" else "done"
    best = (
        f"best.pt = epoch {result.best_epoch}"
        + (
            f" (validation {_pct(result.best_validation_error)})"
            if result.best_validation_error is not None
            else ""
        )
        if result.best_epoch is not None
        else "no best.pt"
    )
    console.print(f"{reason} after {result.epochs_completed} epochs; {best}; {result.run_dir}")
    if json_out:
        print_json(result.to_dict())


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)

"""A run's state: the checkpoint payload, and how a resume is reconciled with the stored run.

Resume is exact: a checkpoint holds the model, optimiser, schedule position (epoch, step in the
epoch, global step), every rank's RNG states and the partial-epoch sums, so a resumed run is
bit-identical on the same hardware, routing kernels and number of processes. Only the
RESUMABLE options may differ from the stored run; a resume on another device, number of
processes or routing kernels is allowed and named in a note, since its numbers then differ
from a straight run's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emcaps_cli.checkpoint import LAST, load_checkpoint
from emcaps_cli.config import TrainConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.training.averaging import WeightAverage
from emcaps_cli.training.distributed import ProcessGroup
from emcaps_cli.training.rng import seed_rngs, set_rng_state
from emcaps_cli.training.rundir import check_new_run
from emcaps_cli.utils.reporter import Reporter

# Options that may differ on --resume; everything else must match the run being continued.
RESUMABLE = ("out", "data", "epochs", "stop_at_error", "device", "amp", "compile", "diagnostics")


def empty_partial() -> dict[str, float]:
    """The sums of an epoch before its first step (`clipped`: steps whose gradient was
    clipped)."""
    return {"loss_sum": 0.0, "errors": 0.0, "count": 0.0, "seconds": 0.0, "clipped": 0.0}


@dataclass
class Progress:
    """Where a run stands: the schedule position, the metrics so far, the best epoch, and the
    sums (all-reduced over ranks) of the steps already taken in the current epoch."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=empty_partial)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "validation_error": None})


def checkpoint_payload(
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: list[dict[str, Any]],
    progress: Progress,
    world: int,
    kernels: str | None,
    average: WeightAverage | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run at `progress`; `rng` holds every rank's `rng_state`.

    With a weight average, `model_state` is the average (what the run's metrics measured, and
    what evaluate and attack load) and `train_state` the raw weights training continues from."""
    raw = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = {"model_state": raw}
    if average is not None:
        averaged = {k: v.cpu() for k, v in average.state.items()}
        weights = {"model_state": averaged, "train_state": raw}
    return {
        "model_config": config.model.to_dict(),
        **weights,
        "train_config": config.to_dict(),
        "split": config.split,
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "optimizer_state": _to_cpu(optimizer.state_dict()),
        "rng": rng,
        "partial_epoch": dict(progress.partial),
        "history": progress.history,
        "best": dict(progress.best),
        "metrics": progress.history[-1] if progress.history else None,
        "world_size": world,
        "kernels": kernels,  # "c", "torch" or "triton" (kernels.routing_kernels); None: no routing
    }


def restore_progress(
    checkpoint: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    main: bool,
    average: WeightAverage | None = None,
) -> Progress:
    """Load a checkpoint's weights (and weight average) and optimiser state; return its
    progress. The partial-epoch sums are already all-reduced, so only rank 0 carries them on."""
    model.load_state_dict(checkpoint.get("train_state", checkpoint["model_state"]))
    if average is not None:
        average.load(checkpoint["model_state"])
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    return Progress(
        epoch=checkpoint["epoch"],
        step_in_epoch=checkpoint["step_in_epoch"],
        global_step=checkpoint["global_step"],
        history=list(checkpoint["history"]),
        partial=dict(checkpoint["partial_epoch"]) if main else empty_partial(),
        best=dict(checkpoint["best"]),
    )


def restore_rng(
    checkpoint: dict[str, Any],
    progress: Progress,
    seed: int,
    ctx: ProcessGroup,
    augment: torch.Generator,
    device: torch.device,
    run_dir: Path,
    reporter: Reporter,
) -> None:
    """Continue this rank's random streams, or reseed them (with a note) where the checkpoint
    was written by another number of processes or device type at an epoch boundary."""
    saved = checkpoint["rng"]
    if len(saved) == ctx.world and saved[ctx.rank]["device_type"] == device.type:
        set_rng_state(saved[ctx.rank], augment, device)
    elif progress.step_in_epoch:
        raise EmcapsError(
            f"{run_dir / LAST}: written mid-epoch by {len(saved)} process(es) on "
            f"{saved[0]['device_type']}; resume with the same number of processes and device"
        )
    else:
        seed_rngs(seed, ctx.rank, augment, salt=progress.global_step + 1)
        reporter.note(
            "resuming with a different number of processes or device: "
            "random streams are reseeded, so the run is not bit-identical"
        )


# ---------------------------------------------------------------------------------------
# Resume reconciliation


def flat_options(config: TrainConfig) -> dict[str, Any]:
    """A config's options by command-line name: the model options beside the training ones."""
    train = {k: v for k, v in config.to_dict().items() if k != "model"}
    return {**train, **config.model.to_dict()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value}"


def resume_conflicts(stored: TrainConfig, given: dict[str, Any]) -> list[str]:
    """`--lr: run has 0.003, you gave 0.1` for each given option that differs from the stored
    run and may not change on resume. `given` maps option names (as `flat_options`) to values;
    None means "not given"."""
    kept = flat_options(stored)
    out = []
    for name, value in given.items():
        if name in RESUMABLE or value is None or _plain(value) == kept[name]:
            continue
        flag = "--" + name.replace("_", "-")
        out.append(f"{flag}: run has {_show(kept[name])}, you gave {_show(_plain(value))}")
    return out


def refuse_conflicts(run_dir: Path, conflicts: list[str]) -> None:
    if conflicts:
        may = ", ".join("--" + r.replace("_", "-") for r in RESUMABLE if r != "out")
        raise EmcapsError("; ".join(conflicts) + f" (resuming {run_dir}: only {may} may change)")


def load_last(run_dir: Path) -> dict[str, Any]:
    """The checkpoint a resume continues."""
    if not (run_dir / LAST).exists():
        raise EmcapsError(
            f"--resume: {run_dir} holds no {LAST} to continue (drop --resume to start a run)"
        )
    return load_checkpoint(run_dir / LAST, map_location="cpu")


def resume_config(run_dir: str | os.PathLike, **given: Any) -> TrainConfig:
    """The config of the run in `run_dir` (from its last.pt), with the RESUMABLE options among
    `given` applied. `given` holds options by name (model options too: `arch`, `iters`); one
    equal to the stored value is accepted, one that differs (and may not change) is refused."""
    run_dir = Path(run_dir)
    unknown = sorted(set(given) - set(flat_options(TrainConfig())))
    if unknown:
        raise ValueError(f"not training options: {', '.join(unknown)}")
    data = load_last(run_dir)
    stored = TrainConfig.from_dict(data["train_config"], str(run_dir / LAST))
    refuse_conflicts(run_dir, resume_conflicts(stored, given))
    changes = {k: v for k, v in given.items() if k in RESUMABLE and v is not None}
    return dataclasses.replace(stored, **{**changes, "out": str(run_dir)})


def start_config(
    config: TrainConfig, resume: bool, main: bool
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config a run in `config.out` trains with, and the checkpoint it continues (None for a
    new run). A new run fills in the defaults that depend on other options and refuses a
    directory that holds a run; a resume takes the stored config, with the RESUMABLE options
    of `config` (None there, as for loss or margin_epochs, means "as the run was started")."""
    run_dir = Path(config.out)
    if not resume:
        if main:
            check_new_run(run_dir)
        return config.resolved(), None
    checkpoint = load_last(run_dir)
    stored = TrainConfig.from_dict(checkpoint["train_config"], str(run_dir / LAST))
    refuse_conflicts(run_dir, resume_conflicts(stored, flat_options(config)))
    config = dataclasses.replace(stored, **{k: getattr(config, k) for k in RESUMABLE})
    _require_data(config.data)
    if checkpoint["epoch"] >= config.epochs:
        raise EmcapsError(
            f"{run_dir / LAST}: already trained {checkpoint['epoch']} epochs; "
            "pass a larger --epochs to continue"
        )
    anneal = config.lr_anneal_epochs  # a cosine run is stored resolved: always set
    if config.lr_schedule == "cosine" and config.epochs > max(stored.epochs, anneal):
        raise EmcapsError(
            f"--epochs {config.epochs}: the cosine learning rate of {run_dir} reaches 0 after "
            f"{anneal:g} epochs; a longer run needs a new run with --lr-anneal-epochs"
        )
    return config, checkpoint


def _require_data(data: str) -> None:
    """On resume the stored cache path must still lead to the cache."""
    if not Path(data).exists():
        raise EmcapsError(
            f"{data}: the cache this run was trained on is not there; pass --data PATH to "
            "resume with the cache at its new place"
        )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj

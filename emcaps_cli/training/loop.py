"""Training: the epoch loop, evaluation after every epoch, and the run it writes.

The recipe (see docs/training.md for the reasons): Adam, lr 2e-2 (capsules) or 3e-4 (CNN)
decayed by 0.96 after every epoch, batch 16, no weight decay, the capsule network's gradient
clipped to the norm `DEFAULT_GRAD_CLIP` before each step; spread-loss margin linear 0.2 -> 0.9
over the first half of the epochs (section 4.1). Images: a random crop of
`ModelConfig.input_size` (32) from the 48x48 image for training (its reach grown from none over
the first `augment_warmup` epochs), the centre crop for validation and test, each crop
standardised (`ModelConfig.standardize`; section 5). The whole cache sits on the training
device as uint8 and is augmented in batches.

Multi-process: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every rank
trains on its shard of each epoch's permutation through DistributedDataParallel; `batch_size`
is per process. Sums are all-reduced; only rank 0 writes files.

Beside this module: data (splits, the images on the device), schedule (lr, margin,
augmentation), state (checkpoint payload, exact resume), rng, distributed, signals, kernels
and rundir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from emcaps_cli.capsules.health import capsule_health
from emcaps_cli.checkpoint import BEST, LAST, save_checkpoint
from emcaps_cli.config import ModelConfig, TrainConfig
from emcaps_cli.data.transforms import eval_batch, train_batch
from emcaps_cli.errors import EmcapsError
from emcaps_cli.losses import get_loss
from emcaps_cli.models import build_model, count_parameters
from emcaps_cli.presets import routing_rule
from emcaps_cli.training.averaging import WeightAverage
from emcaps_cli.training.clipping import clip_gradient
from emcaps_cli.training.data import (
    DeviceData,
    LabelledImages,
    epoch_permutation,
    load_device_data,
)
from emcaps_cli.training.distributed import ProcessGroup, setup_distributed
from emcaps_cli.training.kernels import kernels_change, routing_kernels
from emcaps_cli.training.rng import rng_state, seed_rngs
from emcaps_cli.training.rundir import (
    CONFIG_JSON,
    CURVES_PNG,
    DIAGNOSTICS_PNG,
    METRICS_JSONL,
    locked_run_dir,
    plot,
    write_json,
    write_metrics,
)
from emcaps_cli.training.schedule import Schedule, parameter_groups
from emcaps_cli.training.signals import StopRequest, TrainingInterrupted
from emcaps_cli.training.state import (
    Progress,
    checkpoint_payload,
    empty_partial,
    restore_progress,
    restore_rng,
    start_config,
)
from emcaps_cli.training.state import resume_config as resume_config
from emcaps_cli.utils.reporter import Reporter
from emcaps_cli.utils.threads import keep_fair

__all__ = ["TrainResult", "TrainingInterrupted", "resume_config", "train"]

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (scores, target, margin)
HEALTH_IMAGES = 16  # training images of the fixed diagnostics batch
# Evaluation batches are this many training batches: they follow --batch-size, so the memory a
# user sized with it bounds evaluation too (no activations kept for a backward), and validation
# errors stay those of earlier runs. defaults.EVAL_BATCH_SIZE (evaluate, attack) is fixed.
EVAL_BATCHES_PER_BATCH = 2
# Steps between reads of the training loss and the finiteness checks from the device. A read
# waits for the device to finish (a host sync; under torchrun also an all-reduce), so the loop
# reads after the first step of each stretch of an epoch, then once this many steps are pending,
# and after an epoch's last step: a non-finite loss or gradient stops the run at most this many
# steps after the step that made it, and the progress bar's loss is that of the last read step.
READBACK_STEPS = 50


@dataclass
class TrainResult:
    run_dir: Path
    epochs_completed: int
    global_step: int
    stopped: str  # "completed" | "stop-at-error"
    best_epoch: int | None
    best_validation_error: float | None
    last_metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


@dataclass
class _Run:
    """Everything one process's training holds between its steps."""

    config: TrainConfig  # resolved
    ctx: ProcessGroup
    device: torch.device
    reporter: Reporter
    data: DeviceData
    model: torch.nn.Module  # the network itself: weights, checkpoints, diagnostics
    train_model: torch.nn.Module  # the network as trained (DDP-wrapped, compiled)
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augment: torch.Generator  # augmentation stream, on the training device
    loss_fn: LossFn
    train_batch: Callable[..., torch.Tensor]
    schedule: Schedule
    progress: Progress
    kernels: str | None  # the routing kernels this process trains on
    average: WeightAverage | None  # the weights evaluated and saved, when --ema-decay > 0
    health_batch: tuple[torch.Tensor, torch.Tensor] | None  # (images, labels)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    def payload(self) -> dict[str, Any]:
        """The checkpoint; every rank must call it (it gathers RNG states)."""
        rng = self.ctx.gather(rng_state(self.augment, self.device))
        return checkpoint_payload(
            self.config,
            self.model,
            self.optimizer,
            rng,
            self.progress,
            self.ctx.world,
            self.kernels,
            self.average,
        )

    def evaluated(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the network holds the weights a run is evaluated with."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.applied(self.model)


@dataclass(frozen=True)
class _Parts:
    """The replaceable parts of training (see `train`)."""

    build_model: Callable[[ModelConfig], torch.nn.Module]
    get_loss: Callable[[str], LossFn]
    train_batch: Callable[..., torch.Tensor]


class _EpochSums:
    """This process's sums over the steps of an epoch taken since `t0`, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.errors = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        # steps whose gradient norm exceeded --grad-clip (the same on every rank)
        self.clipped = torch.zeros((), dtype=torch.float64, device=device)
        self.margin: float | None = None  # the spread-loss margin of the last step
        # the steps not yet read back (`_read_back`): (loss, [loss finite, gradient finite])
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.loss: float | None = None  # the loss of the last step read back
        self.t0 = time.perf_counter()

    def read_due(self, step: int, steps: int) -> bool:
        """Whether the loop reads the pending steps back after step `step` of `steps`."""
        return self.loss is None or len(self.pending) >= READBACK_STEPS or step >= steps

    def merged(self, partial: dict[str, float], ctx: ProcessGroup) -> dict[str, float]:
        """`partial` plus these sums, all-reduced over ranks."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        sums = ctx.sum_(
            torch.cat([self.loss_sum[None], self.errors[None], count, self.clipped[None]])
        )
        sums = sums.tolist()
        return {
            "loss_sum": partial["loss_sum"] + sums[0],
            "errors": partial["errors"] + sums[1],
            "count": partial["count"] + sums[2],
            "seconds": partial["seconds"] + time.perf_counter() - self.t0,
            # checkpoints written before the count lack it
            "clipped": partial.get("clipped", 0.0) + sums[3] / ctx.world,
        }


def train(
    config: TrainConfig,
    resume: bool = False,
    reporter: Reporter | None = None,
    *,
    build_model: Callable[[ModelConfig], torch.nn.Module] = build_model,
    get_loss: Callable[[str], LossFn] = get_loss,
    train_batch: Callable[..., torch.Tensor] = train_batch,
) -> TrainResult:
    """Train the network `config` describes; write the run directory; return a summary.

    With `resume`, continue `config.out`/last.pt exactly (its train_config must match `config`
    apart from RESUMABLE options; `resume_config` builds such a config). Raises EmcapsError on
    bad input or a non-finite loss or gradient (at most READBACK_STEPS steps after it; nothing
    trained since is saved, so last.pt keeps the last good epoch) and TrainingInterrupted after
    saving last.pt on Ctrl-C / SIGTERM.

    `build_model` (ModelConfig -> network), `get_loss` (loss name -> loss function) and
    `train_batch` (as `data.transforms.train_batch`) are the library's unless given.
    """
    ctx, device = setup_distributed(config.device)
    try:
        config = _placed(config, resume, ctx, device)
        # Only rank 0 writes the run directory, so only rank 0 holds its lock.
        with locked_run_dir(config.out) if ctx.main else contextlib.nullcontext():
            parts = _Parts(build_model, get_loss, train_batch)
            run = _start(config, resume, reporter or Reporter(), ctx, device, parts)
            stopped = _train_epochs(run)
            ctx.barrier()
            return _result(run, stopped)
    finally:
        ctx.close()


def _placed(
    config: TrainConfig, resume: bool, ctx: ProcessGroup, device: torch.device
) -> TrainConfig:
    """`config` with its run directory chosen (the same on every rank) and the cache path made
    absolute, so a run resumes from any working directory."""
    if config.amp and device.type != "cuda":
        raise EmcapsError("--amp: bf16 autocast is for CUDA only; drop --amp when training on CPU")
    if resume and not config.out:
        raise EmcapsError("--resume needs --out RUN_DIR (the run to continue)")
    default = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(ctx.broadcast(config.out or default))
    return dataclasses.replace(config, out=str(run_dir), data=str(Path(config.data).absolute()))


def _start(
    config: TrainConfig,
    resume: bool,
    reporter: Reporter,
    ctx: ProcessGroup,
    device: torch.device,
    parts: _Parts,
) -> _Run:
    """Reconcile the config, load the data, build (or restore) the model, optimiser and random
    streams, write config.json: the run, ready for its next step."""
    if not ctx.main:
        reporter = Reporter()
    config, checkpoint = start_config(config, resume, ctx.main)
    data = load_device_data(config, device)
    torch.manual_seed(config.seed)
    model = parts.build_model(config.model).to(device)
    groups = parameter_groups(model, config.front_lr_scale)
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    augment = torch.Generator(device=device)
    seed_rngs(config.seed, ctx.rank, augment)
    kernels = routing_kernels(config.model, device)
    progress = Progress()
    average = WeightAverage.of(model, config.ema_decay)
    if checkpoint is not None:
        progress = restore_progress(checkpoint, model, optimizer, ctx.main, average)
        run_dir = Path(config.out)
        restore_rng(checkpoint, progress, config.seed, ctx, augment, device, run_dir, reporter)
        if note := kernels_change(checkpoint.get("kernels"), kernels):
            reporter.note(note)
    train_model, eval_model = _wrapped(model, config.compile, ctx, device)
    run = _Run(
        config=config,
        ctx=ctx,
        device=device,
        reporter=reporter,
        data=data,
        model=model,
        train_model=train_model,
        eval_model=eval_model,
        optimizer=optimizer,
        augment=augment,
        loss_fn=parts.get_loss(config.loss),
        train_batch=parts.train_batch,
        schedule=Schedule.of(config, len(data.train.labels), ctx.world),
        progress=progress,
        kernels=kernels,
        average=average,
        health_batch=_health_batch(config, data.train),
    )
    _announce(run, resume)
    return run


def _wrapped(
    model: torch.nn.Module, compiled: bool, ctx: ProcessGroup, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network to train (DDP over several processes) and to evaluate, compiled if asked."""
    train_model: torch.nn.Module = model
    if ctx.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: torch.nn.Module = model
    if compiled:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)
    return train_model, eval_model


def _health_batch(
    config: TrainConfig, train: LabelledImages
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fixed batch of training images for the capsule diagnostics, or None without them."""
    if not (config.diagnostics and config.model.model == "capsnet"):
        return None
    first = slice(0, min(HEALTH_IMAGES, len(train.labels)))
    model = config.model
    images = eval_batch(
        train.images[first], model.channels, size=model.input_size, order=model.standardize
    )
    return images, train.labels[first]


def _announce(run: _Run, resume: bool) -> None:
    """Write config.json (and, on resume, the metrics so far); tell the reporter."""
    config, ctx = run.config, run.ctx
    parameters = count_parameters(run.model)
    routing = routing_rule(config.model)
    if ctx.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        setting = {
            "routing": routing,
            "train_config": config.to_dict(),
            "model_config": config.model.to_dict(),
            "parameters": parameters,
            "images": run.data.sizes,
            "world_size": ctx.world,
            "device": str(run.device),
            "kernels": run.kernels,
            "steps_per_epoch": run.schedule.steps_per_epoch,
            "torch": torch.__version__,
            "written": datetime.now().isoformat(timespec="seconds"),
        }
        write_json(run.run_dir / CONFIG_JSON, setting)
        if resume:
            write_metrics(run.run_dir / METRICS_JSONL, run.progress.history)
    p = run.progress
    run.reporter.start(
        {
            "run_dir": str(run.run_dir),
            "routing": routing,
            "device": str(run.device),
            "world_size": ctx.world,
            "parameters": parameters,
            "images": run.data.sizes,
            "resumed_at": (p.epoch, p.step_in_epoch) if resume else None,
            "config": config.to_dict(),
        }
    )


def _train_epochs(run: _Run) -> str:
    """Train until `epochs` or `stop_at_error`; return how the run stopped."""
    config = run.config
    with StopRequest() as stop:
        while run.progress.epoch < config.epochs:
            lr, sums = train_one_epoch(run, stop)
            metrics = evaluate_epoch(run, lr, sums.margin)
            _end_epoch(run, metrics)
            familiar_error = metrics.get("test_familiar_error", metrics["test_error"])
            if config.stop_at_error is not None and familiar_error is not None:
                if familiar_error <= config.stop_at_error:
                    return "stop-at-error"
    return "completed"


def train_one_epoch(run: _Run, stop: StopRequest) -> tuple[float, _EpochSums]:
    """The remaining steps of the current epoch; adds their sums to `run.progress.partial`.
    Returns the epoch's learning rate and this stretch's sums. On a stop request every rank
    saves last.pt and raises TrainingInterrupted."""
    config, ctx, device, p = run.config, run.ctx, run.device, run.progress
    lr = run.schedule.learning_rate(p.epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints before the scale: 1 group
    set_likelihood_power(run.model, run.schedule.likelihood_power(p.epoch))
    usable = run.schedule.per_rank * ctx.world
    n_train = len(run.data.train.labels)
    order = epoch_permutation(n_train, config.seed, p.epoch)[:usable]
    shard = order[ctx.rank :: ctx.world].to(device)
    steps = run.schedule.steps_per_epoch
    run.reporter.epoch_start(p.epoch + 1, config.epochs, steps, p.step_in_epoch)
    sums = _EpochSums(device)
    run.train_model.train()
    while p.step_in_epoch < steps:
        if _stop_requested(run, stop, sums):
            _save_interrupted(run, sums, stop.signum or signal.SIGTERM)
        if device.type == "cpu":
            keep_fair()  # threads sized to the CPUs other processes leave free
        start = p.step_in_epoch * config.batch_size
        _train_step(run, shard[start : start + config.batch_size], sums)
        if sums.read_due(p.step_in_epoch, steps):
            _read_back(run, sums)
        elapsed = time.perf_counter() - sums.t0
        ips = sums.count * ctx.world / max(elapsed, 1e-9)
        run.reporter.step(p.step_in_epoch, sums.loss if sums.loss is not None else math.nan, ips)
    p.partial = sums.merged(p.partial, ctx)
    return lr, sums


def _stop_requested(run: _Run, stop: StopRequest, sums: _EpochSums) -> bool:
    """Whether any rank has been asked to stop. Under torchrun on CUDA the ranks agree on it only
    when no step is pending a read (the all-reduce would wait for the device), every
    READBACK_STEPS steps; on the CPU and in one process at every step."""
    if run.ctx.world > 1 and run.device.type == "cuda" and sums.pending:
        return False
    return run.ctx.any(stop.signum is not None, run.device)


def _train_step(run: _Run, idx: torch.Tensor, sums: _EpochSums) -> None:
    """One optimiser step on the training rows `idx`. Its loss, errors and whether its loss and
    gradient were finite stay on the device, added to `sums` (read by `_read_back`)."""
    p = run.progress
    sums.margin = margin = run.schedule.margin(p.global_step)
    images = _training_images(run, idx)
    target = run.data.train.labels[idx]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.config.amp):
        scores = run.train_model(images)  # (n, 5)
    loss = run.loss_fn(scores.float(), target, margin)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Gradients are identical on every rank after DDP's all-reduce.
    grads = [q.grad for q in run.model.parameters() if q.grad is not None]
    finite_grads = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    value = loss.detach().double()
    sums.pending.append((value, torch.stack([torch.isfinite(value), finite_grads])))
    if run.config.grad_clip > 0:
        sums.clipped += clip_gradient(run.model.parameters(), run.config.grad_clip)
    # A non-finite gradient reaches these weights before `_read_back` sees it; nothing trained
    # after it is saved (`_read_back` runs before every checkpoint and raises).
    run.optimizer.step()
    p.step_in_epoch += 1
    p.global_step += 1
    if run.average is not None:
        run.average.update(run.model, p.global_step)
    n = len(idx)
    sums.loss_sum += value * n
    sums.errors += (scores.detach().argmax(dim=1) != target).sum()
    sums.count += n


def _read_back(run: _Run, sums: _EpochSums) -> None:
    """Read the pending steps' losses and finiteness from the device (one host sync; under
    torchrun one all-reduce, so that every rank stops at once) and keep the last loss for the
    progress bar. Raises EmcapsError naming the first step whose loss (on any rank) or
    gradient was not finite."""
    if not sums.pending:
        return
    losses = torch.stack([loss for loss, _ in sums.pending])
    bad = run.ctx.sum_(torch.stack([~finite for _, finite in sums.pending]).double())
    rows = torch.cat([losses[:, None], bad], dim=1).tolist()  # [loss, loss bad, gradient bad]
    first = run.progress.step_in_epoch - len(rows) + 1  # the first pending step, from 1
    sums.pending.clear()
    for step, (loss, loss_bad, gradient_bad) in enumerate(rows, start=first):
        if loss_bad:
            value = loss if not math.isfinite(loss) else math.nan  # another rank's loss
            raise EmcapsError(_nonfinite_message(run, value, step))
        if gradient_bad:
            raise EmcapsError(_nonfinite_message(run, math.nan, step, "gradient"))
    sums.loss = rows[-1][0]


def set_likelihood_power(model: torch.nn.Module, power: float) -> None:
    """Route every capsule layer of `model` with the E-step's likelihood power `power`."""
    for module in model.modules():
        if hasattr(module, "likelihood_power"):
            module.likelihood_power = power


def _training_images(run: _Run, idx: torch.Tensor) -> torch.Tensor:
    """The network's input for training rows `idx`: augmented, or the centre crop."""
    model, images = run.config.model, run.data.train.images[idx]
    if not run.config.augment:
        return eval_batch(images, model.channels, size=model.input_size, order=model.standardize)
    strength = run.schedule.augment_strength(run.progress.global_step)
    return run.train_batch(
        images,
        model.channels,
        run.augment,
        size=model.input_size,
        strength=strength,
        order=model.standardize,
    )


def _save_interrupted(run: _Run, sums: _EpochSums, signum: int) -> None:
    """Save the state after the last completed step to last.pt and raise TrainingInterrupted
    (or EmcapsError when a step since the last read was not finite)."""
    _read_back(run, sums)
    run.progress.partial = sums.merged(run.progress.partial, run.ctx)
    checkpoint = run.payload()
    if run.ctx.main:
        save_checkpoint(run.run_dir / LAST, checkpoint)
    raise TrainingInterrupted(run.run_dir / LAST, signum)


def evaluate_epoch(run: _Run, lr: float, margin: float | None) -> dict[str, Any]:
    """Validation and test errors after the epoch just trained, beside its training sums and,
    for capsule networks, the capsule-health diagnostics: the epoch's metrics line. Counts the
    epoch as completed."""
    config, p = run.config, run.progress
    train_seconds = p.partial["seconds"]
    run.reporter.evaluating()
    t_eval = time.perf_counter()
    trained_power = run.schedule.likelihood_power(p.epoch)
    set_likelihood_power(run.model, config.model.likelihood_power)  # evaluate the model's E-step
    with run.evaluated():
        val = _count_errors(run, run.data.validation).tolist()
        test = _count_errors(run, run.data.test).tolist()
    p.epoch += 1
    metrics: dict[str, Any] = {
        "epoch": p.epoch,
        "step": p.global_step,
        "train_loss": p.partial["loss_sum"] / max(p.partial["count"], 1),
        "train_error": p.partial["errors"] / max(p.partial["count"], 1),
        "margin": margin,
        "lr": lr,
        "validation_error": _rate(val[0], val[1]),
        "test_error": _rate(test[0], test[1]),
    }
    if config.split != "full":
        metrics["test_familiar_error"] = _rate(test[2], test[3])
        metrics["test_novel_error"] = _rate(test[0] - test[2], test[1] - test[3])
    if config.tau_start is not None:
        metrics["train_likelihood_power"] = trained_power
    if config.grad_clip > 0:
        metrics["clipped_steps"] = p.partial.get("clipped", 0.0) / run.schedule.steps_per_epoch
    metrics["images_per_second"] = p.partial["count"] / max(train_seconds, 1e-9)
    metrics["train_seconds"] = train_seconds
    if run.health_batch is not None and run.ctx.main:
        metrics["diagnostics"] = capsule_health(run.model, *run.health_batch, run.loss_fn, margin)
    metrics["seconds"] = train_seconds + time.perf_counter() - t_eval
    return metrics


@torch.no_grad()
def _count_errors(run: _Run, rows: LabelledImages) -> torch.Tensor:
    """All-reduced [errors, count, familiar errors, familiar count] over this rank's shard."""
    ctx, model, images = run.ctx, run.eval_model, rows.images
    channels, size = run.config.model.channels, run.config.model.input_size
    order = run.config.model.standardize
    batch_size = EVAL_BATCHES_PER_BATCH * run.config.batch_size
    counts = torch.zeros(4, dtype=torch.float64, device=images.device)
    shard = torch.arange(ctx.rank, len(rows.labels), ctx.world, device=images.device)
    was_training = model.training
    model.eval()
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        if images.device.type == "cpu":
            keep_fair()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.config.amp):
            scores = model(eval_batch(images[idx], channels, size=size, order=order))
        wrong = scores.float().argmax(dim=1) != rows.labels[idx]
        fam = rows.familiar[idx]
        n = torch.tensor(len(idx), device=wrong.device)
        counts += torch.stack([wrong.sum(), n, (wrong & fam).sum(), fam.sum()]).double()
    model.train(was_training)
    return ctx.sum_(counts)


def _rate(errors: float, count: float) -> float | None:
    return errors / count if count > 0 else None


def _end_epoch(run: _Run, metrics: dict[str, Any]) -> None:
    """Record the epoch's metrics, the best epoch so far, and (rank 0) write the run files."""
    p = run.progress
    p.history.append(metrics)
    p.step_in_epoch = 0
    p.partial = empty_partial()
    # Without a validation set best.pt follows last.pt.
    val_error = metrics["validation_error"]
    improved = (
        val_error is None or p.best["epoch"] is None or val_error < p.best["validation_error"]
    )
    if improved:
        p.best = {"epoch": p.epoch, "validation_error": val_error}
    checkpoint = run.payload()
    if run.ctx.main:
        run_dir = run.run_dir
        write_metrics(run_dir / METRICS_JSONL, p.history)
        save_checkpoint(run_dir / LAST, checkpoint)
        if improved:
            save_checkpoint(run_dir / BEST, checkpoint)
        plot(run_dir / CURVES_PNG, p.history, run.reporter, "curves")
        if run.health_batch is not None:
            plot(run_dir / DIAGNOSTICS_PNG, p.history, run.reporter, "diagnostics")
    run.reporter.epoch_end(metrics)


def _result(run: _Run, stopped: str) -> TrainResult:
    p = run.progress
    return TrainResult(
        run_dir=run.run_dir,
        epochs_completed=p.epoch,
        global_step=p.global_step,
        stopped=stopped,
        best_epoch=p.best["epoch"],
        best_validation_error=p.best["validation_error"],
        last_metrics=p.history[-1] if p.history else {},
    )


def _nonfinite_message(run: _Run, value: float, step: int, what: str = "loss") -> str:
    """The error for a non-finite `what` at step `step` (from 1) of the current epoch."""
    p, last = run.progress, run.run_dir / LAST
    lr = run.schedule.learning_rate(p.epoch)
    kept = f"{last} keeps the last good epoch" if last.exists() else "no checkpoint was written"
    return (
        f"non-finite training {what} ({value}) at epoch {p.epoch + 1}, step {step} "
        f"(lr {lr:g}); stopped without saving the weights trained since; {kept}. "
        "Try a smaller --lr"
    )

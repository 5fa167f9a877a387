"""Training: data splits, the epoch loop, metrics, checkpoints, exact resume, DDP.

The recipe (see docs/training.md for the reasons): Adam, lr 1e-2 (capsules) or 3e-4 (CNN)
decayed by 0.96 after every epoch, batch 32, no weight decay; spread-loss margin linear
0.2 -> 0.9 over the first half of the epochs (section 4.1). Images: per-image standardisation,
random 32x32 crop of the 48x48 image plus random brightness and contrast for training (ranges
optionally grown from none over a warm-up), centre crop for validation and test (section 5).
The whole cache sits on the training device as uint8 and is augmented in batches.

Multi-process: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every rank
trains on its shard of each epoch's permutation through DistributedDataParallel; `batch_size`
is per process. Sums are all-reduced; only rank 0 writes files.

Resume is exact: a checkpoint holds the model, optimiser, schedule position (epoch, step in the
epoch, global step), every rank's RNG states and the partial-epoch sums, so a resumed run is
bit-identical on the same hardware and number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from emcaps_cli.capsules.health import capsule_health
from emcaps_cli.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from emcaps_cli.config import TrainConfig
from emcaps_cli.data.cache import load_cache, require_image_size
from emcaps_cli.data.transforms import eval_batch, train_batch
from emcaps_cli.data.viewpoints import familiar_mask
from emcaps_cli.errors import EmcapsError
from emcaps_cli.losses import get_loss, spread_margin
from emcaps_cli.models import build_model, count_parameters
from emcaps_cli.training.rundir import check_new_run, locked_run_dir
from emcaps_cli.utils.atomic import atomic_path
from emcaps_cli.utils.device import resolve_device
from emcaps_cli.utils.reporter import Reporter
from emcaps_cli.utils.threads import keep_fair

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
CURVES_PNG = "curves.png"
DIAGNOSTICS_PNG = "diagnostics.png"
HEALTH_IMAGES = 16  # training images of the fixed diagnostics batch

# Options that may differ on --resume; everything else must match the run being continued.
RESUMABLE = ("out", "data", "epochs", "stop_at_error", "device", "amp", "compile", "diagnostics")


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


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the state after the last completed step is in `checkpoint`."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        self.checkpoint = checkpoint
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped; state after the last completed step saved to {checkpoint} "
            f"(continue with --resume --out {checkpoint.parent})"
        )


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class SplitIndices:
    """Row indices into the cache: training and validation rows of /train, test rows of /test,
    and which test rows have familiar viewpoints (all of them for split "full")."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    test_familiar: np.ndarray  # bool, aligned with `test`


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so independent streams never share a seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def split_indices(
    train_info: np.ndarray,
    test_info: np.ndarray,
    split: str = "full",
    validation_fraction: float = 0.1,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> SplitIndices:
    """Choose the rows a run trains, validates and tests on.

    Training pool: /train rows with familiar viewpoints for `split` (section 5.1), optionally
    a random `limit_train` of them; a random `validation_fraction` of the pool is held out.
    Test: all /test rows (or a random `limit_test`), each marked familiar or novel.
    """
    pool = np.flatnonzero(familiar_mask(train_info, split))
    if len(pool) == 0:
        raise EmcapsError(f"--split {split}: no training image has a familiar viewpoint")
    rng = np.random.default_rng(derive_seed(seed, 1))
    if limit_train is not None and limit_train < len(pool):
        pool = np.sort(rng.choice(pool, size=limit_train, replace=False))
    shuffled = rng.permutation(pool)
    n_val = int(round(validation_fraction * len(pool)))
    if len(pool) - n_val < 1:
        raise EmcapsError(
            f"--validation-fraction {validation_fraction}: leaves no training image "
            f"(pool of {len(pool)})"
        )
    validation, train = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
    test = np.arange(len(test_info))
    if limit_test is not None and limit_test < len(test):
        test = np.sort(np.random.default_rng(derive_seed(seed, 2)).choice(test, limit_test, False))
    return SplitIndices(train, validation, test, familiar_mask(test_info[test], split))


def config_split(config: TrainConfig, cache: Any) -> SplitIndices:
    """The rows a run of `config` uses in a loaded cache (`data.cache.load_cache`)."""
    return split_indices(
        cache.train.info,
        cache.test.info,
        config.split,
        config.validation_fraction,
        config.seed,
        config.limit_train,
        config.limit_test,
    )


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffling of epoch `epoch`: a function of (seed, epoch) only, the same on every rank,
    so resuming needs no shuffling state."""
    gen = torch.Generator().manual_seed(derive_seed(seed, 3, epoch))
    return torch.randperm(n, generator=gen)


# ---------------------------------------------------------------------------------------
# Distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return _Dist(), device
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank, world, local_rank, owns), device


# ---------------------------------------------------------------------------------------
# RNG state (as tensors and plain types, so checkpoints load with weights_only=True)


def _rng_state(augment: torch.Generator, device: torch.device) -> dict[str, Any]:
    np_key, np_state, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "device_type": device.type,
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augment.get_state(),
        "numpy": {
            "key": np_key,
            "state": torch.from_numpy(np_state.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any], augment: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and state["torch_cuda"] is not None:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    augment.set_state(state["augment"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["key"],
            n["state"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _seed_rngs(seed: int, rank: int, augment: torch.Generator, salt: int = 0) -> None:
    """Per-rank streams for dropout (global torch), numpy, python random and augmentation."""
    torch.manual_seed(derive_seed(seed, 4, rank, salt))
    np.random.seed(derive_seed(seed, 5, rank, salt) % 2**32)
    random.seed(derive_seed(seed, 6, rank, salt))
    augment.manual_seed(derive_seed(seed, 7, rank, salt))


# ---------------------------------------------------------------------------------------
# Signals


class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


# ---------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in history))


def _flat(config: TrainConfig) -> dict[str, Any]:
    """A config's options by command-line name: the model options beside the training ones."""
    train = {k: v for k, v in config.to_dict().items() if k != "model"}
    return {**train, **config.model.to_dict()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value}"


def resume_conflicts(stored: TrainConfig, given: dict[str, Any]) -> list[str]:
    """`--lr: run has 0.003, you gave 0.1` for each given option that differs from the stored
    run and may not change on resume. `given` maps option names (as `_flat`) to values; None
    means "not given"."""
    kept = _flat(stored)
    out = []
    for name, value in given.items():
        if name in RESUMABLE or value is None or _plain(value) == kept[name]:
            continue
        flag = "--" + name.replace("_", "-")
        out.append(f"{flag}: run has {_show(kept[name])}, you gave {_show(_plain(value))}")
    return out


def _refuse_conflicts(run_dir: Path, conflicts: list[str]) -> None:
    if conflicts:
        may = ", ".join("--" + r.replace("_", "-") for r in RESUMABLE if r != "out")
        raise EmcapsError("; ".join(conflicts) + f" (resuming {run_dir}: only {may} may change)")


def _load_last(run_dir: Path) -> dict[str, Any]:
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
    unknown = sorted(set(given) - set(_flat(TrainConfig())))
    if unknown:
        raise ValueError(f"not training options: {', '.join(unknown)}")
    data = _load_last(run_dir)
    stored = TrainConfig.from_dict(data["train_config"])
    _refuse_conflicts(run_dir, resume_conflicts(stored, given))
    changes = {k: v for k, v in given.items() if k in RESUMABLE and v is not None}
    return dataclasses.replace(stored, **{**changes, "out": str(run_dir)})


# ---------------------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def _count_errors(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    familiar: torch.Tensor,
    channels: int,
    batch_size: int,
    ctx: _Dist,
    amp: bool,
) -> torch.Tensor:
    """All-reduced [errors, count, familiar errors, familiar count] over this rank's shard."""
    counts = torch.zeros(4, dtype=torch.float64, device=images.device)
    shard = torch.arange(ctx.rank, len(labels), ctx.world, device=images.device)
    was_training = model.training
    model.eval()
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        if images.device.type == "cpu":
            keep_fair()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            scores = model(eval_batch(images[idx], channels))
        wrong = scores.float().argmax(dim=1) != labels[idx]
        fam = familiar[idx]
        counts += torch.stack(
            [
                wrong.sum(),
                torch.tensor(len(idx), device=wrong.device),
                (wrong & fam).sum(),
                fam.sum(),
            ]
        ).double()
    model.train(was_training)
    return ctx.sum_(counts)


def _rate(errors: float, count: float) -> float | None:
    return errors / count if count > 0 else None


# ---------------------------------------------------------------------------------------
# The loop


def _require_data(data: str) -> None:
    """On resume the stored cache path must still lead to the cache."""
    if not Path(data).exists():
        raise EmcapsError(
            f"{data}: the cache this run was trained on is not there; pass --data PATH to "
            "resume with the cache at its new place"
        )


def _default_out() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def train(
    config: TrainConfig, resume: bool = False, reporter: Reporter | None = None
) -> TrainResult:
    """Train the network `config` describes; write the run directory; return a summary.

    With `resume`, continue `config.out`/last.pt exactly (its train_config must match `config`
    apart from RESUMABLE options; `resume_config` builds such a config). Raises EmcapsError on
    bad input or a non-finite loss (the weights are not updated and last.pt keeps the last good
    epoch) and TrainingInterrupted after saving last.pt on Ctrl-C / SIGTERM.
    """
    ctx, device = _setup_distributed(config.device)
    try:
        if config.amp and device.type != "cuda":
            raise EmcapsError(
                "--amp: bf16 autocast is for CUDA only; drop --amp when training on CPU"
            )
        if resume and not config.out:
            raise EmcapsError("--resume needs --out RUN_DIR (the run to continue)")
        run_dir = Path(ctx.broadcast(config.out or _default_out()))
        # The cache path is stored absolute, so a run resumes from any working directory.
        config = dataclasses.replace(
            config, out=str(run_dir), data=str(Path(config.data).absolute())
        )
        # Only rank 0 writes the run directory, so only rank 0 holds its lock.
        with locked_run_dir(run_dir) if ctx.main else contextlib.nullcontext():
            return _train(config, resume, reporter or Reporter(), ctx, device)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig, resume: bool, reporter: Reporter, ctx: _Dist, device: torch.device
) -> TrainResult:
    if not ctx.main:
        reporter = Reporter()

    # --- run directory, config, checkpoint to resume ---------------------------------------
    run_dir = Path(config.out)
    state: dict[str, Any] | None = None
    if resume:
        state = _load_last(run_dir)
        stored = TrainConfig.from_dict(state["train_config"])
        # None (loss, margin_epochs) means "as the run was started".
        _refuse_conflicts(run_dir, resume_conflicts(stored, _flat(config)))
        config = dataclasses.replace(stored, **{k: getattr(config, k) for k in RESUMABLE})
        _require_data(config.data)
        if state["epoch"] >= config.epochs:
            raise EmcapsError(
                f"{run_dir / LAST}: already trained {state['epoch']} epochs; "
                "pass a larger --epochs to continue"
            )
    else:
        if ctx.main:
            check_new_run(run_dir)
        config = config.resolved()
    model_config = config.model

    # --- data: the whole cache on the device as uint8 ------------------------------------------
    cache = load_cache(config.data)
    require_image_size(config.data, cache.image_size, model_config.input_size)
    rows = config_split(config, cache)

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    train_images = on_device(cache.train.images[rows.train])
    train_labels = on_device(cache.train.labels[rows.train])
    val_images = on_device(cache.train.images[rows.validation])
    val_labels = on_device(cache.train.labels[rows.validation])
    val_all = torch.ones(len(rows.validation), dtype=torch.bool, device=device)
    test_images = on_device(cache.test.images[rows.test])
    test_labels = on_device(cache.test.labels[rows.test])
    test_familiar = on_device(rows.test_familiar)
    del cache

    # --- model, optimiser, RNGs ---------------------------------------------------------------
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    augment = torch.Generator(device=device)
    _seed_rngs(config.seed, ctx.rank, augment)

    history: list[dict[str, Any]] = []
    epoch, step_in_epoch, global_step = 0, 0, 0
    partial = {"loss_sum": 0.0, "errors": 0.0, "count": 0.0, "seconds": 0.0}
    best = {"epoch": None, "validation_error": None}
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step = state["global_step"]
        history = list(state["history"])
        best = dict(state["best"])
        if ctx.main:
            partial = dict(state["partial_epoch"])
        saved = state["rng"]
        if len(saved) == ctx.world and saved[ctx.rank]["device_type"] == device.type:
            _set_rng_state(saved[ctx.rank], augment, device)
        elif step_in_epoch:
            raise EmcapsError(
                f"{run_dir / LAST}: written mid-epoch by {len(saved)} process(es) on "
                f"{saved[0]['device_type']}; resume with the same number of processes and device"
            )
        else:
            _seed_rngs(config.seed, ctx.rank, augment, salt=global_step + 1)
            reporter.note(
                "resuming with a different number of processes or device: "
                "random streams are reseeded, so the run is not bit-identical"
            )

    train_model: torch.nn.Module = model
    if ctx.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: torch.nn.Module = model
    if config.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)
    loss_fn = get_loss(config.loss)

    # --- steps per epoch: every rank takes the same number of equal-size batches ---------------
    per_rank = len(train_labels) // ctx.world
    if per_rank < 1:
        raise EmcapsError(
            f"{len(train_labels)} training images cannot be shared by {ctx.world} processes"
        )
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    margin_steps = config.margin_epochs * steps_per_epoch
    warmup_steps = config.augment_warmup * steps_per_epoch
    eval_batch_size = 2 * config.batch_size
    amp = config.amp
    health_batch = None  # a fixed batch of training images for the capsule diagnostics
    if config.diagnostics and model_config.model == "capsnet":
        first = slice(0, min(HEALTH_IMAGES, len(train_labels)))
        health_batch = (eval_batch(train_images[first], model_config.channels), train_labels[first])

    sizes = {
        "train": len(rows.train),
        "validation": len(rows.validation),
        "test": len(rows.test),
        "test_familiar": int(rows.test_familiar.sum()),
    }
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            run_dir / CONFIG_JSON,
            {
                "train_config": config.to_dict(),
                "model_config": model_config.to_dict(),
                "parameters": count_parameters(model),
                "images": sizes,
                "world_size": ctx.world,
                "device": str(device),
                "steps_per_epoch": steps_per_epoch,
                "torch": torch.__version__,
                "written": datetime.now().isoformat(timespec="seconds"),
            },
        )
        if resume:
            _write_metrics(run_dir / METRICS_JSONL, history)
    reporter.start(
        {
            "run_dir": str(run_dir),
            "device": str(device),
            "world_size": ctx.world,
            "parameters": count_parameters(model),
            "images": sizes,
            "resumed_at": (epoch, step_in_epoch) if resume else None,
            "config": config.to_dict(),
        }
    )

    def payload() -> dict[str, Any]:
        """The checkpoint; every rank must call it (it gathers RNG states)."""
        rng = ctx.gather(_rng_state(augment, device))
        return {
            "model_config": model_config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "train_config": config.to_dict(),
            "split": config.split,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "optimizer_state": _to_cpu(optimizer.state_dict()),
            "rng": rng,
            "partial_epoch": dict(partial),
            "history": history,
            "best": dict(best),
            "metrics": history[-1] if history else None,
            "world_size": ctx.world,
        }

    stopped = "completed"
    with _StopRequest() as stop:
        while epoch < config.epochs:
            lr = config.lr * config.lr_decay**epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            usable = per_rank * ctx.world
            order = epoch_permutation(len(train_labels), config.seed, epoch)[:usable]
            shard = order[ctx.rank :: ctx.world].to(device)
            reporter.epoch_start(epoch + 1, config.epochs, steps_per_epoch, step_in_epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            errors = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            t0 = time.perf_counter()
            train_model.train()
            margin = spread_margin(global_step / margin_steps)
            while step_in_epoch < steps_per_epoch:
                if ctx.any(stop.signum is not None, device):
                    partial = _merge_partial(partial, loss_sum, errors, count, t0, ctx, device)
                    if ctx.main:
                        save_checkpoint(run_dir / LAST, payload())
                    else:
                        payload()
                    raise TrainingInterrupted(run_dir / LAST, stop.signum or signal.SIGTERM)
                if device.type == "cpu":
                    keep_fair()  # threads sized to the CPUs other processes leave free
                idx = shard[
                    step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size
                ]
                margin = spread_margin(global_step / margin_steps)
                if config.augment:
                    strength = augment_strength(global_step, warmup_steps)
                    images = train_batch(
                        train_images[idx], model_config.channels, augment, strength=strength
                    )
                else:
                    images = eval_batch(train_images[idx], model_config.channels)
                target = train_labels[idx]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    scores = train_model(images)  # (n, 5)
                loss = loss_fn(scores.float(), target, margin)
                loss_value = loss.item()
                if ctx.any(not math.isfinite(loss_value), device):
                    raise EmcapsError(
                        _nonfinite_message(loss_value, epoch, step_in_epoch, lr, run_dir)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Gradients are identical on every rank after DDP's all-reduce.
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                    raise EmcapsError(
                        _nonfinite_message(math.nan, epoch, step_in_epoch, lr, run_dir, "gradient")
                    )
                optimizer.step()
                step_in_epoch += 1
                global_step += 1
                n = len(idx)
                loss_sum += loss.detach().double() * n
                errors += (scores.detach().argmax(dim=1) != target).sum()
                count += n
                elapsed = time.perf_counter() - t0
                reporter.step(step_in_epoch, loss_value, count * ctx.world / max(elapsed, 1e-9))

            # --- end of epoch: reduce, evaluate, write -----------------------------------------
            partial = _merge_partial(partial, loss_sum, errors, count, t0, ctx, device)
            train_seconds = partial["seconds"]
            reporter.evaluating()
            t_eval = time.perf_counter()
            val = _count_errors(
                eval_model,
                val_images,
                val_labels,
                val_all,
                model_config.channels,
                eval_batch_size,
                ctx,
                amp,
            ).tolist()
            test = _count_errors(
                eval_model,
                test_images,
                test_labels,
                test_familiar,
                model_config.channels,
                eval_batch_size,
                ctx,
                amp,
            ).tolist()
            epoch += 1
            metrics: dict[str, Any] = {
                "epoch": epoch,
                "step": global_step,
                "train_loss": partial["loss_sum"] / max(partial["count"], 1),
                "train_error": partial["errors"] / max(partial["count"], 1),
                "margin": margin,
                "lr": lr,
                "validation_error": _rate(val[0], val[1]),
                "test_error": _rate(test[0], test[1]),
            }
            if config.split != "full":
                metrics["test_familiar_error"] = _rate(test[2], test[3])
                metrics["test_novel_error"] = _rate(test[0] - test[2], test[1] - test[3])
            familiar_error = metrics.get("test_familiar_error", metrics["test_error"])
            metrics["images_per_second"] = partial["count"] / max(train_seconds, 1e-9)
            metrics["train_seconds"] = train_seconds
            if health_batch is not None and ctx.main:
                metrics["diagnostics"] = capsule_health(model, *health_batch, loss_fn, margin)
            metrics["seconds"] = train_seconds + time.perf_counter() - t_eval
            history.append(metrics)
            step_in_epoch = 0
            partial = {"loss_sum": 0.0, "errors": 0.0, "count": 0.0, "seconds": 0.0}
            # Without a validation set best.pt follows last.pt.
            val_error = metrics["validation_error"]
            improved = (
                val_error is None or best["epoch"] is None or val_error < best["validation_error"]
            )
            if improved:
                best = {"epoch": epoch, "validation_error": metrics["validation_error"]}
            checkpoint = payload()
            if ctx.main:
                _write_metrics(run_dir / METRICS_JSONL, history)
                save_checkpoint(run_dir / LAST, checkpoint)
                if improved:
                    save_checkpoint(run_dir / BEST, checkpoint)
                _plot(run_dir / CURVES_PNG, history, reporter, "curves")
                if health_batch is not None:
                    _plot(run_dir / DIAGNOSTICS_PNG, history, reporter, "diagnostics")
            reporter.epoch_end(metrics)
            if config.stop_at_error is not None and familiar_error is not None:
                if familiar_error <= config.stop_at_error:
                    stopped = "stop-at-error"
                    break

    if ctx.world > 1:
        dist.barrier()
    return TrainResult(
        run_dir=run_dir,
        epochs_completed=epoch,
        global_step=global_step,
        stopped=stopped,
        best_epoch=best["epoch"],
        best_validation_error=best["validation_error"],
        last_metrics=history[-1] if history else {},
    )


def augment_strength(step: int, warmup_steps: float) -> float:
    """Augmentation strength at optimiser step `step`: linear from 0 to 1 over the warm-up."""
    return 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)


def _merge_partial(
    partial: dict[str, float],
    loss_sum: torch.Tensor,
    errors: torch.Tensor,
    count: int,
    t0: float,
    ctx: _Dist,
    device: torch.device,
) -> dict[str, float]:
    """Add this stretch of the epoch (all-reduced over ranks) to the sums carried so far."""
    sums = ctx.sum_(
        torch.stack([loss_sum, errors, torch.tensor(float(count), device=device).double()])
    ).tolist()
    return {
        "loss_sum": partial["loss_sum"] + sums[0],
        "errors": partial["errors"] + sums[1],
        "count": partial["count"] + sums[2],
        "seconds": partial["seconds"] + time.perf_counter() - t0,
    }


def _nonfinite_message(
    value: float, epoch: int, step: int, lr: float, run_dir: Path, what: str = "loss"
) -> str:
    kept = (
        f"{run_dir / LAST} keeps the last good epoch"
        if (run_dir / LAST).exists()
        else "no checkpoint was written"
    )
    return (
        f"non-finite training {what} ({value}) at epoch {epoch + 1}, step {step + 1} "
        f"(lr {lr:g}); stopped without updating the weights; {kept}. Try a smaller --lr"
    )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _plot(path: Path, history: list[dict[str, Any]], reporter: Reporter, kind: str) -> None:
    """Draw `kind` ("curves" or "diagnostics") of the metrics history; failures become notes."""
    from emcaps_cli import plots

    draw = {"curves": plots.plot_learning_curves, "diagnostics": plots.plot_diagnostics}[kind]
    try:
        draw(history, path)
    except (OSError, ValueError) as exc:  # a plot must never end a training run
        reporter.note(f"{path}: could not draw {kind} ({exc})")

"""The attack protocol of section 6: what to run, the models under attack, and the runs over ε
and target classes whose results docs/attacks.md describes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emcaps_cli.attacks.methods import (
    LossFn,
    bim,
    bim_step_size,
    fgsm,
    image_loss,
    input_gradient,
)
from emcaps_cli.checkpoint import load_model
from emcaps_cli.config import default_loss
from emcaps_cli.data.cache import Split
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.defaults import DEFAULT_EPS, DEFAULT_STEPS, METHODS
from emcaps_cli.errors import EmcapsError
from emcaps_cli.evaluation import DEFAULT_BATCH_SIZE, Progress, batch_slices, class_scores
from emcaps_cli.losses import get_loss
from emcaps_cli.utils.threads import keep_fair


@dataclass(frozen=True)
class AttackSettings:
    """What to run. `step_size` None means the rule of `methods.bim_step_size` (BIM only)."""

    method: str = "fgsm"
    targeted: bool = False
    eps: tuple[float, ...] = DEFAULT_EPS
    steps: int = DEFAULT_STEPS
    step_size: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EmcapsError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if not self.eps or any(not np.isfinite(e) or e < 0 for e in self.eps):
            raise EmcapsError(f"--eps {list(self.eps)}: expected non-negative numbers")
        if self.steps < 1:
            raise EmcapsError(f"--steps {self.steps}: expected at least one step")
        if self.step_size is not None and not self.step_size > 0:
            raise EmcapsError(f"--step-size {self.step_size}: expected a positive number")
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))

    def bim_step_size(self, eps: float) -> float:
        return bim_step_size(eps, self.steps, self.step_size)


def parse_eps(text: str) -> tuple[float, ...]:
    """`--eps 0,0.05,0.1` -> (0.0, 0.05, 0.1)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EmcapsError(f"--eps {text!r}: expected comma-separated numbers") from None
    if not values:
        raise EmcapsError(f"--eps {text!r}: expected at least one number")
    return values


def default_loss_name(ckpt: dict[str, Any]) -> str:
    """The training loss of a checkpoint; if unset, the model's `default_loss`."""
    loss = (ckpt.get("train_config") or {}).get("loss")
    if loss:
        return str(loss)
    return default_loss(ckpt["model_config"].get("model", "capsnet"))


@dataclass
class GradientStats:
    """Section 6 diagnostics of ∇ₓL on clean images: exact zeros and mean magnitude."""

    entries: int = 0
    zeros: int = 0
    nonfinite: int = 0
    abs_sum: float = 0.0

    def add(self, grad: torch.Tensor) -> None:
        finite = torch.isfinite(grad)
        self.entries += grad.numel()
        self.zeros += int((grad == 0).sum())
        self.nonfinite += int((~finite).sum())
        self.abs_sum += float(grad[finite].abs().double().sum())

    def to_dict(self) -> dict[str, Any]:
        finite = self.entries - self.nonfinite
        return {
            "zero_fraction": self.zeros / self.entries if self.entries else None,
            "mean_abs": self.abs_sum / finite if finite else None,
            "nonfinite_fraction": self.nonfinite / self.entries if self.entries else None,
            "entries": self.entries,
        }


@dataclass
class AttackModel:
    """A loaded network with the loss its gradients are taken of."""

    name: str
    model: nn.Module
    loss_name: str
    kind: str = ""
    loss: LossFn = field(init=False)

    def __post_init__(self) -> None:
        self.loss = image_loss(self.loss_name)
        self.model.eval()
        self.model.requires_grad_(False)
        self.kind = self.kind or getattr(self.model.config, "model", type(self.model).__name__)

    @property
    def channels(self) -> int:
        return int(self.model.config.channels)

    @property
    def standardize(self) -> str:
        return str(self.model.config.standardize)


def load_attack_model(
    path: str | os.PathLike, device: Any = "cpu", loss_name: str | None = None
) -> AttackModel:
    model, ckpt = load_model(path, device)
    return AttackModel(str(path), model, loss_name or default_loss_name(ckpt))


def work_units(n_images: int, settings: AttackSettings, runs: int = 1) -> int:
    """Progress units of `run_attack`: one per image per (target, ε) pair, per run."""
    targets = 5 if settings.targeted else 1
    return n_images * targets * len(settings.eps) * runs


def _make_examples(
    attacker: AttackModel,
    settings: AttackSettings,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    if settings.method == "fgsm":
        return fgsm(attacker.model, x, target, eps, attacker.loss, settings.targeted, grad)
    return bim(
        attacker.model,
        x,
        target,
        eps,
        attacker.loss,
        settings.steps,
        settings.bim_step_size(eps),
        settings.targeted,
    )


def _check_same_input(attacker: AttackModel, victims: Sequence[AttackModel]) -> None:
    for victim in victims:
        if victim.channels != attacker.channels:
            raise EmcapsError(
                f"{victim.name}: takes {victim.channels} input channel(s) but the source "
                f"{attacker.name} takes {attacker.channels}; transfer needs the same input"
            )
        if victim.standardize != attacker.standardize:
            raise EmcapsError(
                f"{victim.name}: standardises its input per {victim.standardize} but the source "
                f"{attacker.name} per {attacker.standardize}; transfer needs the same input"
            )


class _Tally:
    """Counts over the batches of one `run_attack`, for V victims, E ε values, T targets
    (T = 1, no target, when untargeted)."""

    def __init__(self, models: Sequence[AttackModel], victims: int, n_eps: int, targets: int):
        # hits[v, e, t]: images victim v classifies as the attack's goal (true class untargeted)
        self.hits = np.zeros((victims, n_eps, targets), dtype=np.int64)
        self.hits_other = np.zeros_like(self.hits)  # ... counting only true class != t
        self.others = np.zeros(targets, dtype=np.int64)  # images whose true class is not t
        self.gradients = {id(m): GradientStats() for m in models}


def _attack_batch(
    attacker: AttackModel,
    victims: Sequence[AttackModel],
    settings: AttackSettings,
    targets: list[int | None],
    x: torch.Tensor,
    y: torch.Tensor,
    tally: _Tally,
    progress: Progress | None,
) -> None:
    """Attack one batch of standardised crops x (B, C, 32, 32), labels y (B,), for every
    target and ε, and add what each victim predicts to `tally`."""
    clean_grad = {}
    for m in [attacker, *victims]:
        if id(m) not in clean_grad:
            clean_grad[id(m)] = input_gradient(m.model, x, y, m.loss)
            tally.gradients[id(m)].add(clean_grad[id(m)])
    clean_pred = {}
    for ti, t in enumerate(targets):
        goal = y if t is None else torch.full_like(y, t)
        tally.others[ti] += int((y != goal).sum())
        # FGSM's gradient does not depend on ε: one backward pass per target and batch.
        grad = clean_grad[id(attacker)] if t is None else None
        if settings.method == "fgsm" and grad is None and any(settings.eps):
            grad = input_gradient(attacker.model, x, goal, attacker.loss)
        for ei, eps in enumerate(settings.eps):
            x_adv = _make_examples(attacker, settings, x, goal, eps, grad) if eps else x
            for vi, victim in enumerate(victims):
                if eps == 0 and vi in clean_pred:
                    pred = clean_pred[vi]
                else:
                    pred = class_scores(victim.model, x_adv).argmax(dim=1)
                    if eps == 0:
                        clean_pred[vi] = pred
                hit = pred == goal
                tally.hits[vi, ei, ti] += int(hit.sum())
                tally.hits_other[vi, ei, ti] += int((hit & (y != goal)).sum())
            if progress is not None:
                progress(len(y))


def _victim_result(
    vi: int,
    victim: AttackModel,
    attacker: AttackModel,
    settings: AttackSettings,
    tally: _Tally,
    n: int,
) -> dict[str, Any]:
    """The result of victim `vi` (fields in docs/attacks.md)."""
    result: dict[str, Any] = {
        "checkpoint": victim.name,
        "model": victim.kind,
        "score_kind": getattr(victim.model, "score_kind", None),
        "method": settings.method,
        "targeted": settings.targeted,
        "eps": list(settings.eps),
        "n": n,
        "loss": attacker.loss_name,
        "source": None,
    }
    if settings.method == "bim":
        result["steps"] = settings.steps
        result["step_size"] = [settings.bim_step_size(e) for e in settings.eps]
    if settings.targeted:
        by_target = tally.hits[vi] / n  # (E, T)
        by_target_other = tally.hits_other[vi] / np.maximum(tally.others, 1)  # (E, T)
        result["success_rate"] = by_target.mean(axis=1).tolist()
        result["success_rate_excluding_true_class"] = by_target_other.mean(axis=1).tolist()
        result["success_rate_by_target"] = by_target.tolist()
    else:
        result["accuracy"] = (tally.hits[vi, :, 0] / n).tolist()
    result["gradient"] = tally.gradients[id(victim)].to_dict()
    if victim is not attacker:
        result["source"] = {
            "checkpoint": attacker.name,
            "model": attacker.kind,
            "loss": attacker.loss_name,
            "gradient": tally.gradients[id(attacker)].to_dict(),
        }
    return result


def run_attack(
    attacker: AttackModel,
    victims: Sequence[AttackModel],
    data: Split,
    settings: AttackSettings,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Make adversarial examples on `attacker` and classify them with each victim.

    White-box: victims == [attacker]. Black-box transfer: the attacker is the source model.
    Returns one result dict per victim (see docs/attacks.md for the fields).
    """
    _check_same_input(attacker, victims)
    device = next(attacker.model.parameters()).device
    num_classes = int(attacker.model.config.num_classes)
    targets = list(range(num_classes)) if settings.targeted else [None]
    tally = _Tally([attacker, *victims], len(victims), len(settings.eps), len(targets))
    start = time.perf_counter()
    for sl in batch_slices(len(data), batch_size):
        if device.type == "cpu":
            keep_fair()  # threads sized to the CPUs other processes leave free
        images = torch.from_numpy(data.images[sl]).to(device)
        x = eval_batch(
            images,
            attacker.channels,
            size=int(attacker.model.config.input_size),
            order=attacker.standardize,
        )
        y = torch.from_numpy(data.labels[sl]).to(device)
        _attack_batch(attacker, victims, settings, targets, x, y, tally, progress)
    seconds = time.perf_counter() - start
    results = []
    for vi, victim in enumerate(victims):
        result = _victim_result(vi, victim, attacker, settings, tally, len(data))
        result["seconds"] = seconds
        results.append(result)
    return results


def attack_checkpoints(
    paths: Sequence[str | os.PathLike],
    data: Split,
    settings: AttackSettings,
    source: str | os.PathLike | None = None,
    loss_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: Any = "cpu",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Attack each checkpoint with its own gradients, or, with `source`, with the source's.

    `loss_name` overrides the loss whose gradient makes the examples (default: the training loss
    of the model whose gradients are used). One result per path, in order.
    """
    if loss_name is not None:
        get_loss(loss_name)
    # Every file is loaded before any work, so a bad path fails at once, not after an hour.
    if source is None:
        models = [load_attack_model(path, device, loss_name) for path in paths]
        results = []
        for model in models:
            results += run_attack(model, [model], data, settings, batch_size, progress)
        return results
    attacker = load_attack_model(source, device, loss_name)
    victims = [
        attacker
        if Path(path).resolve() == Path(source).resolve()
        else load_attack_model(path, device)
        for path in paths
    ]
    return run_attack(attacker, victims, data, settings, batch_size, progress)

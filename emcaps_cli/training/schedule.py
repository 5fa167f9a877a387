"""What changes with the step and the epoch: learning rate, spread-loss margin, augmentation,
the E-step's likelihood power τ during training.

Adam's learning rate of epoch e (0-based) is lr · lr_decay^e, or with the cosine schedule
lr · ½(1 + cos(π·e/H)) over H anneal epochs (0 from epoch H on); the spread-loss margin grows
linearly from 0.2 to 0.9 over `margin_epochs` (section 4.1); the augmentation's ranges grow
linearly from none to full over `augment_warmup` epochs; with `tau_start` set, the capsule
network trains with the E-step's τ at tau_start for `tau_hold_epochs`, then rising
geometrically to the model's τ over `tau_anneal_epochs` (deterministic annealing, one value
per epoch), and is always evaluated at the model's τ. Every rank takes the same number of
equal-size batches per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from emcaps_cli.config import TrainConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.losses import spread_margin


def parameter_groups(model: torch.nn.Module, front_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, each with the `lr_scale` its learning rate is
    multiplied by: one group, unless the model has `front_parameters` (the capsule network)
    and `front_lr_scale` is not 1, then those parameters form a second group."""
    front = getattr(model, "front_parameters", None)
    if front is None or front_lr_scale == 1:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    front_params = front()
    front_ids = {id(p) for p in front_params}
    rest = [p for p in model.parameters() if id(p) not in front_ids]
    return [
        {"params": rest, "lr_scale": 1.0},
        {"params": front_params, "lr_scale": front_lr_scale},
    ]


def augment_strength(step: int, warmup_steps: float) -> float:
    """Augmentation strength at optimiser step `step`: linear from 0 to 1 over the warm-up."""
    return 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)


@dataclass(frozen=True)
class Schedule:
    """The step counts of a run (of a resolved TrainConfig) and the values that follow them."""

    lr: float  # Adam learning rate of the first epoch
    lr_decay: float  # × per epoch (exponential schedule)
    lr_schedule: str  # "exponential" or "cosine"
    anneal_epochs: float | None  # cosine: epochs until the rate reaches 0
    per_rank: int  # training images each rank sees per epoch (the rest are dropped)
    steps_per_epoch: int
    margin_steps: float  # optimiser steps until the margin reaches 0.9
    warmup_steps: float  # optimiser steps until the augmentation is at full strength
    tau_start: float | None = None  # E-step τ of the first epochs; None: the model's τ
    tau_end: float = 1.0  # the model's τ (ModelConfig.likelihood_power)
    tau_hold_epochs: float = 0.0  # epochs trained at tau_start
    tau_anneal_epochs: float = 0.0  # epochs over which τ then rises to tau_end

    @classmethod
    def of(cls, config: TrainConfig, n_train: int, world: int) -> Schedule:
        """The schedule of `config` with `n_train` training images shared by `world` ranks."""
        per_rank = n_train // world
        if per_rank < 1:
            raise EmcapsError(f"{n_train} training images cannot be shared by {world} processes")
        steps = math.ceil(per_rank / config.batch_size)
        return cls(
            lr=config.lr,
            lr_decay=config.lr_decay,
            lr_schedule=config.lr_schedule,
            anneal_epochs=config.lr_anneal_epochs,
            per_rank=per_rank,
            steps_per_epoch=steps,
            margin_steps=config.margin_epochs * steps,
            warmup_steps=config.augment_warmup * steps,
            tau_start=config.tau_start,
            tau_end=config.model.likelihood_power,
            tau_hold_epochs=config.tau_hold_epochs,
            tau_anneal_epochs=config.tau_anneal_epochs,
        )

    def learning_rate(self, epoch: int) -> float:
        """Adam's learning rate of epoch `epoch` (0-based)."""
        if self.lr_schedule == "cosine":
            done = min(epoch / self.anneal_epochs, 1.0)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * done))
        return self.lr * self.lr_decay**epoch

    def margin(self, step: int) -> float:
        """The spread-loss margin of optimiser step `step` (0-based, counted over the run)."""
        return spread_margin(step / self.margin_steps)

    def augment_strength(self, step: int) -> float:
        return augment_strength(step, self.warmup_steps)

    def likelihood_power(self, epoch: int) -> float:
        """The E-step's τ the network trains with in epoch `epoch` (0-based): tau_start for
        the hold, then geometric steps that reach the model's τ in the last anneal epoch."""
        if self.tau_start is None:
            return self.tau_end
        done = (epoch - self.tau_hold_epochs + 1) / max(self.tau_anneal_epochs, 1e-9)
        if epoch < self.tau_hold_epochs or done <= 0:
            return self.tau_start
        if done >= 1:
            return self.tau_end
        return self.tau_start * (self.tau_end / self.tau_start) ** done

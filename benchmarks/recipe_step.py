"""One optimiser step of `emcaps train`'s default capsule recipe on fixed inputs, for the
speed benchmarks (bench_model.py, profile_step.py).

A step is forward + spread loss, backward, gradient clipping, Adam over the learning-rate groups
of `--front-lr-scale`, and the weight average's update (`--ema-decay`): each phase is its own
method, so a profiler can time them apart, and calling the object runs them all in order.
"""

from __future__ import annotations

import contextlib

import torch

from emcaps_cli.config import TrainConfig
from emcaps_cli.losses import spread_loss
from emcaps_cli.training.averaging import WeightAverage
from emcaps_cli.training.clipping import clip_gradient
from emcaps_cli.training.schedule import parameter_groups

MARGIN = 0.5  # spread-loss margin: mid-schedule; the time does not depend on it
LR = 1e-3


class RecipeStep:
    """The training step of `model` on the batch `x` (N, 2, 32, 32) with labels `y` (N,).

    `network` is what the forward pass calls (the model, or a compiled wrapper of it);
    `grad_clip` None takes the recipe's default norm, 0 leaves clipping out; `autocast` wraps
    the forward pass and the loss (bf16 on CUDA for `--amp`).
    """

    def __init__(self, model, x, y, *, network=None, grad_clip=None, autocast=None) -> None:
        recipe = TrainConfig().resolved()
        self.model, self.x, self.y = model, x, y
        self.network = model if network is None else network
        self.clip_norm = recipe.grad_clip if grad_clip is None else grad_clip
        self.autocast = contextlib.nullcontext() if autocast is None else autocast
        self.optimiser = torch.optim.Adam(parameter_groups(model, recipe.front_lr_scale), lr=LR)
        self.average = WeightAverage.of(model, recipe.ema_decay)
        self.steps = 0
        model.train()

    def forward(self) -> torch.Tensor:
        self.optimiser.zero_grad(set_to_none=True)
        with self.autocast:
            return spread_loss(self.network(self.x), self.y, MARGIN)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self) -> None:
        if self.clip_norm > 0:
            clip_gradient(self.model.parameters(), self.clip_norm)

    def adam(self) -> None:
        self.optimiser.step()
        self.steps += 1

    def update_average(self) -> None:
        if self.average is not None:
            self.average.update(self.model, self.steps)

    def __call__(self) -> None:
        self.backward(self.forward())
        self.clip()
        self.adam()
        self.update_average()

"""An exponential moving average of the network's weights, used to evaluate a run.

After optimiser step t (1-based) every floating-point entry of the state_dict moves as
    w̄ ← d_t·w̄ + (1 − d_t)·w,    d_t = min(decay, (1 + t) / (10 + t)),
so the first steps are not dominated by the initial weights (the same warm-up as TensorFlow's
ExponentialMovingAverage with num_updates). Integer buffers are copied. The average is what
validation, test, best.pt and last.pt's network see; training continues on the raw weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def average_decay(decay: float, step: int) -> float:
    """d_t of optimiser step `step` (1-based): `decay`, lowered over the first steps."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The running average of `model`'s state_dict (tensors on the model's device)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"weight-average decay {decay}: expected 0 < decay < 1")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step` (1-based, counted over the run)."""
        weight = 1.0 - average_decay(self.decay, step)
        for name, value in model.state_dict().items():
            kept = self.state[name]
            if kept.is_floating_point():
                kept.lerp_(value.detach(), weight)
            else:
                kept.copy_(value)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a stored average (a checkpoint's `model_state`)."""
        for name, kept in self.state.items():
            kept.copy_(state[name])

    @classmethod
    def of(cls, model: torch.nn.Module, decay: float) -> WeightAverage | None:
        """The average a run with `--ema-decay decay` keeps: None for 0 (the raw weights)."""
        return cls(model, decay) if decay > 0 else None

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block, its own weights after it."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(raw)

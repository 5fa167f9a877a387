"""Gradient-norm clipping before the optimiser's step (`--grad-clip`, docs/training.md)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_gradient(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> bool:
    """Scale the gradients of `parameters`, taken together as one vector, down to L2 norm
    `max_norm` when they are longer; leave them as they are otherwise. True if they were scaled.
    Parameters without a gradient are skipped."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return bool(norm > max_norm)

"""Gradient-norm clipping before the optimiser's step (`--grad-clip`, docs/training.md)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_gradient(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `parameters`, taken together as one vector, down to L2 norm
    `max_norm` when they are longer; leave them as they are otherwise. Returns whether they
    were scaled as a boolean tensor on their device, so that the caller need not wait for the
    device. Parameters without a gradient are skipped."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm > max_norm

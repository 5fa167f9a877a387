"""Training losses, picked by name: spread (Eq. 3), margin (Sabour et al. 2017), cross-entropy.

All take class scores (N, K) and integer targets (N,) and return the batch mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from emcaps_cli.defaults import LOSSES
from emcaps_cli.errors import EmcapsError


def spread_loss(scores: torch.Tensor, target: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
    """Eq. 3: L = Σ_{i≠t} max(0, m − (a_t − a_i))², averaged over the batch."""
    a_t = scores.gather(1, target[:, None])  # (N, 1)
    gap = (margin - (a_t - scores)).clamp(min=0) ** 2  # (N, K)
    gap = gap.masked_fill(F.one_hot(target, scores.shape[1]).bool(), 0.0)
    return gap.sum(dim=1).mean()


def margin_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0.9,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    down_weight: float = 0.5,
) -> torch.Tensor:
    """Sabour et al. (2017): T_k max(0, m⁺ − a_k)² + λ (1 − T_k) max(0, a_k − m⁻)².

    `margin` is accepted (and ignored) so every loss has one signature.
    """
    del margin
    onehot = F.one_hot(target, scores.shape[1]).to(scores.dtype)
    present = onehot * (m_plus - scores).clamp(min=0) ** 2
    absent = down_weight * (1 - onehot) * (scores - m_minus).clamp(min=0) ** 2
    return (present + absent).sum(dim=1).mean()


def cross_entropy_loss(
    scores: torch.Tensor, target: torch.Tensor, margin: float = 0.9
) -> torch.Tensor:
    """Softmax cross-entropy with the scores as logits (class activations for capsules)."""
    del margin
    return F.cross_entropy(scores, target)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    table = {"spread": spread_loss, "margin": margin_loss, "cross-entropy": cross_entropy_loss}
    if name not in table:
        raise EmcapsError(f"--loss {name}: expected one of {', '.join(LOSSES)}")
    return table[name]


def spread_margin(progress: float, start: float = 0.2, end: float = 0.9) -> float:
    """The spread-loss margin schedule: linear from 0.2 to 0.9 as `progress` goes 0 → 1."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress

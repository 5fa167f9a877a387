"""The attack methods of section 6: FGSM and BIM on standardised images, and the loss they
climb (summed over a batch's images; the spread loss at its final margin)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from emcaps_cli.defaults import DEFAULT_STEPS, STEP_SIZE_FACTOR
from emcaps_cli.losses import get_loss

ATTACK_MARGIN = 0.9  # the spread-loss margin at the end of training

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def image_loss(name: str) -> LossFn:
    """loss(scores (N, K), target (N,)) summed over images; spread at margin ATTACK_MARGIN."""
    fn = get_loss(name)

    def loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn(scores, target, ATTACK_MARGIN) * scores.shape[0]

    return loss


def input_gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: LossFn
) -> torch.Tensor:
    """∇ₓ loss(model(x), target), shape of x; parameter gradients are neither needed nor kept."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(model(x), target), x)
    return grad


def _signed_step(grad: torch.Tensor, size: float, targeted: bool) -> torch.Tensor:
    # A non-finite gradient entry gives no direction (sign(NaN) would poison the image).
    step = size * torch.nan_to_num(grad.sign(), nan=0.0)
    return -step if targeted else step


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    loss: LossFn,
    targeted: bool = False,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """FGSM: x + ε sign(∇ₓL(x, y)); targeted: x − ε sign(∇ₓL(x, t)), towards the target t.

    x: standardised crops (N, C, 32, 32); target: true labels (untargeted) or target labels (N,).
    `grad` may pass ∇ₓL(x, target) when the caller already has it (it does not depend on ε).
    """
    if eps == 0:
        return x
    if grad is None:
        grad = input_gradient(model, x, target, loss)
    return x.detach() + _signed_step(grad, eps, targeted)


def bim_step_size(eps: float, steps: int, step_size: float | None = None) -> float:
    """BIM's step size α: `step_size` when given, else STEP_SIZE_FACTOR ε / steps."""
    return STEP_SIZE_FACTOR * eps / steps if step_size is None else step_size


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The nearest point of the L∞ ball of radius ε around x."""
    return x + (x_adv - x).clamp(-eps, eps)


def bim(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    loss: LossFn,
    steps: int = DEFAULT_STEPS,
    step_size: float | None = None,
    targeted: bool = False,
) -> torch.Tensor:
    """BIM (Kurakin et al. 2016): `steps` sign steps of size α, each projected onto the L∞
    ε-ball around x. α defaults to `bim_step_size`. Shapes as in `fgsm`."""
    if eps == 0:
        return x
    alpha = bim_step_size(eps, steps, step_size)
    x = x.detach()
    x_adv = x
    for _ in range(steps):
        grad = input_gradient(model, x_adv, target, loss)
        x_adv = project(x_adv + _signed_step(grad, alpha, targeted), x, eps)
    return x_adv

"""Capsule-health diagnostics: is the network routing, and do its activations carry anything?

Computed on one fixed batch (a few images), per capsule layer:

    activation_mean, activation_std   over every capsule of the batch (a dead layer: std ≈ 0)
    max_assignment      mean over children of their largest R_ij (1/#parents: uniform; 1: hard)
    max_assignment_uniform  the same under uniform assignments (each child's 1/#parents), the
                        reference max_assignment is read against
    assignment_entropy  mean over children of H(R_i·) / log(#parents of i) (1: uniform; 0: hard)
    log_sigma           mean log σ_jh of the last M-step
    logit_std           spread of the activation logits λ(β_a − Σ_h cost_h) over capsules
    grad_norm           norm of the loss gradient of the layer's parameters

R is the assignment the last M-step used (Procedure 1: the one the output is computed from).
The routing is recomputed with plain tensors from each layer's own routing problem (votes
materialised), so nothing here touches the fast path or the training state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from emcaps_cli.capsules.em import ChildMap, RoutingStep, em_routing, initial_assignments
from emcaps_cli.capsules.layers import RoutingInputs

ROUTING_LAYERS = ("conv_caps1", "conv_caps2", "class_caps")
LAYERS = ("conv1", "primary_caps", *ROUTING_LAYERS)
TRACE_IMAGES = 4  # images routed at a time when materialising votes (memory)


def assignment_stats(assignments: torch.Tensor, child_map: ChildMap | None) -> tuple[float, float]:
    """(mean largest R per child, mean normalised entropy per child) of R (N, L, J, S)."""
    n, l, j, s = assignments.shape
    r = assignments.clamp_min(0.0)
    plogp = torch.where(r > 0, r * r.log(), torch.zeros_like(r)).sum(2)  # (N, L, S)
    slot_max = r.amax(2)  # (N, L, S)
    if child_map is None:  # every slot is its own child with J parents
        largest, entropy = slot_max, -plogp
        parents = torch.full_like(slot_max, float(j))
    else:
        index = child_map.index.expand(n, -1)  # (N, L*S)
        c = child_map.num_children
        largest = slot_max.new_zeros(n, c).scatter_reduce(
            1, index, slot_max.reshape(n, l * s), "amax", include_self=False
        )
        entropy = -plogp.new_zeros(n, c).index_add(1, child_map.index, plogp.reshape(n, l * s))
        count = child_map.parent_count.to(r.dtype)  # (L*S,): parent positions of each slot
        per_child = count.new_zeros(c).scatter_reduce(0, child_map.index, count, "amax")
        parents = (j * per_child).expand(n, -1)
    norm = torch.where(parents > 1, parents.log(), torch.ones_like(parents))
    entropy = torch.where(parents > 1, entropy / norm, torch.zeros_like(entropy))
    return float(largest.mean()), float(entropy.mean())


def routing_health(inputs: RoutingInputs) -> dict[str, float]:
    """Assignment, σ and logit statistics of one layer's routing problem."""
    spec = inputs.spec
    largest, entropy, log_sigma, logits, count = 0.0, 0.0, 0.0, [], 0
    n = inputs.child_poses.shape[0]
    for start in range(0, n, TRACE_IMAGES):
        part = slice(start, min(start + TRACE_IMAGES, n))
        piece = inputs._replace(
            child_poses=inputs.child_poses[part], activations_in=inputs.activations_in[part]
        )
        trace: list[RoutingStep] = []
        em_routing(
            piece.votes(),
            piece.activations_in,
            piece.beta_u,
            piece.beta_a,
            trace=trace,
            **spec.loop_options(),
        )
        last = trace[-1]
        weight = part.stop - part.start
        big, ent = assignment_stats(last.assignments, spec.child_map)
        largest += big * weight
        entropy += ent * weight
        log_sigma += float(0.5 * last.variance.log().mean()) * weight
        logits.append(last.logit.flatten())
        count += weight
    uniform = initial_assignments(tuple(last.assignments.shape), spec.child_map, last.variance)
    return {
        "max_assignment": largest / count,
        "max_assignment_uniform": assignment_stats(uniform, spec.child_map)[0],
        "assignment_entropy": entropy / count,
        "log_sigma": log_sigma / count,
        "logit_std": float(torch.cat(logits).std()) if sum(map(len, logits)) > 1 else 0.0,
    }


def _activation_stats(activations: torch.Tensor) -> dict[str, float]:
    a = activations.detach().flatten()
    return {
        "activation_mean": float(a.mean()),
        "activation_std": float(a.std()) if a.numel() > 1 else 0.0,
    }


def _grad_norms(model: nn.Module, loss: torch.Tensor) -> dict[str, float]:
    modules = {name: getattr(model, name) for name in LAYERS}
    params = [(name, p) for name, m in modules.items() for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    squares = dict.fromkeys(modules, 0.0)
    for (name, _), g in zip(params, grads, strict=True):
        if g is not None:
            squares[name] += float(g.double().square().sum())
    return {name: math.sqrt(total) for name, total in squares.items()}


def capsule_health(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    margin: float,
) -> dict[str, dict[str, float]]:
    """Diagnostics of a CapsNet on one batch: {layer: {statistic: value}} (see module doc).

    images (N, channels, 32, 32) prepared as for evaluation, labels (N,). The parameters' .grad
    are left as they were.
    """
    layers = model.forward_layers(images)  # name -> (poses, activations) of each layer's output
    loss = loss_fn(layers["class_caps"][1], labels, margin)
    grads = _grad_norms(model, loss)
    out: dict[str, dict[str, float]] = {"conv1": {"grad_norm": grads["conv1"]}}
    below = "primary_caps"
    out[below] = {**_activation_stats(layers[below][1]), "grad_norm": grads[below]}
    with torch.no_grad():
        for name in ROUTING_LAYERS:
            poses, acts = (t.detach() for t in layers[below])
            layer = getattr(model, name)
            out[name] = {
                **_activation_stats(layers[name][1]),
                **routing_health(layer.routing_inputs(poses, acts)),
                "grad_norm": grads[name],
            }
            below = name
    return out

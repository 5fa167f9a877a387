"""EM routing (Procedure 1 of Hinton, Sabour & Frosst, 2018), vectorised and log-domain.

One routing problem per (image, parent position). Tensor layout:

    votes        (N, L, J, S, H)  vote of child slot s for parent type j at parent position l
    activations  (N, L, S)        activation a_i of the child in slot s
    beta_u/a     (J,)             learned, one per parent capsule type (shared over positions)
    returns      poses (N, L, J, H) = μ_j, activations (N, L, J) = a_j

N images, L parent positions, J parent types, S child slots per parent position (K·K·B for a
convolutional layer, every child for the class layer), H pose entries (16).

A child may fill slots at several parent positions (overlapping receptive fields). With a
`ChildMap`, the E-step normalises each child's assignments over *every* parent that holds it —
all positions and types — as section 4 of the paper says ("exact" routing). Without one, each
slot is its own child and is normalised over the J types at its position only ("patch" routing,
and the fully connected class layer).

Numerics (see docs/model.md):
- the votes are centred once on their unweighted mean per parent; every quantity below is
  shift-invariant, so the result is exact, and the expanded quadratic forms lose less precision;
- σ² has a floor VAR_FLOOR added, so log σ and 1/σ² stay finite for identical votes;
- Σ_i R_ij is floored at SUM_FLOOR in divisions, so a parent with no active children has μ = the
  mean vote and finite cost;
- the E-step works with log(a_j p_j) and a per-child max shift, so nothing overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

VAR_FLOOR = 1e-4  # added to every σ², in squared pose units
SUM_FLOOR = 1e-8  # smallest Σ_i R_ij used as a divisor


@dataclass(frozen=True)
class ChildMap:
    """Which child each (parent position, slot) pair holds, for exact convolutional routing.

    index        (L * S,) long: child id of slot s at parent position l, flattened as l * S + s
    num_children number of distinct children
    parent_count (L * S,) float: how many parent positions hold that slot's child
    """

    index: torch.Tensor
    num_children: int
    parent_count: torch.Tensor

    def to(self, device: torch.device) -> ChildMap:
        return ChildMap(self.index.to(device), self.num_children, self.parent_count.to(device))


class RoutingStep(NamedTuple):
    """What one M-step saw and made: the assignments R it used (N, L, J, S), σ² (N, L, J, H)
    and the activation logit (N, L, J)."""

    assignments: torch.Tensor
    variance: torch.Tensor
    logit: torch.Tensor


def inverse_temperatures(iters: int, final_lambda: float) -> list[float]:
    """λ_t = λ_max (1 − 0.95^(t+1)), t = 0..iters−1: the schedule of the authors' released code."""
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iters)]


def initial_assignments(
    shape: tuple[int, int, int, int], child_map: ChildMap | None, like: torch.Tensor
) -> torch.Tensor:
    """R uniform over each child's actual parents: (N, L, J, S)."""
    n, l, j, s = shape
    if child_map is None:
        return torch.full((1, 1, 1, 1), 1.0 / j, dtype=like.dtype, device=like.device).expand(
            n, l, j, s
        )
    count = child_map.parent_count.to(like.dtype).view(1, l, 1, s)
    return (1.0 / (j * count)).expand(n, l, j, s)


def row_dots(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(..., S, H) x (..., H) -> (..., S): each row of a matrix dotted with its vector.

    Computed as vector @ matrixᵀ, which BLAS runs 3-4x faster here than matrix @ vector on these
    thin (S x 16) matrices (measured on 2 cores: 6.5 vs 20-25 ms at the paper's conv-caps shape).
    """
    return (vectors.unsqueeze(-2) @ matrices.transpose(-1, -2)).squeeze(-2)


class VoteOps:
    """The only operations of EM routing that read vote-sized tensors.

    Holds the centred votes v (N, L, J, S, H) and their squares; everything else in the routing
    works on tensors 16x (or more) smaller. Each operation is a batched matrix-vector product.
    """

    def __init__(self, centred_votes: torch.Tensor, centred_votes_sq: torch.Tensor) -> None:
        self.v = centred_votes
        self.v2 = centred_votes_sq

    def moments(self, weighted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_s w_s v_s and Σ_s w_s v_s²: weighted (N, L, J, S) -> 2 x (N, L, J, H)."""
        w = weighted.unsqueeze(-2)  # (N, L, J, 1, S)
        return (w @ self.v).squeeze(-2), (w @ self.v2).squeeze(-2)

    def row_forms(self, lin: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """Σ_h v lin + v² sq for every slot: (N, L, J, H) x 2 -> (N, L, J, S)."""
        return row_dots(self.v, lin) + row_dots(self.v2, sq)

    def quadratic(self, inv_var: torch.Tensor, mean_inv_var: torch.Tensor) -> torch.Tensor:
        """Σ_h v² /σ² − 2 Σ_h v μ/σ²: (N, L, J, H) x 2 -> (N, L, J, S)."""
        return self.row_forms(-2.0 * mean_inv_var, inv_var)


def m_step(
    assignments: torch.Tensor,
    activations_in: torch.Tensor,
    ops: VoteOps,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    inverse_temperature: float,
    var_floor: float = VAR_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1, M-step, for every parent at once.

    Returns μ (centred; N, L, J, H), σ² (N, L, J, H) and the activation logit
    λ(β_a − Σ_h cost^h) (N, L, J).
    """
    weighted = assignments * activations_in.unsqueeze(2)  # R_ij a_i: (N, L, J, S)
    amount = weighted.sum(-1)  # Σ_i R_ij: (N, L, J)
    divisor = amount.clamp_min(SUM_FLOOR).unsqueeze(-1)  # (N, L, J, 1)
    sum_v, sum_v2 = ops.moments(weighted)  # (N, L, J, H) each
    mean = sum_v / divisor
    variance = (sum_v2 / divisor - mean.square()).clamp_min(0.0) + var_floor  # (N, L, J, H)
    log_sigma = 0.5 * variance.log()
    cost = ((beta_u.view(-1, 1) + log_sigma) * amount.unsqueeze(-1)).sum(-1)  # (N, L, J)
    logit = inverse_temperature * (beta_a - cost)
    return mean, variance, logit


def e_step_logits(
    mean: torch.Tensor,
    variance: torch.Tensor,
    log_activation: torch.Tensor,
    ops: VoteOps,
    likelihood_power: float = 1.0,
) -> torch.Tensor:
    """log(a_j p_j^τ) for every (child slot, parent): (N, L, J, S), Procedure 1 E-step line 2.

    τ = `likelihood_power`; τ = 1 is Procedure 1, τ < 1 a tempered E-step (docs/model.md)."""
    h = mean.shape[-1]
    inv_var = variance.reciprocal()  # (N, L, J, H)
    # Σ_h (v − μ)²/σ² expanded as Σ v²/σ² − 2 Σ v μ/σ² + Σ μ²/σ²: matrix-vector products over h.
    quad = ops.quadratic(inv_var, mean * inv_var) + (mean.square() * inv_var).sum(-1, keepdim=True)
    quad = quad.clamp_min(0.0)  # (N, L, J, S)
    log_norm = 0.5 * variance.log().sum(-1, keepdim=True) + 0.5 * h * math.log(2 * math.pi)
    log_p = -0.5 * quad - log_norm  # log p_j of every slot: (N, L, J, S)
    if likelihood_power != 1.0:
        log_p = likelihood_power * log_p
    return log_activation.unsqueeze(-1) + log_p  # (N, L, J, S)


def normalise_assignments(logits: torch.Tensor, child_map: ChildMap | None) -> torch.Tensor:
    """R_ij = a_j p_j / Σ_k a_k p_k over each child's parents, from log(a_j p_j): (N, L, J, S)."""
    if child_map is None:
        return torch.softmax(logits, dim=2)
    n, l, j, s = logits.shape
    index = child_map.index
    # A per-child shift (the max over all its parents) keeps exp() in range; R is shift-free.
    slot_max = logits.detach().amax(dim=2).reshape(n, l * s)  # (N, L*S)
    child_max = slot_max.new_full((n, child_map.num_children), -torch.inf)
    child_max = child_max.scatter_reduce(1, index.expand(n, -1), slot_max, "amax")
    shift = child_max[:, index].view(n, l, 1, s)  # (N, L, 1, S)
    unnorm = (logits - shift).exp()  # (N, L, J, S)
    slot_sum = unnorm.sum(dim=2).reshape(n, l * s)  # (N, L*S)
    child_sum = slot_sum.new_zeros(n, child_map.num_children).index_add(1, index, slot_sum)
    return unnorm / child_sum[:, index].view(n, l, 1, s)


def routing_iterations(
    ops: VoteOps,
    activations_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iters: int,
    final_lambda: float,
    child_map: ChildMap | None,
    return_assignments: bool = False,
    var_floor: float = VAR_FLOOR,
    trace: list[RoutingStep] | None = None,
    likelihood_power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loop of Procedure 1 on centred votes. Returns (centred μ (N, L, J, H), activation
    logit (N, L, J), the last E-step's R (N, L, J, S) if `return_assignments` else None).

    With a `trace` list, every M-step appends its RoutingStep (for diagnostics)."""
    n, l, j, s, _ = ops.v.shape
    assignments = initial_assignments((n, l, j, s), child_map, ops.v)  # (N, L, J, S)
    for t, lam in enumerate(inverse_temperatures(iters, final_lambda)):
        mean, variance, logit = m_step(
            assignments, activations_in, ops, beta_u, beta_a, lam, var_floor
        )
        if trace is not None:
            trace.append(RoutingStep(assignments, variance, logit))
        # The E-step after the last M-step changes nothing that is returned: skip it.
        if t < iters - 1 or return_assignments:
            logits = e_step_logits(mean, variance, F.logsigmoid(logit), ops, likelihood_power)
            assignments = normalise_assignments(logits, child_map)
    return mean, logit, assignments if return_assignments else None


def em_routing(
    votes: torch.Tensor,
    activations_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iters: int = 3,
    final_lambda: float = 0.01,
    child_map: ChildMap | None = None,
    return_assignments: bool = False,
    var_floor: float = VAR_FLOOR,
    trace: list[RoutingStep] | None = None,
    likelihood_power: float = 1.0,
):
    """Procedure 1 on given votes, differentiated by plain autograd.

    votes (N, L, J, S, H), activations_in (N, L, S), β (J,). Returns (poses (N, L, J, H),
    activations (N, L, J)), plus the assignments R (N, L, J, S) of an E-step run after the last
    M-step when `return_assignments`. The capsule layers use `routing.fused.route`, which
    computes the same thing with far less memory.
    """
    # Centre on a constant (detached) per-parent shift: exact, and better conditioned.
    shift = votes.detach().mean(dim=3, keepdim=True)  # (N, L, J, 1, H)
    centred = votes - shift  # (N, L, J, S, H)
    ops = VoteOps(centred, centred.square())
    mean, logit, assignments = routing_iterations(
        ops,
        activations_in,
        beta_u,
        beta_a,
        iters,
        final_lambda,
        child_map,
        return_assignments,
        var_floor,
        trace,
        likelihood_power,
    )
    poses = mean + shift.squeeze(3)  # (N, L, J, H)
    activations = torch.sigmoid(logit)  # (N, L, J)
    if return_assignments:
        return poses, activations, assignments
    return poses, activations

"""A slow, loop-based EM routing written straight from Procedure 1, one child and one parent at
a time. It exists to check the vectorised `em.em_routing` and to time against it.

A routing problem is given densely for ONE image:
    votes      (I, J, H)  vote of child i for parent j (ignored where not connected)
    activations (I,)      a_i
    connected  (I, J)     bool, whether j is one of i's parents
    beta_u, beta_a (J,)   per parent
The same floors as the fast version are applied (`var_floor`, routing.SUM_FLOOR), and the same
optional tempering of the E-step (`likelihood_power` τ: R_ij ∝ a_j p_ij^τ; τ = 1 is Procedure 1).
"""

from __future__ import annotations

import math

import torch

from emcaps_cli.capsules.em import SUM_FLOOR, VAR_FLOOR, inverse_temperatures


def reference_em_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    connected: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    iters: int,
    final_lambda: float,
    var_floor: float = VAR_FLOOR,
    likelihood_power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (μ (J, H), a (J,), R (I, J) from the E-step after the last M-step)."""
    n_children, n_parents, n_dims = votes.shape
    parents_of = [[j for j in range(n_parents) if connected[i, j]] for i in range(n_children)]
    # Procedure 1, line 2: R_ij uniform over i's parents.
    R = [[0.0] * n_parents for _ in range(n_children)]
    for i in range(n_children):
        for j in parents_of[i]:
            R[i][j] = 1.0 / len(parents_of[i])
    mu = [[0.0] * n_dims for _ in range(n_parents)]
    sigma_sq = [[1.0] * n_dims for _ in range(n_parents)]
    a_out = [0.0] * n_parents
    for lam in inverse_temperatures(iters, final_lambda):
        # M-step for every parent j.
        for j in range(n_parents):
            children = [i for i in range(n_children) if connected[i, j]]
            r = {i: R[i][j] * float(activations[i]) for i in children}  # R_ij <- R_ij a_i
            total = sum(r.values())
            divisor = max(total, SUM_FLOOR)
            cost = 0.0
            for h in range(n_dims):
                mu[j][h] = sum(r[i] * float(votes[i, j, h]) for i in children) / divisor
                sigma_sq[j][h] = (
                    sum(r[i] * (float(votes[i, j, h]) - mu[j][h]) ** 2 for i in children) / divisor
                    + var_floor
                )
                cost += (float(beta_u[j]) + math.log(math.sqrt(sigma_sq[j][h]))) * total
            a_out[j] = 1.0 / (1.0 + math.exp(-lam * (float(beta_a[j]) - cost)))
        # E-step for every child i.
        for i in range(n_children):
            weighted = {}
            for j in parents_of[i]:
                norm = 1.0
                for h in range(n_dims):
                    norm *= 2 * math.pi * sigma_sq[j][h]
                exponent = sum(
                    (float(votes[i, j, h]) - mu[j][h]) ** 2 / (2 * sigma_sq[j][h])
                    for h in range(n_dims)
                )
                p_ij = math.exp(-exponent) / math.sqrt(norm)
                weighted[j] = a_out[j] * p_ij**likelihood_power
            total = sum(weighted.values())
            for j in parents_of[i]:
                R[i][j] = weighted[j] / total
    dtype = votes.dtype
    return (
        torch.tensor(mu, dtype=dtype),
        torch.tensor(a_out, dtype=dtype),
        torch.tensor(R, dtype=dtype),
    )


def dense_conv_problem(
    poses: torch.Tensor,
    activations: torch.Tensor,
    transforms: torch.Tensor,
    kernel: int,
    stride: int,
    rows: int,
    row_len: int,
):
    """The whole-grid routing problem of one conv capsule layer for ONE image, built by loops.

    poses (H, W, B, 16), activations (H, W, B), transforms (K*K*B, J, q, q) indexed by
    offset * B + type. Children are (position, type), parents (output position, type); a child
    is connected to the parents whose receptive field holds it, and its vote for them uses the
    transform of its offset in that field. Returns (votes (I, P, 16), a (I,), connected (I, P)).
    """
    h, w, b, _ = poses.shape
    j_types = transforms.shape[1]
    out_h, out_w = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    n_children, n_parents = h * w * b, out_h * out_w * j_types
    votes = torch.zeros(n_children, n_parents, 16, dtype=poses.dtype)
    connected = torch.zeros(n_children, n_parents, dtype=torch.bool)
    for orow in range(out_h):
        for ocol in range(out_w):
            for dr in range(kernel):
                for dc in range(kernel):
                    row, col = orow * stride + dr, ocol * stride + dc
                    for t in range(b):
                        child = (row * w + col) * b + t
                        pose = poses[row, col, t].reshape(rows, row_len)
                        for j in range(j_types):
                            parent = (orow * out_w + ocol) * j_types + j
                            offset = dr * kernel + dc
                            vote = pose @ transforms[offset * b + t, j]
                            votes[child, parent] = vote.reshape(16)
                            connected[child, parent] = True
    return votes, activations.reshape(-1), connected

"""Votes V = pose @ W as one batched matmul per child slot, and the matching backward.

A pose is 4 rows of 4 ("matrix") or 1 row of 16 ("vector"); W is row_len x row_len.
    child_poses  (N, L, S, 16)     pose of the child in slot s at parent position l
    transforms   (S, J, q, q)      W of slot s for parent type j
    votes        (N, L, J, S, 16)  the layout EM routing reads
"""

from __future__ import annotations

import torch

POSE_SIZE = 16


def _rows_by_slot(child_poses: torch.Tensor, rows: int, row_len: int) -> torch.Tensor:
    """(N, L, S, 16) -> (S, N*L*rows, q): every pose row of slot s stacked for one matmul."""
    n, l, s, _ = child_poses.shape
    x = child_poses.reshape(n * l, s, rows, row_len).permute(1, 0, 2, 3)  # (S, N*L, rows, q)
    return x.reshape(s, n * l * rows, row_len)


def _transform_matrix(transforms: torch.Tensor) -> torch.Tensor:
    """(S, J, q, q) -> (S, q, J*q): all parents' W of a slot side by side."""
    s, j, q, _ = transforms.shape
    return transforms.permute(0, 2, 1, 3).reshape(s, q, j * q)


def compute_votes(
    child_poses: torch.Tensor, transforms: torch.Tensor, rows: int, row_len: int
) -> torch.Tensor:
    """child_poses (N, L, S, 16), transforms (S, J, q, q) -> votes (N, L, J, S, 16)."""
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    v = torch.bmm(_rows_by_slot(child_poses, rows, row_len), _transform_matrix(transforms))
    v = v.view(s, n, l, rows, j, row_len).permute(1, 2, 4, 0, 3, 5)  # (N, L, J, S, rows, q)
    return v.reshape(n, l, j, s, POSE_SIZE)


def vote_backward(
    grad_votes: torch.Tensor,
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    rows: int,
    row_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of compute_votes: grad_votes (N, L, J, S, 16) -> (grad poses, grad transforms)."""
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    g = grad_votes.view(n, l, j, s, rows, row_len).permute(3, 0, 1, 4, 2, 5)  # (S,N,L,rows,J,q)
    g = g.reshape(s, n * l * rows, j * row_len)  # (S, N*L*rows, J*q)
    x = _rows_by_slot(child_poses, rows, row_len)  # (S, N*L*rows, q)
    grad_x = torch.bmm(g, _transform_matrix(transforms).transpose(1, 2))  # (S, N*L*rows, q)
    grad_poses = grad_x.view(s, n, l, rows, row_len).permute(1, 2, 0, 3, 4)
    grad_w = torch.bmm(x.transpose(1, 2), g)  # (S, q, J*q)
    grad_transforms = grad_w.view(s, row_len, j, row_len).permute(0, 2, 1, 3)
    return grad_poses.reshape(n, l, s, POSE_SIZE), grad_transforms.contiguous()

"""Votes V = pose @ W as one batched matmul per child slot, and the matching backward.

A pose is 4 rows of 4 ("matrix") or 1 row of 16 ("vector"); W is row_len x row_len.
    child_poses  (N, L, S, 16)     pose of the child in slot s at parent position l
    transforms   (S, J, q, q)      W of slot s for parent type j
    votes        (N, L, J, S, 16)  the natural layout (plain autograd, tests)
    votes_t      (N, L, J, 16, S)  slot index last: the layout EM routing reads (`VoteOps`)
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


def _votes_by_slot(
    child_poses: torch.Tensor, transforms: torch.Tensor, rows: int, row_len: int
) -> torch.Tensor:
    """The one batched matmul: (N, L, S, 16) x (S, J, q, q) -> (S, N, L, rows, J, q)."""
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    v = torch.bmm(_rows_by_slot(child_poses, rows, row_len), _transform_matrix(transforms))
    return v.view(s, n, l, rows, j, row_len)


def compute_votes(
    child_poses: torch.Tensor, transforms: torch.Tensor, rows: int, row_len: int
) -> torch.Tensor:
    """child_poses (N, L, S, 16), transforms (S, J, q, q) -> votes (N, L, J, S, 16)."""
    n, l, s, _ = child_poses.shape
    v = _votes_by_slot(child_poses, transforms, rows, row_len)  # (S, N, L, rows, J, q)
    v = v.permute(1, 2, 4, 0, 3, 5)  # (N, L, J, S, rows, q)
    return v.reshape(n, l, transforms.shape[1], s, POSE_SIZE)


CHUNK_ELEMENTS = 2**20  # vote entries (4 MB in float32) per chunk: stays in the 32 MB L3


def _slot_last(child_poses: torch.Tensor, transforms: torch.Tensor, rows: int, row_len: int):
    """Poses (N*L, rows, q, S) and W (J, q, q, S) with the slot index last."""
    n, l, s, _ = child_poses.shape
    poses_t = child_poses.reshape(n * l, s, rows, row_len).permute(0, 2, 3, 1).contiguous()
    return poses_t, transforms.permute(1, 2, 3, 0).contiguous()


def _row_chunks(n_rows: int, row_size: int):
    step = max(1, CHUNK_ELEMENTS // row_size)
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def compute_votes_t(
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    rows: int,
    row_len: int,
    out: torch.Tensor,
    finish=None,
) -> torch.Tensor:
    """Votes written slot-last into `out` (N, L, J, 16, S), which may be a strided view.

    V[r, c, s] = Σ_k M_s[r, k] W_s[k, c] for every (image, position, parent type), as q
    broadcast multiply-adds with the slot index innermost, a few (image, position) rows at a time
    so each chunk stays in cache. A bmm over slots would put the slot index outermost and need
    a transposing copy of the whole vote tensor, ~5x slower on CPU. `finish(rows, chunk)`, if
    given, runs on each finished chunk (N*L rows slice, (n, J, 16, S) view) while it is in cache.
    """
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    poses_t, w_t = _slot_last(child_poses, transforms, rows, row_len)  # (NL,r,q,S), (J,q,q,S)
    out_rows = out.view(n * l, j, POSE_SIZE, s)
    for rows_slice in _row_chunks(n * l, j * POSE_SIZE * s):
        chunk = out_rows[rows_slice]  # (n, J, 16, S)
        v = chunk.view(-1, j, rows, row_len, s)  # (n, J, rows, q, S)
        p = poses_t[rows_slice].unsqueeze(1)  # (n, 1, rows, q, S)
        torch.mul(p[:, :, :, :1], w_t[:, None, 0], out=v)
        for k in range(1, row_len):
            v.addcmul_(p[:, :, :, k : k + 1], w_t[:, None, k])
        if finish is not None:
            finish(rows_slice, chunk)
    return out


def vote_backward(
    grad_votes_t: torch.Tensor,
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    rows: int,
    row_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `compute_votes_t`: grad_votes_t (N, L, J, 16, S), slot-last and possibly a
    strided view -> (grad poses (N, L, S, 16), grad transforms (S, J, q, q)). Chunked like the
    forward: dM_s[r, k] = Σ_(j,c) dV[j, r, c, s] W_s[j, k, c], dW_s[j, k, c] = Σ_r M_s[r, k] dV;
    einsum makes each a bmm over slots after a cheap in-cache transposition of the chunk."""
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    poses_t, w_t = _slot_last(child_poses, transforms, rows, row_len)  # (NL,r,q,S), (J,q,q,S)
    grad_rows = grad_votes_t.view(n * l, j, POSE_SIZE, s)
    grad_poses = torch.empty_like(poses_t)  # (NL, rows, q, S)
    grad_w = torch.zeros_like(w_t)  # (J, q, q, S)
    for rows_slice in _row_chunks(n * l, j * POSE_SIZE * s):
        g = grad_rows[rows_slice].view(-1, j, rows, row_len, s)  # (n, J, rows, q, S)
        grad_poses[rows_slice] = torch.einsum("ajrcs,jkcs->arks", g, w_t)
        grad_w += torch.einsum("arks,ajrcs->jkcs", poses_t[rows_slice], g)
    grad_poses = grad_poses.permute(0, 3, 1, 2).reshape(n, l, s, POSE_SIZE)
    return grad_poses, grad_w.permute(3, 0, 1, 2).contiguous()

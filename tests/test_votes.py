"""The slot-last, chunked vote kernels equal the plain bmm votes and their autograd gradients."""

import pytest
import torch

from emcaps_cli.capsules import votes as votes_module
from emcaps_cli.capsules.votes import compute_votes, compute_votes_t, vote_backward

D = torch.float64


@pytest.mark.parametrize("rows,row_len", [(4, 4), (1, 16)])
@pytest.mark.parametrize("chunk", [1, 2**20])
def test_slot_last_votes_and_backward_equal_bmm_votes(rows, row_len, chunk, monkeypatch):
    monkeypatch.setattr(votes_module, "CHUNK_ELEMENTS", chunk)  # 1: one (image, position) a chunk
    g = torch.Generator().manual_seed(0)
    n, l, s, j = 2, 3, 5, 4
    poses = torch.randn(n, l, s, 16, generator=g, dtype=D, requires_grad=True)
    transforms = torch.randn(s, j, row_len, row_len, generator=g, dtype=D, requires_grad=True)
    expected = compute_votes(poses, transforms, rows, row_len)  # (N, L, J, S, 16)
    stacked = torch.empty(n, l, j, 32, s, dtype=D)  # strided target, as the routing uses it
    with torch.no_grad():
        got = compute_votes_t(poses, transforms, rows, row_len, stacked[..., :16, :])
    torch.testing.assert_close(got.transpose(-1, -2), expected, atol=1e-12, rtol=0)
    grad = torch.randn(expected.shape, generator=g, dtype=D)
    expected.backward(grad)
    stacked[..., :16, :] = grad.transpose(-1, -2)
    grad_poses, grad_transforms = vote_backward(
        stacked[..., :16, :], poses.detach(), transforms.detach(), rows, row_len
    )
    torch.testing.assert_close(grad_poses, poses.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_transforms, transforms.grad, atol=1e-12, rtol=0)

"""Capsule layers of section 4: primary capsules, convolutional capsules, class capsules.

Capsule tensors are channels-last:
    poses        (N, height, width, types, 16)
    activations  (N, height, width, types)
A pose is a 4x4 matrix stored row-major ("matrix" pose structure) or a 16-vector ("vector").
A vote is pose @ W with W 4x4 (matrix) or 16x16 (vector): the matrix pose is treated as 4 rows
of 4 and the vector pose as 1 row of 16, so both are the same row-times-matrix product.
"""

from __future__ import annotations

import torch
from torch import nn

from emcaps_cli.capsules import geometry
from emcaps_cli.capsules.routing import em_routing

POSE_SIZE = 16


def pose_rows(pose: str) -> tuple[int, int]:
    """(rows, row length) of a pose: (4, 4) for matrix poses, (1, 16) for vector poses."""
    return (4, 4) if pose == "matrix" else (1, 16)


def init_transforms(shape: tuple[int, ...], row_len: int) -> nn.Parameter:
    """W ~ N(0, 1/row_len): a vote entry sums row_len products, so votes keep the poses' scale."""
    return nn.Parameter(torch.randn(shape) / row_len**0.5)


def compute_votes(
    child_poses: torch.Tensor, transforms: torch.Tensor, rows: int, row_len: int
) -> torch.Tensor:
    """Votes V = pose @ W as one batched matmul per child slot.

    child_poses (N, L, S, 16), transforms (S, J, row_len, row_len) -> votes (N, L, J, S, 16).
    """
    n, l, s, _ = child_poses.shape
    j = transforms.shape[1]
    x = child_poses.reshape(n * l, s, rows, row_len).permute(1, 0, 2, 3)  # (S, N*L, rows, q)
    x = x.reshape(s, n * l * rows, row_len)  # (S, N*L*rows, q)
    w = transforms.permute(0, 2, 1, 3).reshape(s, row_len, j * row_len)  # (S, q, J*q)
    v = torch.bmm(x, w)  # (S, N*L*rows, J*q)
    v = v.view(s, n, l, rows, j, row_len).permute(1, 2, 4, 0, 3, 5)  # (N, L, J, S, rows, q)
    return v.reshape(n, l, j, s, POSE_SIZE)


class PrimaryCaps(nn.Module):
    """1x1 convolution from the ReLU layer: a 16-entry pose (linear) and a sigmoid activation
    per capsule type and position."""

    def __init__(self, in_channels: int, types: int) -> None:
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * POSE_SIZE, kernel_size=1)
        self.activation = nn.Conv2d(in_channels, types, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = features.shape  # (N, A, H, W)
        poses = self.pose(features).permute(0, 2, 3, 1)  # (N, H, W, B*16)
        poses = poses.reshape(n, h, w, self.types, POSE_SIZE)  # (N, H, W, B, 16)
        activations = torch.sigmoid(self.activation(features)).permute(0, 2, 3, 1)  # (N,H,W,B)
        return poses, activations


class ConvCaps(nn.Module):
    """K x K convolutional capsules with stride s and EM routing.

    Transformation matrices depend on (kernel offset, child type, parent type). routing="exact"
    normalises each child's assignments over every parent whose receptive field holds it;
    "patch" routes each K x K patch on its own.
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel: int,
        stride: int,
        iters: int = 3,
        pose: str = "matrix",
        routing: str = "exact",
        final_lambda: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_types, self.out_types = in_types, out_types
        self.kernel, self.stride, self.iters = kernel, stride, iters
        self.rows, self.row_len = pose_rows(pose)
        self.routing, self.final_lambda = routing, final_lambda
        slots = kernel * kernel * in_types
        self.transforms = init_transforms(
            (slots, out_types, self.row_len, self.row_len), self.row_len
        )
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))
        self._geometry: dict[tuple, tuple] = {}

    def geometry(self, height: int, width: int, device: torch.device):
        """(patch positions (L, K*K), ChildMap or None, output side) for an input grid, cached."""
        key = (height, width, str(device))
        if key not in self._geometry:
            positions = geometry.patch_positions(height, width, self.kernel, self.stride)
            child_map = None
            if self.routing == "exact":
                child_map = geometry.conv_child_map(
                    height, width, self.kernel, self.stride, self.in_types
                ).to(device)
            out_h = geometry.output_size(height, self.kernel, self.stride)
            out_w = geometry.output_size(width, self.kernel, self.stride)
            self._geometry[key] = (positions.to(device), child_map, (out_h, out_w))
        return self._geometry[key]

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """poses (N, H, W, B, 16) -> votes (N, L, J, K*K*B, 16)."""
        n, h, w, b, p = poses.shape
        positions, _, _ = self.geometry(h, w, poses.device)
        patches = poses.reshape(n, h * w, b, p)[:, positions]  # (N, L, K*K, B, 16)
        patches = patches.reshape(n, positions.shape[0], -1, p)  # (N, L, S, 16)
        return compute_votes(patches, self.transforms, self.rows, self.row_len)

    def forward(
        self, poses: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, w, b, p = poses.shape
        positions, child_map, (out_h, out_w) = self.geometry(h, w, poses.device)
        votes = self.votes(poses)  # (N, L, J, S, 16)
        a_in = activations.reshape(n, h * w, b)[:, positions].reshape(n, positions.shape[0], -1)
        out_poses, out_act = em_routing(
            votes, a_in, self.beta_u, self.beta_a, self.iters, self.final_lambda, child_map
        )  # (N, L, J, 16), (N, L, J)
        return (
            out_poses.reshape(n, out_h, out_w, self.out_types, p),
            out_act.reshape(n, out_h, out_w, self.out_types),
        )


class ClassCaps(nn.Module):
    """Fully connected class capsules. W is shared across positions of a child type, and
    Coordinate Addition adds the child's scaled receptive-field centre (row, column) to the
    first two entries of the right-hand column of its vote (flat entries 3 and 7)."""

    def __init__(
        self,
        in_types: int,
        classes: int,
        iters: int = 3,
        pose: str = "matrix",
        coord_add: bool = True,
        final_lambda: float = 0.01,
    ) -> None:
        super().__init__()
        self.in_types, self.classes, self.iters = in_types, classes, iters
        self.rows, self.row_len = pose_rows(pose)
        self.coord_add, self.final_lambda = coord_add, final_lambda
        self.transforms = init_transforms(
            (in_types, classes, self.row_len, self.row_len), self.row_len
        )
        self.beta_u = nn.Parameter(torch.zeros(classes))
        self.beta_a = nn.Parameter(torch.zeros(classes))
        # Scaled receptive-field centres of the input grid, (H*W, 2); set by the network.
        self.register_buffer("coordinates", torch.zeros(0, 2), persistent=False)

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """poses (N, H, W, D, 16) -> votes (N, 1, classes, H*W*D, 16); slot = position*D + type."""
        n, h, w, d, p = poses.shape
        x = poses.reshape(n, 1, h * w, d, p).transpose(1, 2).reshape(n * h * w, 1, d, p)
        v = compute_votes(x, self.transforms, self.rows, self.row_len)  # (N*H*W, 1, J, D, 16)
        v = v.reshape(n, h * w, self.classes, d, p).permute(0, 2, 1, 3, 4)  # (N, J, H*W, D, 16)
        if self.coord_add:
            coords = self.coordinates.to(v.dtype)  # (H*W, 2)
            add = v.new_zeros(h * w, p)
            add[:, 3], add[:, 7] = coords[:, 0], coords[:, 1]
            v = v + add[:, None, :]  # broadcast over (N, J, ., D)
        return v.reshape(n, 1, self.classes, h * w * d, p)

    def forward(
        self, poses: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = poses.shape[0]
        votes = self.votes(poses)  # (N, 1, J, S, 16)
        a_in = activations.reshape(n, 1, -1)  # (N, 1, S)
        out_poses, out_act = em_routing(
            votes, a_in, self.beta_u, self.beta_a, self.iters, self.final_lambda
        )
        return out_poses[:, 0], out_act[:, 0]  # (N, J, 16), (N, J)

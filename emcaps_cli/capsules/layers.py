"""Capsule layers of section 4: primary capsules, convolutional capsules, class capsules.

Capsule tensors are channels-last:
    poses        (N, height, width, types, 16)
    activations  (N, height, width, types)
A pose is a 4x4 matrix stored row-major ("matrix" pose structure) or a 16-vector ("vector").
A vote is pose @ W with W 4x4 (matrix) or 16x16 (vector): the matrix pose is treated as 4 rows
of 4 and the vector pose as 1 row of 16, so both are the same row-times-matrix product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from emcaps_cli.capsules import geometry
from emcaps_cli.capsules.em import VAR_FLOOR
from emcaps_cli.capsules.parametrisation import effective_parameters, initialise_parameters
from emcaps_cli.capsules.votes import POSE_SIZE, compute_votes
from emcaps_cli.routing.fused import RoutingSpec, route


class RoutingInputs(NamedTuple):
    """One capsule layer's routing problem, as `routing.fused.route` takes it."""

    child_poses: torch.Tensor  # (N, L, S, 16)
    transforms: torch.Tensor  # (S, J, q, q)
    activations_in: torch.Tensor  # (N, L, S)
    beta_u: torch.Tensor  # (J,)
    beta_a: torch.Tensor  # (J,)
    spec: RoutingSpec
    vote_offset: torch.Tensor | None  # (S, 16)

    def votes(self) -> torch.Tensor:
        """The votes, materialised: (N, L, J, S, 16)."""
        return offset_votes(self.child_poses, self.transforms, self.vote_offset)


def offset_votes(
    child_poses: torch.Tensor, transforms: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """compute_votes plus the per-slot vote offset (S, 16) when there is one."""
    votes = compute_votes(child_poses, transforms)
    return votes if offset is None else votes + offset


def layer_spec(layer: nn.Module, final_lambda: float, child_map) -> RoutingSpec:
    """The RoutingSpec of a capsule layer (ConvCaps or ClassCaps) at λ_max `final_lambda`."""
    return RoutingSpec(
        layer.iters,
        final_lambda,
        child_map,
        layer.rows,
        layer.row_len,
        var_floor=layer.var_floor,
        likelihood_power=layer.likelihood_power,
    )


def layer_parameters(layer: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(β_u, β_a, λ_max) the routing of a ConvCaps ("conv") or ClassCaps ("class") layer sees."""
    return effective_parameters(
        layer.parametrisation,
        kind,
        layer.beta_u,
        layer.beta_a,
        layer.final_lambda,
        layer.beta_a_scale,
    )


def pose_rows(pose: str) -> tuple[int, int]:
    """(rows, row length) of a pose: (4, 4) for matrix poses, (1, 16) for vector poses."""
    return (4, 4) if pose == "matrix" else (1, 16)


def init_transforms(shape: tuple[int, ...], row_len: int) -> nn.Parameter:
    """W ~ N(0, 1/row_len): a vote entry sums row_len products, so votes keep the poses' scale."""
    return nn.Parameter(torch.randn(shape) / row_len**0.5)


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
    "patch" routes each K x K patch on its own. The β_a the routing sees is the parameter
    itself (`beta_a_scale` 1; only the class capsules scale theirs).
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
        var_floor: float = VAR_FLOOR,
        parametrisation: str = "paper",
        likelihood_power: float = 1.0,
    ) -> None:
        super().__init__()
        self.var_floor, self.parametrisation = var_floor, parametrisation
        self.likelihood_power, self.beta_a_scale = likelihood_power, 1.0
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
        initialise_parameters(parametrisation, "conv", self.beta_u, self.beta_a, self.transforms)
        self._geometry: dict[tuple, tuple] = {}

    def geometry(self, height: int, width: int, device: torch.device):
        """(patch positions (L, K*K), ChildMap or None, output side) for an input grid, cached."""
        key = (height, width, str(device))
        if key not in self._geometry:
            with torch.inference_mode(False):  # cached for later grad-mode calls too
                self._geometry[key] = self._build_geometry(height, width, device)
        return self._geometry[key]

    def _build_geometry(self, height: int, width: int, device: torch.device):
        positions = geometry.patch_positions(height, width, self.kernel, self.stride)
        child_map = None
        if self.routing == "exact":
            child_map = geometry.conv_child_map(
                height, width, self.kernel, self.stride, self.in_types
            ).to(device)
        out_h = geometry.output_size(height, self.kernel, self.stride)
        out_w = geometry.output_size(width, self.kernel, self.stride)
        return positions.to(device), child_map, (out_h, out_w)

    def patches(self, poses: torch.Tensor) -> torch.Tensor:
        """poses (N, H, W, B, 16) -> child poses per parent position (N, L, K*K*B, 16)."""
        n, h, w, b, p = poses.shape
        positions, _, _ = self.geometry(h, w, poses.device)
        patches = poses.reshape(n, h * w, b, p)[:, positions]  # (N, L, K*K, B, 16)
        return patches.reshape(n, positions.shape[0], -1, p)

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """poses (N, H, W, B, 16) -> votes (N, L, J, K*K*B, 16)."""
        return compute_votes(self.patches(poses), self.transforms)

    def routing_inputs(self, poses: torch.Tensor, activations: torch.Tensor) -> RoutingInputs:
        """poses (N, H, W, B, 16), activations (N, H, W, B) -> the layer's routing problem."""
        n, h, w, b, _ = poses.shape
        positions, child_map, _ = self.geometry(h, w, poses.device)
        a_in = activations.reshape(n, h * w, b)[:, positions].reshape(n, positions.shape[0], -1)
        beta_u, beta_a, lam = layer_parameters(self, "conv")
        spec = layer_spec(self, lam, child_map)
        return RoutingInputs(self.patches(poses), self.transforms, a_in, beta_u, beta_a, spec, None)

    def forward(
        self, poses: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, w, _, p = poses.shape
        _, _, (out_h, out_w) = self.geometry(h, w, poses.device)
        out_poses, out_act = route(*self.routing_inputs(poses, activations))
        # (N, L, J, 16), (N, L, J)
        return (
            out_poses.reshape(n, out_h, out_w, self.out_types, p),
            out_act.reshape(n, out_h, out_w, self.out_types),
        )


class ClassCaps(nn.Module):
    """Fully connected class capsules. W is shared across positions of a child type, and
    Coordinate Addition adds the child's scaled receptive-field centre (row, column) to the
    first two entries of the right-hand column of its vote (flat entries 3 and 7). The β_a the
    routing sees is `beta_a_scale` times the parameter."""

    def __init__(
        self,
        in_types: int,
        classes: int,
        iters: int = 3,
        pose: str = "matrix",
        coord_add: bool = True,
        final_lambda: float = 0.01,
        var_floor: float = VAR_FLOOR,
        parametrisation: str = "paper",
        likelihood_power: float = 1.0,
        beta_a_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.var_floor, self.parametrisation = var_floor, parametrisation
        self.likelihood_power, self.beta_a_scale = likelihood_power, beta_a_scale
        self.in_types, self.classes, self.iters = in_types, classes, iters
        self.rows, self.row_len = pose_rows(pose)
        self.coord_add, self.final_lambda = coord_add, final_lambda
        self.transforms = init_transforms(
            (in_types, classes, self.row_len, self.row_len), self.row_len
        )
        self.beta_u = nn.Parameter(torch.zeros(classes))
        self.beta_a = nn.Parameter(torch.zeros(classes))
        initialise_parameters(parametrisation, "class", self.beta_u, self.beta_a, self.transforms)
        # Scaled receptive-field centres of the input grid, (H*W, 2); set by the network.
        self.register_buffer("coordinates", torch.zeros(0, 2), persistent=False)

    def slot_inputs(self, poses: torch.Tensor):
        """The class layer as one routing problem per image, slot = position * D + type.

        poses (N, H, W, D, 16) -> child poses (N, 1, S, 16), per-slot transforms (S, J, q, q)
        (shared across positions), per-slot vote offset (S, 16) or None.
        """
        n, h, w, d, p = poses.shape
        child_poses = poses.reshape(n, 1, h * w * d, p)
        transforms = self.transforms.repeat(h * w, 1, 1, 1)  # (S, J, q, q)
        offset = None
        if self.coord_add:
            coords = self.coordinates.to(poses.dtype)  # (H*W, 2)
            offset = poses.new_zeros(h * w, d, p)
            offset[:, :, 3] = coords[:, None, 0]  # M[0, 3] += scaled row
            offset[:, :, 7] = coords[:, None, 1]  # M[1, 3] += scaled column
            offset = offset.reshape(h * w * d, p)
        return child_poses, transforms, offset

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """poses (N, H, W, D, 16) -> votes (N, 1, classes, H*W*D, 16)."""
        return offset_votes(*self.slot_inputs(poses))

    def routing_inputs(self, poses: torch.Tensor, activations: torch.Tensor) -> RoutingInputs:
        """poses (N, H, W, D, 16), activations (N, H, W, D) -> the layer's routing problem."""
        child_poses, transforms, offset = self.slot_inputs(poses)
        a_in = activations.reshape(poses.shape[0], 1, -1)  # (N, 1, S)
        beta_u, beta_a, lam = layer_parameters(self, "class")
        spec = layer_spec(self, lam, None)
        return RoutingInputs(child_poses, transforms, a_in, beta_u, beta_a, spec, offset)

    def forward(
        self, poses: torch.Tensor, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_poses, out_act = route(*self.routing_inputs(poses, activations))
        return out_poses[:, 0], out_act[:, 0]  # (N, J, 16), (N, J)

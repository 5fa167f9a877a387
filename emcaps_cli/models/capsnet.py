"""The capsule network of Fig. 1 (section 4).

    images (N, channels, 32, 32)
    -> ReLU conv 5x5, stride 2, A channels          (N, A, 14, 14)
    -> primary capsules, 1x1, B types               (N, 14, 14, B, 16), (N, 14, 14, B)
    -> conv capsules K=3, stride 2, C types         (N, 6, 6, C, 16),   (N, 6, 6, C)
    -> conv capsules K=3, stride 1, D types         (N, 4, 4, D, 16),   (N, 4, 4, D)
    -> class capsules, one per class                (N, 5, 16),         (N, 5)
The forward pass returns the class activations (N, 5); `forward_all` also returns the poses.
"""

from __future__ import annotations

import torch
from torch import nn

from emcaps_cli.capsules.geometry import output_size, receptive_field_centres
from emcaps_cli.capsules.layers import ClassCaps, ConvCaps, PrimaryCaps
from emcaps_cli.config import ModelConfig

# (kernel, stride) of every spatial layer, from the image up to the last conv capsules.
LAYER_GEOMETRY = [(5, 2), (1, 1), (3, 2), (3, 1)]


class CapsNet(nn.Module):
    score_kind = "activation"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        a, b, c, d = config.arch
        common = dict(
            iters=config.iters,
            pose=config.pose,
            final_lambda=config.final_lambda,
            var_floor=config.var_floor,
            likelihood_power=config.likelihood_power,
            parametrisation=config.parametrisation,
        )
        self.conv1 = nn.Conv2d(config.channels, a, kernel_size=5, stride=2)
        self.primary_caps = PrimaryCaps(a, b)
        conv = dict(common, routing=config.routing)
        lambda1, lambda2 = config.conv_lambdas()
        self.conv_caps1 = ConvCaps(b, c, kernel=3, stride=2, **dict(conv, final_lambda=lambda1))
        self.conv_caps2 = ConvCaps(c, d, kernel=3, stride=1, **dict(conv, final_lambda=lambda2))
        class_iters = config.iters if config.class_iters is None else config.class_iters
        self.class_caps = ClassCaps(
            d,
            config.num_classes,
            coord_add=config.coord_add,
            beta_a_scale=config.class_beta_a_scale,
            **dict(common, iters=class_iters),
        )
        # Coordinate Addition: receptive-field centres of the last grid, divided by the image
        # side so they lie in (0, 1).
        centres = receptive_field_centres(config.input_size, LAYER_GEOMETRY) / config.input_size
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        self.class_caps.coordinates = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)

    def front_parameters(self) -> list[nn.Parameter]:
        """The ordinary convolutions' parameters: conv1 and the primary capsules' 1x1 convs."""
        return [*self.conv1.parameters(), *self.primary_caps.parameters()]

    def grid_sizes(self) -> list[int]:
        """Side of every spatial grid, from conv1's output to conv_caps2's."""
        sizes, side = [], self.config.input_size
        for kernel, stride in LAYER_GEOMETRY:
            side = output_size(side, kernel, stride)
            sizes.append(side)
        return sizes

    def forward_layers(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(poses, activations) of every capsule layer, by layer name."""
        features = torch.relu(self.conv1(images))  # (N, A, 14, 14)
        out = {"primary_caps": self.primary_caps(features)}  # (N, 14, 14, B, 16), (N, 14, 14, B)
        out["conv_caps1"] = self.conv_caps1(*out["primary_caps"])  # (N, 6, 6, C, 16), (N,6,6,C)
        out["conv_caps2"] = self.conv_caps2(*out["conv_caps1"])  # (N, 4, 4, D, 16), (N,4,4,D)
        out["class_caps"] = self.class_caps(*out["conv_caps2"])  # (N, 5, 16), (N, 5)
        return out

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        class_poses, class_acts = self.forward_layers(images)["class_caps"]
        return {"poses": class_poses, "activations": class_acts}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_all(images)["activations"]  # (N, 5)

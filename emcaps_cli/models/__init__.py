"""The networks and the one place that turns a ModelConfig (emcaps_cli/config.py) into one.

Every network maps standardized images (N, channels, 32, 32) to class scores (N, num_classes):
the capsule network (capsnet.py) returns class-capsule activations in (0, 1), the CNN (cnn.py)
returns logits. `model.score_kind` says which ("activation" or "logit"). Prediction is the
argmax either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emcaps_cli.models.capsnet import CapsNet
from emcaps_cli.models.cnn import BaselineCNN

if TYPE_CHECKING:
    from torch import nn

    from emcaps_cli.config import ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    """Build the network a config describes (parameters on the CPU, float32)."""
    if config.model == "cnn":
        return BaselineCNN(config)
    return CapsNet(config)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of a network or one of its layers."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

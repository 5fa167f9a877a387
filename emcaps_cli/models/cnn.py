"""The baseline CNN of section 5: two 5x5 conv layers (32, 64) with 2x2 max-pooling, FC 1024
with dropout, 5-way output. On 32x32 input with 2 channels it has about 4.2M parameters."""

from __future__ import annotations

import torch
from torch import nn

from emcaps_cli.config import ModelConfig


class BaselineCNN(nn.Module):
    score_kind = "logit"

    def __init__(self, config: ModelConfig, dropout: float = 0.5) -> None:
        super().__init__()
        self.config = config
        # "same" padding keeps 32 -> 32 -> pool 16 -> 16 -> pool 8, giving 64*8*8*1024 ≈ 4.2M.
        self.features = nn.Sequential(
            nn.Conv2d(config.channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = config.input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(1024, config.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, channels, 32, 32) -> logits (N, num_classes)
        return self.classifier(self.features(images))

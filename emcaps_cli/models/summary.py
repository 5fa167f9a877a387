"""Layer-by-layer description of a network: output shapes and parameter counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from emcaps_cli.config import ModelConfig
from emcaps_cli.models import build_model, count_parameters


def describe(config: ModelConfig) -> dict[str, Any]:
    """{"parameters": int, "layers": [{"name", "kind", "output", "parameters"}, ...]}.

    Output shapes come from a real forward pass on one zero image (batch dimension omitted).
    """
    model = build_model(config).eval()
    layers: list[dict[str, Any]] = []

    def record(name: str, kind: str, module: nn.Module):
        def hook(_module, _inputs, output):
            shapes = [
                list(t.shape[1:]) for t in (output if isinstance(output, tuple) else (output,))
            ]
            layers.append(
                {
                    "name": name,
                    "kind": kind,
                    "output": shapes,
                    "parameters": count_parameters(module),
                }
            )

        return module.register_forward_hook(hook)

    kinds = {
        "conv1": "ReLU conv 5x5 stride 2",
        "primary_caps": "primary capsules 1x1 (poses, activations)",
        "conv_caps1": "conv capsules 3x3 stride 2 (poses, activations)",
        "conv_caps2": "conv capsules 3x3 stride 1 (poses, activations)",
        "class_caps": "class capsules (poses, activations)",
        "features": "conv 5x5 (32) + pool, conv 5x5 (64) + pool",
        "classifier": "FC 1024 + dropout, FC 5",
    }
    hooks = [
        record(name, kinds.get(name, type(child).__name__), child)
        for name, child in model.named_children()
    ]
    with torch.no_grad():
        model(torch.zeros(1, config.channels, config.input_size, config.input_size))
    for h in hooks:
        h.remove()
    return {"config": config.to_dict(), "parameters": count_parameters(model), "layers": layers}

"""Device selection shared by every command."""

from __future__ import annotations

import torch

from emcaps_cli.errors import EmcapsError


def resolve_device(name: str = "auto") -> torch.device:
    """Map `auto|cpu|cuda[:N]` to a torch.device; `auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EmcapsError(f"--device {name}: CUDA is not available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise EmcapsError(f"--device {name}: expected cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EmcapsError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise EmcapsError(f"--device {name}: expected auto, cpu or cuda")

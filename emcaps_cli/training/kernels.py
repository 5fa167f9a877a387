"""Which routing kernels a run trains on, as recorded in config.json and every checkpoint.

`--kernels` / EMCAPS_KERNELS choose "auto", "c", "torch" or "triton"; what runs depends on
the device too (`emcaps_cli.routing.active_backend_name`). The C kernels and the PyTorch ops
train to different float32 results, so a run resumed on other kernels is not bit-identical.
"""

from __future__ import annotations

import torch

from emcaps_cli.config import ModelConfig
from emcaps_cli.errors import EmcapsError


def routing_kernels(model: ModelConfig, device: torch.device) -> str | None:
    """ "c", "torch" or "triton": the kernels a capsule network's float32 routing runs on
    `device` under the current choice; None for a network without routing (the CNN).

    Raises EmcapsError when the chosen kernels cannot run ("c" without a C compiler, "triton"
    without Triton or CUDA)."""
    if model.model != "capsnet":
        return None
    from emcaps_cli.routing import active_backend_name
    from emcaps_cli.routing.backend import KernelsUnavailable, backend

    try:
        return active_backend_name(device)
    except KernelsUnavailable as exc:
        raise EmcapsError(f"--kernels {backend()}: {exc}") from None


def kernels_change(stored: str | None, current: str | None) -> str | None:
    """The note a resume on other kernels than the run's last segment gets, or None.

    `stored` is None for checkpoints written before the kernels were recorded: unknown, so
    nothing to compare."""
    if stored is None or current is None or stored == current:
        return None
    return (
        f"resuming on the {current} routing kernels; the run so far trained on the {stored} "
        "kernels, which give different float32 results, so the run is not bit-identical"
    )

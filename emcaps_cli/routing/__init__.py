"""How EM routing executes: the fused routing loop and its C (CPU) and Triton kernels."""

from __future__ import annotations

import torch


def active_backend_name(device: torch.device | str = "cpu") -> str:
    """The routing backend that float32 tensors on `device` run on now: "c", "torch" or
    "triton" (the user's choice, `backend.set_backend`, resolved as `fused.route` resolves it;
    may build the C kernels, and warns once when it falls back to PyTorch ops)."""
    from emcaps_cli.routing.select import resolve

    return resolve(torch.empty(0, device=device)).name

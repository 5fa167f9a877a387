"""Which backend routes a given batch: the user's choice (backend.backend()) resolved against
the tensors' device and dtype and what is installed, once per `fused.route` call."""

from __future__ import annotations

import warnings

import torch

from emcaps_cli.errors import FallbackWarning
from emcaps_cli.routing.backend import KernelsUnavailable, RoutingBackend, backend
from emcaps_cli.routing.c import ffi
from emcaps_cli.routing.c.backend import C
from emcaps_cli.routing.torch_backend import TORCH
from emcaps_cli.routing.triton_backend import TRITON, triton_unavailable

_warned: set[str] = set()  # the fallback warnings already given, one each per process


def resolve(like: torch.Tensor) -> RoutingBackend:
    """The backend for tensors like `like`, by the user's choice (see backend.py):
    "triton" the Triton kernels or KernelsUnavailable; "auto" the Triton kernels on CUDA
    (PyTorch ops with a one-line warning when Triton cannot run), the C kernels for
    float32/float64 CPU tensors (PyTorch ops with a one-line warning when they do not
    build); "c" the C kernels on the CPU or KernelsUnavailable; "torch" PyTorch ops."""
    choice = backend()
    if choice == "triton" or (choice == "auto" and like.device.type == "cuda"):
        reason = triton_unavailable(like)
        if reason is None:
            return TRITON
        if choice == "triton":
            raise KernelsUnavailable(f"--kernels triton: {reason}")
        warn_once("triton", f"emcaps: routing on the slower PyTorch ops ({reason})")
        return TORCH
    if like.device.type == "cpu" and choice in ("auto", "c"):
        return C if _c_kernels_route(like, required=choice == "c") else TORCH
    return TORCH


@torch.compiler.disable  # file system and ctypes: not for torch.compile to trace
def _c_kernels_route(like: torch.Tensor, required: bool) -> bool:
    """Whether the C kernels take CPU tensors like `like`; with `required`, why not is raised."""
    if like.dtype not in (torch.float32, torch.float64):
        if required:
            raise KernelsUnavailable(f"the C kernels take float32 or float64, not {like.dtype}")
        return False
    try:
        ffi.library()
    except KernelsUnavailable as err:
        if required:
            raise
        warn_once("c", f"emcaps: using the slower PyTorch routing kernels ({err})")
        return False
    return True


def warn_once(topic: str, message: str) -> None:
    """A FallbackWarning (a UserWarning) of `message`, the first time only for `topic` ("c" or
    "triton")."""
    if topic not in _warned:
        _warned.add(topic)
        warnings.warn(message, FallbackWarning, stacklevel=4)

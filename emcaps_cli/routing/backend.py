"""What a routing backend is, and which one the user asked for.

A backend runs the votes and every iteration of Procedure 1 for one chunk of images, and the
hand-written or replayed backward of the same. Three implement `RoutingBackend`:
`torch_backend.TorchBackend` (PyTorch ops, any device), `c.backend.CBackend` (the C kernels,
CPU) and `triton_backend.TritonBackend` (the Triton kernels, CUDA). `select.resolve` picks one
per `fused.route` call from the user's choice (`set_backend`, the `--kernels` option or
`EMCAPS_KERNELS`):

* "auto" (the default): the Triton kernels on CUDA, the C kernels for float32/float64 CPU
  tensors when they build, PyTorch ops otherwise (with a one-line warning when the kernels
  that would have run are unavailable);
* "c", "triton": those kernels or a KernelsUnavailable error;
* "torch": PyTorch ops everywhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from emcaps_cli.errors import EmcapsError

if TYPE_CHECKING:
    from emcaps_cli.routing.spec import RoutingSpec

BACKENDS = ("auto", "c", "torch", "triton")

_choice = os.environ.get("EMCAPS_KERNELS", "auto")


class KernelsUnavailable(EmcapsError):
    """The kernels asked for could not be built, loaded or used (the message says why)."""


class UnknownBackend(EmcapsError, ValueError):
    """A backend name other than those in BACKENDS."""


def set_backend(name: str) -> None:
    """Choose "auto", "c", "torch" or "triton" for the routing (see the module doc)."""
    global _choice
    if name not in BACKENDS:
        raise UnknownBackend(f"kernels must be one of {', '.join(BACKENDS)}, got {name!r}")
    _choice = name


def backend() -> str:
    """The user's choice: "auto", "c", "torch" or "triton"."""
    if _choice not in BACKENDS:
        raise UnknownBackend(
            f"EMCAPS_KERNELS must be one of {', '.join(BACKENDS)}, got {_choice!r}"
        )
    return _choice


class Chunk(NamedTuple):
    """One slice of the batch, as every backend takes it."""

    child_poses: torch.Tensor  # (n, L, S, 16)
    prepared: Any  # W as the backend's `prepare` arranged it
    activations_in: torch.Tensor  # (n, L, S)
    beta_u: torch.Tensor  # (J,)
    beta_a: torch.Tensor  # (J,)
    vote_offset: torch.Tensor | None  # (S, 16)
    spec: RoutingSpec


# Gradients of one chunk: (poses (n, L, S, 16), transforms (S, J, q, q), activations_in
# (n, L, S), β_u (J,), β_a (J,), vote offset (S, 16)); None where no gradient is formed.
ChunkGradients = tuple[torch.Tensor | None, ...]


class RoutingBackend(Protocol):
    """Votes and EM routing of one chunk, forward and backward (see fused.py)."""

    name: str  # "torch", "c" or "triton"

    def chunk_budget(self) -> int:
        """Votes per chunk when the spec sets none (0: the whole batch at once)."""
        ...

    def prepare(self, transforms: torch.Tensor) -> Any:
        """W (S, J, q, q) arranged once per call for every chunk's `Chunk.prepared`."""
        ...

    def forward(
        self, chunk: Chunk, tape: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses (n, L, J, 16) and activation logits (n, L, J); appends to `tape` (when not
        None) what `backward` needs from this pass."""
        ...

    def backward(
        self,
        chunk: Chunk,
        tape: list[torch.Tensor] | None,
        transforms: torch.Tensor,
        grad_poses: torch.Tensor | None,
        grad_logit: torch.Tensor | None,
        need_offset: bool,
    ) -> ChunkGradients:
        """The chunk's gradients (see ChunkGradients) from those of its outputs."""
        ...

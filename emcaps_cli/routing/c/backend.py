"""The routing on the C kernels (CPU, float32/float64; kernels.c through ffi.py).

One call per chunk runs the votes and all of Procedure 1; a hand-written C backward recomputes
the votes, derives the vote gradient's records and maps that gradient to the poses and W vote by
vote, never storing it.
"""

from __future__ import annotations

import torch

from emcaps_cli.capsules.em import SUM_FLOOR, inverse_temperatures
from emcaps_cli.routing.backend import Chunk, ChunkGradients
from emcaps_cli.routing.c import ffi

# The C kernels keep a chunk's votes (fp32: 16 MB) in the last-level cache across the routing
# passes: 2^22 measured best on the 2-core machines here (32 MB L3; docs/performance.md).
C_VOTE_CHUNK_ELEMENTS = 2**22


class CBackend:
    """Votes and routing on the C kernels: one call per chunk forward, one backward."""

    name = "c"

    def chunk_budget(self) -> int:
        return C_VOTE_CHUNK_ELEMENTS  # read at call time: the benchmark sets it

    def prepare(self, transforms: torch.Tensor) -> ffi.PreparedTransforms:
        return ffi.PreparedTransforms(transforms)

    def forward(self, chunk: Chunk, tape: list[torch.Tensor] | None):
        """The whole chunk in one C call (votes and every iteration of Procedure 1)."""
        poses, logit, taped = ffi.route_forward(_problem(chunk), tape is not None)
        if tape is not None:
            tape.extend(taped)
        return poses, logit

    def backward(
        self, chunk: Chunk, tape, transforms, grad_poses, grad_logit, need_offset
    ) -> ChunkGradients:
        """The same gradients as TorchBackend.backward, from the C kernels' hand-written
        backward of the whole chunk."""
        return ffi.route_backward(_problem(chunk), tape, grad_poses, grad_logit, need_offset)


def _problem(chunk: Chunk) -> ffi.RoutingProblem:
    spec, cmap = chunk.spec, chunk.spec.child_map
    return ffi.RoutingProblem(
        chunk.child_poses,
        chunk.prepared,
        chunk.vote_offset,
        chunk.activations_in,
        chunk.beta_u,
        chunk.beta_a,
        inverse_temperatures(spec.iters, spec.final_lambda),
        None if cmap is None else cmap.index,
        None if cmap is None else cmap.parent_count,
        0 if cmap is None else cmap.num_children,
        spec.var_floor,
        SUM_FLOOR,
        spec.likelihood_power,
    )


C = CBackend()

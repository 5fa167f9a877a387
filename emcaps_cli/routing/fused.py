"""Votes + EM routing as one autograd function that recomputes instead of storing.

Plain autograd keeps several vote-sized tensors per routing iteration alive for the backward
pass (the conv-capsule vote tensor of the paper model is ~680 MB at batch 32) and writes one
vote-sized gradient per use of the votes. Here the forward pass keeps only the child poses and
transforms, plus (when a gradient will be asked for) a tape of small per-parent results. Every
use of the votes is linear in v or in v², so the vote gradient has the form
dL/dv = v ⊙ (A @ B) + A @ C with A (…, S, T) and B, C (…, T, H) built from T small records.

The work of one chunk is a `RoutingBackend` (backend.py), chosen once per call by
`select.resolve`: `CBackend` (c/backend.py, the C kernels on the CPU), `TritonBackend`
(triton_backend.py, CUDA) or `TorchBackend` (torch_backend.py, PyTorch ops on any device).

The batch is taken in chunks of images (routing is independent per image) so that one chunk's
vote tensor stays under the backend's `chunk_budget` (or the spec's `chunk_elements`), in
forward and backward alike.

All three backends equal plain autograd through `capsules.em.em_routing` (tested in float64).
"""

from __future__ import annotations

import torch

from emcaps_cli.capsules.em import em_routing
from emcaps_cli.capsules.votes import compute_votes
from emcaps_cli.routing.backend import Chunk, RoutingBackend
from emcaps_cli.routing.select import resolve
from emcaps_cli.routing.spec import RoutingSpec

__all__ = ["RoutingSpec", "plain_route", "route"]


def _chunks(
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    spec: RoutingSpec,
    default_budget: int,
) -> list[slice]:
    """Slices of the batch routed one after another (routing is independent per image), each
    with at most `chunk_elements` vote entries (spec's, else `default_budget`; at least one
    image), as even as possible. Peak memory then no longer grows with the batch."""
    n, l, s, h = child_poses.shape
    budget = default_budget if spec.chunk_elements is None else spec.chunk_elements
    per_image = l * s * transforms.shape[1] * h
    largest = n if budget == 0 else max(1, min(n, budget // per_image))
    count = -(-n // largest)
    size = -(-n // count)  # balanced: 32 images in chunks of at most 25 -> 16 + 16, not 25 + 7
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _slices(
    child_poses, transforms, activations_in, beta_u, beta_a, vote_offset, spec,
    backend: RoutingBackend,
) -> list[tuple[slice, Chunk]]:  # fmt: skip
    """(slice, Chunk) for every chunk of the batch; W is arranged once for all of them."""
    prepared = backend.prepare(transforms)
    budget = backend.chunk_budget()
    return [
        (part, Chunk(child_poses[part], prepared, activations_in[part], beta_u, beta_a,
                     vote_offset, spec))
        for part in _chunks(child_poses, transforms, spec, budget)
    ]  # fmt: skip


def _add(total, part):
    if part is None:
        return total
    return part if total is None else total + part


class _FusedRouting(torch.autograd.Function):
    """route's votes and routing, chunk by chunk on one backend, forward and backward."""

    @staticmethod
    def forward(
        ctx, child_poses, transforms, activations_in, beta_u, beta_a, vote_offset, spec, backend
    ):
        inputs = (child_poses, transforms, activations_in, beta_u, beta_a, vote_offset)
        # The forward results of the vote-reading operations, one tape per chunk, kept for the
        # backward when a gradient will be asked for (small per-parent tensors, against
        # reading the votes again).
        keep = any(ctx.needs_input_grad[:6])
        means, logits, tapes = [], [], []
        for _, chunk in _slices(*inputs, spec, backend):
            tape = [] if keep else None
            mean, logit = backend.forward(chunk, tape)
            means.append(mean)
            logits.append(logit)
            tapes.append(tape)
        ctx.spec, ctx.backend, ctx.tapes = spec, backend, tapes
        ctx.save_for_backward(*inputs)
        return torch.cat(means), torch.cat(logits)

    @staticmethod
    def backward(ctx, grad_poses, grad_logit):
        spec, backend = ctx.spec, ctx.backend
        inputs = ctx.saved_tensors
        transforms, vote_offset = inputs[1], inputs[5]
        need_offset = vote_offset is not None and ctx.needs_input_grad[5]
        grad_child, grad_a_in = [], []
        grad_w = grad_bu = grad_ba = grad_offset = None
        chunks = _slices(*inputs, spec, backend)
        for (part, chunk), tape in zip(chunks, ctx.tapes, strict=True):
            g_child, g_w, g_a, g_bu, g_ba, g_off = backend.backward(
                chunk,
                tape,
                transforms,
                None if grad_poses is None else grad_poses[part],
                None if grad_logit is None else grad_logit[part],
                need_offset,
            )
            grad_child.append(g_child)
            grad_a_in.append(g_a)
            grad_w, grad_bu, grad_ba = _add(grad_w, g_w), _add(grad_bu, g_bu), _add(grad_ba, g_ba)
            grad_offset = _add(grad_offset, g_off)
        g_a_all = None if any(g is None for g in grad_a_in) else torch.cat(grad_a_in)
        return (torch.cat(grad_child), grad_w, g_a_all, grad_bu, grad_ba, grad_offset, None, None)


def route(
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    activations_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    spec: RoutingSpec,
    vote_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes then EM routing, memory-lean. child_poses (N, L, S, 16), transforms (S, J, q, q),
    activations_in (N, L, S), β (J,), vote_offset (S, 16) or None (added to every vote of a slot).

    Returns poses (N, L, J, 16) and activations (N, L, J).

    Under autocast (`emcaps train --amp`) the routing still runs in float32: the expanded
    quadratic form and the variances lose too much in bf16/fp16, so low-precision inputs are
    cast up and autocast is switched off for the routing alone.
    """
    device_type = child_poses.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            inputs = [child_poses, transforms, activations_in, beta_u, beta_a, vote_offset]
            inputs = [_at_least_float32(t) for t in inputs]
            return route(*inputs[:5], spec, inputs[5])
    inputs = (child_poses, transforms, activations_in, beta_u, beta_a, vote_offset, spec)
    backend = resolve(child_poses)
    if backend.name == "torch":
        poses, logit = _FusedRouting.apply(*inputs, backend)
    else:
        poses, logit = _apply_eager(*inputs, backend)
    return poses, torch.sigmoid(logit)


@torch.compiler.disable
def _apply_eager(*inputs):
    """_FusedRouting on the C kernels (ctypes) or the Triton kernels, which torch.compile does
    not trace inside an autograd Function here: under `--compile` the graph is cut at the
    routing and this part runs eagerly, without a warning per call."""
    return _FusedRouting.apply(*inputs)


def _at_least_float32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def plain_route(
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    activations_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    spec: RoutingSpec,
    vote_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` computed with plain autograd (every intermediate stored): the naive baseline the
    benchmark compares against, and a cross-check in the tests."""
    votes = compute_votes(child_poses, transforms)
    if vote_offset is not None:
        votes = votes + vote_offset
    return em_routing(votes, activations_in, beta_u, beta_a, **spec.loop_options())

"""Votes + EM routing as one autograd function that recomputes instead of storing.

Plain autograd keeps several vote-sized tensors per routing iteration alive for the backward
pass (the conv-capsule vote tensor of the paper model is ~680 MB at batch 32) and writes one
vote-sized gradient per use of the votes. Here the forward pass keeps only the child poses and
transforms, plus (when a gradient will be asked for) a tape of small per-parent results. Every
use of the votes is linear in v or in v², so the vote gradient has the form
dL/dv = v ⊙ (A @ B) + A @ C with A (…, S, T) and B, C (…, T, H) built from T small records.

Three implementations, chosen per call (`implementation`, by `ffi.backend()`):

* `_CVotes` — CPU, float32/float64: one C call per chunk runs votes and all of Procedure 1; a
  hand-written C backward recomputes the votes, derives the records and maps the vote gradient
  to poses and W vote by vote, never storing it (c/kernels.c).
* `_TritonVotes` — CUDA (CPU tensors in Triton's interpreter), float32/float64: one kernel
  launch per routing iteration, one program per (image, parent position) recomputing its votes
  tile by tile in every pass; a hand-written backward of the same shape (triton_kernels.py).
* `_TorchVotes` — any device (CUDA's fallback): the backward recomputes the votes, replays the
  routing loop under autograd with the vote-reading operations (`VoteOps`) replaced by
  functions that pass gradients to the small tensors and *record* their coefficients (their
  forward results come from the tape), assembles dL/dv once and maps it to the poses and W.

The batch is taken in chunks of images (routing is independent per image) so that one chunk's
vote tensor stays under VOTE_CHUNK_ELEMENTS (C_VOTE_CHUNK_ELEMENTS on the C kernels; the Triton
kernels store nothing vote-sized and take the whole batch), in forward and backward alike.

All three equal plain autograd through `capsules.em.em_routing` (tested in float64).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from emcaps_cli.capsules.em import (
    SUM_FLOOR,
    VAR_FLOOR,
    ChildMap,
    VoteOps,
    inverse_temperatures,
    routing_iterations,
)
from emcaps_cli.capsules.votes import compute_votes, vote_backward, vote_matrix, votes_from_matrix
from emcaps_cli.routing.c import ffi

# Votes per routing chunk (64 MB in fp32): the best of 2^22..2^25 measured on 2 cores (paper and
# small model, batch 32; docs/performance.md, "Routing the batch in chunks").
VOTE_CHUNK_ELEMENTS = 2**24
# The C kernels keep a chunk's votes (fp32: 16 MB) in the last-level cache across the routing
# passes: 2^22 measured best on the 2-core machines here (32 MB L3; docs/performance.md).
C_VOTE_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class RoutingSpec:
    iters: int
    final_lambda: float
    child_map: ChildMap | None
    rows: int
    row_len: int
    # Route as many images at a time as keep one chunk's vote tensor within this many elements
    # (at least one image; 0 routes the whole batch at once; None: VOTE_CHUNK_ELEMENTS, or
    # C_VOTE_CHUNK_ELEMENTS on the C kernels).
    chunk_elements: int | None = None
    var_floor: float = VAR_FLOOR  # added to every σ² (routing.m_step)
    likelihood_power: float = 1.0  # τ of the E-step, R ∝ a p^τ (routing.e_step_logits)

    def loop_options(self) -> dict[str, Any]:
        """The routing loop's settings, as keywords of routing.routing_iterations/em_routing."""
        return {
            "iters": self.iters,
            "final_lambda": self.final_lambda,
            "child_map": self.child_map,
            "var_floor": self.var_floor,
            "likelihood_power": self.likelihood_power,
        }


class _TapedVoteOps:
    """A VoteOps whose forward results are appended to a tape, so that the backward replay of
    the routing loop takes them from there instead of reading the votes again (the replay runs
    the same code on the same inputs, so it asks for the same results in the same order)."""

    def __init__(self, base: VoteOps, tape: list[torch.Tensor]) -> None:
        self.base, self.v, self.tape = base, base.v, tape

    def moments(self, weighted):
        out = self.base.moments(weighted)
        self.tape.extend(out)
        return out

    def quadratic(self, inv_var, mean_inv_var):
        out = self.base.quadratic(inv_var, mean_inv_var)
        self.tape.append(out)
        return out


class _RecordingVoteOps:
    """Wraps a VoteOps for the backward replay: its backward records (slot coefficient,
    v-coefficient, constant) triples instead of writing vote-sized gradients. With a tape
    from the forward pass, the forward results are read from it."""

    def __init__(self, base: VoteOps, tape: list[torch.Tensor] | None) -> None:
        self.base = base
        self.v = base.v
        self.tape, self.position = tape, 0
        self.slot_coefs: list[torch.Tensor] = []  # (N, L, J, S)
        self.v_coefs: list[torch.Tensor] = []  # (N, L, J, H): multiplies v
        self.constants: list[torch.Tensor] = []  # (N, L, J, H)

    def record(self, slot: torch.Tensor, v_coef: torch.Tensor, constant: torch.Tensor) -> None:
        # Detached: a recorded tensor's grad_fn would lead back to the nodes that hold this
        # object, a reference cycle through C++ that Python's collector cannot free.
        self.slot_coefs.append(slot.detach())
        self.v_coefs.append(v_coef.detach())
        self.constants.append(constant.detach())

    def moments(self, weighted):
        return _Moments.apply(weighted, self)

    def quadratic(self, inv_var, mean_inv_var):
        return _Quadratic.apply(inv_var, mean_inv_var, self)

    def taped(self, count: int, compute, *args):
        """The next `count` results on the tape, or compute(*args) without a tape."""
        if self.tape is None:
            return compute(*args)
        # Views: autograd gives the returned tensors a grad_fn, and that must not land on the
        # taped tensors themselves (the node holds this object, which holds the tape: a cycle).
        out = [t.view_as(t) for t in self.tape[self.position : self.position + count]]
        self.position += count
        return tuple(out) if count > 1 else out[0]

    def vote_gradient(self) -> torch.Tensor:
        """dL/dv (N, L, J, S, H) = v ⊙ (A @ B) + A @ C from the records."""
        a = torch.stack(self.slot_coefs, dim=-1)  # (N, L, J, S, T)
        b = torch.stack(self.v_coefs, dim=-2)  # (N, L, J, T, H)
        c = torch.stack(self.constants, dim=-2)  # (N, L, J, T, H)
        grad = a @ b  # (N, L, J, S, H)
        grad.mul_(self.v)
        shape = grad.shape
        flat = grad.view(-1, shape[-2], shape[-1])
        flat.baddbmm_(a.reshape(-1, shape[-2], a.shape[-1]), c.reshape(-1, *c.shape[-2:]))
        return grad


class _Moments(torch.autograd.Function):
    """(Σ_s w_s v_s, Σ_s w_s v_s²); backward returns dL/dw and records the v-gradient terms."""

    @staticmethod
    def forward(ctx, weighted, ops):
        ctx.ops = ops
        ctx.save_for_backward(weighted)
        return ops.taped(2, ops.base.moments, weighted)

    @staticmethod
    def backward(ctx, grad_sum, grad_sum_sq):
        ops = ctx.ops
        (weighted,) = ctx.saved_tensors
        if grad_sum is None:
            grad_sum = torch.zeros_like(ops.v[..., 0, :])
        if grad_sum_sq is None:
            grad_sum_sq = torch.zeros_like(ops.v[..., 0, :])
        grad_w = ops.base.row_forms(grad_sum, grad_sum_sq)  # Σ_h v g1 + v² g2
        # d/dv of w·v and w·v²: w ⊗ g1 + 2 v ⊙ (w ⊗ g2)
        ops.record(weighted, 2.0 * grad_sum_sq, grad_sum)
        return grad_w, None


class _Quadratic(torch.autograd.Function):
    """Σ_h v²·iv − 2 Σ_h v·m; backward returns dL/d(iv, m) and records the v-gradient terms."""

    @staticmethod
    def forward(ctx, inv_var, mean_inv_var, ops):
        ctx.ops = ops
        ctx.save_for_backward(inv_var, mean_inv_var)
        return ops.taped(1, ops.base.quadratic, inv_var, mean_inv_var)

    @staticmethod
    def backward(ctx, grad_quad):
        ops = ctx.ops
        inv_var, mean_inv_var = ctx.saved_tensors
        weighted_v, weighted_v2 = ops.base.moments(grad_quad)  # Σ_s g v, Σ_s g v²
        # d/dv: g ⊗ (2 v ⊙ iv − 2 m)
        ops.record(grad_quad, 2.0 * inv_var, -2.0 * mean_inv_var)
        return weighted_v2, -2.0 * weighted_v, None


class _Chunk(NamedTuple):
    """One slice of the batch, as both implementations take it."""

    child_poses: torch.Tensor  # (n, L, S, 16)
    prepared: Any  # W as the implementation's `prepare` arranged it
    activations_in: torch.Tensor  # (n, L, S)
    beta_u: torch.Tensor  # (J,)
    beta_a: torch.Tensor  # (J,)
    vote_offset: torch.Tensor | None  # (S, 16)
    spec: RoutingSpec


class _TorchVotes:
    """Votes and routing in PyTorch ops (any device): votes as one block-diagonal matmul per
    slot, v and v² stored for the routing passes, the backward replayed under autograd."""

    @staticmethod
    def chunk_budget() -> int:
        return VOTE_CHUNK_ELEMENTS  # read at call time: the benchmark sets it

    @staticmethod
    def prepare(transforms):
        return vote_matrix(transforms)  # (S, 16, J*16)

    @staticmethod
    def ops(chunk: _Chunk) -> tuple[VoteOps, torch.Tensor]:
        centred, shift = _centred_votes(chunk.child_poses, chunk.prepared, chunk.vote_offset)
        return VoteOps(centred, centred * centred), shift

    @staticmethod
    def forward(chunk: _Chunk, tape):
        """Votes and routing of one chunk: (poses (n, L, J, H), logits (n, L, J))."""
        ops, shift = _TorchVotes.ops(chunk)
        if tape is not None:
            ops = _TapedVoteOps(ops, tape)
        mean, logit, _ = routing_iterations(
            ops, chunk.activations_in, chunk.beta_u, chunk.beta_a, **chunk.spec.loop_options()
        )
        return mean + shift.squeeze(3), logit

    @staticmethod
    def backward(chunk: _Chunk, tape, transforms, grad_poses, grad_logit, need_offset):
        """Gradients for one chunk: (poses, transforms, a_in, β_u, β_a, offset).

        Replays the routing loop under autograd with the vote-reading operations recording the
        vote gradient's coefficients (taking their forward results from the tape), then builds
        the vote gradient once and maps it to the poses and W."""
        spec = chunk.spec
        with torch.no_grad():
            base, _ = _TorchVotes.ops(chunk)
            ops = _RecordingVoteOps(base, tape)
        with torch.enable_grad():
            small = [
                t.detach().requires_grad_(True)
                for t in (chunk.activations_in, chunk.beta_u, chunk.beta_a)
            ]
            mean, logit, _ = routing_iterations(ops, *small, **spec.loop_options())
            outputs, grads = [], []
            for out, grad in ((mean, grad_poses), (logit, grad_logit)):
                if grad is not None:
                    outputs.append(out)
                    grads.append(grad)
            small_grads = torch.autograd.grad(outputs, small, grads, allow_unused=True)
        del base
        with torch.no_grad():
            ops.base.v2 = None  # free before the vote-sized gradient is built
            grad_votes = ops.vote_gradient()  # (n, L, J, S, H)
            ops.base.v = ops.v = None
            grad_offset = grad_votes.sum(dim=(0, 1, 2)) if need_offset else None
            grad_child, grad_transforms = vote_backward(
                grad_votes, chunk.child_poses, transforms, spec.rows, spec.row_len
            )
        return (grad_child, grad_transforms, *small_grads, grad_offset)


class _CVotes:
    """Votes and routing on the C kernels (CPU; c/kernels.c): one call per chunk forward, one
    backward, the votes recomputed there and their gradient never stored."""

    @staticmethod
    def chunk_budget() -> int:
        return C_VOTE_CHUNK_ELEMENTS

    @staticmethod
    def prepare(transforms):
        return ffi.PreparedTransforms(transforms)

    @staticmethod
    def problem(chunk: _Chunk) -> ffi.RoutingProblem:
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

    @staticmethod
    def forward(chunk: _Chunk, tape):
        """The whole chunk in one C call (votes and every iteration of Procedure 1)."""
        poses, logit, taped = ffi.route_forward(_CVotes.problem(chunk), tape is not None)
        if tape is not None:
            tape.extend(taped)
        return poses, logit

    @staticmethod
    def backward(chunk: _Chunk, tape, transforms, grad_poses, grad_logit, need_offset):
        """The same gradients as _TorchVotes.backward, from the C kernels' hand-written backward
        of the whole chunk."""
        problem = _CVotes.problem(chunk)
        return ffi.route_backward(problem, tape, grad_poses, grad_logit, need_offset)


class _TritonVotes:
    """Votes and routing as Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1): one
    launch per iteration forward and backward, the votes recomputed in every pass over a
    problem's slots and their gradient never stored (triton_kernels.py)."""

    @staticmethod
    def chunk_budget() -> int:
        return 0  # nothing vote-sized is stored: the whole batch at once

    @staticmethod
    def prepare(transforms):
        return transforms.contiguous()

    @staticmethod
    def problem(chunk: _Chunk):
        from emcaps_cli.routing import triton_kernels

        spec, cmap = chunk.spec, chunk.spec.child_map
        l, s = chunk.child_poses.shape[1:3]
        j = chunk.prepared.shape[1]
        if cmap is None:
            initial, table = chunk.child_poses.new_full((l, s), 1.0 / j), None
        else:
            count = cmap.parent_count.to(chunk.child_poses.dtype)  # (L*S,)
            initial = (1.0 / (j * count)).view(l, s)
            table = triton_kernels.child_table(cmap.index, cmap.num_children)
        return triton_kernels.RoutingProblem(
            chunk.child_poses,
            chunk.prepared,
            chunk.vote_offset,
            chunk.activations_in,
            chunk.beta_u,
            chunk.beta_a,
            inverse_temperatures(spec.iters, spec.final_lambda),
            initial,
            table,
            spec.var_floor,
            SUM_FLOOR,
            spec.likelihood_power,
        )

    @staticmethod
    def forward(chunk: _Chunk, tape):
        """Every iteration of Procedure 1 for the chunk, one kernel launch each."""
        from emcaps_cli.routing import triton_kernels

        problem = _TritonVotes.problem(chunk)
        poses, logit, taped = triton_kernels.route_forward(problem, tape is not None)
        if tape is not None:
            tape.extend(taped)
        return poses, logit

    @staticmethod
    def backward(chunk: _Chunk, tape, transforms, grad_poses, grad_logit, need_offset):
        """The same gradients as _TorchVotes.backward, from the kernels' hand-written backward."""
        from emcaps_cli.routing import triton_kernels

        problem = _TritonVotes.problem(chunk)
        return triton_kernels.route_backward(problem, tape, grad_poses, grad_logit, need_offset)


def _centred_votes(child_poses, matrix, vote_offset):
    """Votes (n, L, J, S, H) centred on their unweighted mean per parent, and that mean."""
    votes = votes_from_matrix(child_poses, matrix)  # (n, L, J, S, H)
    if vote_offset is not None:
        votes += vote_offset  # (S, H) broadcast
    shift = votes.mean(dim=3, keepdim=True)  # (n, L, J, 1, H)
    votes -= shift
    return votes, shift


def _chunks(
    child_poses: torch.Tensor,
    transforms: torch.Tensor,
    spec: RoutingSpec,
    default_budget: int = VOTE_CHUNK_ELEMENTS,
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


def _slices(child_poses, transforms, activations_in, beta_u, beta_a, vote_offset, spec, kind):
    """(slice, _Chunk) for every chunk of the batch; W is arranged once for all of them."""
    prepared = kind.prepare(transforms)
    budget = kind.chunk_budget()
    return [
        (part, _Chunk(child_poses[part], prepared, activations_in[part], beta_u, beta_a,
                      vote_offset, spec))
        for part in _chunks(child_poses, transforms, spec, budget)
    ]  # fmt: skip


def _add(total, part):
    if part is None:
        return total
    return part if total is None else total + part


class _FusedRouting(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, child_poses, transforms, activations_in, beta_u, beta_a, vote_offset, spec, kind
    ):
        inputs = (child_poses, transforms, activations_in, beta_u, beta_a, vote_offset)
        # The forward results of the vote-reading operations, one tape per chunk, kept for the
        # backward when a gradient will be asked for (small per-parent tensors, against
        # reading the votes again).
        keep = any(ctx.needs_input_grad[:6])
        means, logits, tapes = [], [], []
        for _, chunk in _slices(*inputs, spec, kind):
            tape = [] if keep else None
            mean, logit = kind.forward(chunk, tape)
            means.append(mean)
            logits.append(logit)
            tapes.append(tape)
        ctx.spec, ctx.kind, ctx.tapes = spec, kind, tapes
        ctx.save_for_backward(*inputs)
        return torch.cat(means), torch.cat(logits)

    @staticmethod
    def backward(ctx, grad_poses, grad_logit):
        spec, kind = ctx.spec, ctx.kind
        inputs = ctx.saved_tensors
        transforms, vote_offset = inputs[1], inputs[5]
        need_offset = vote_offset is not None and ctx.needs_input_grad[5]
        grad_child, grad_a_in = [], []
        grad_w = grad_bu = grad_ba = grad_offset = None
        chunks = _slices(*inputs, spec, kind)
        for (part, chunk), tape in zip(chunks, ctx.tapes, strict=True):
            g_child, g_w, g_a, g_bu, g_ba, g_off = kind.backward(
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
    kind = implementation(child_poses)
    if kind is _TorchVotes:
        poses, logit = _FusedRouting.apply(*inputs, kind)
    else:
        poses, logit = _apply_eager(*inputs, kind)
    return poses, torch.sigmoid(logit)


def implementation(like: torch.Tensor):
    """The routing implementation for tensors like `like`, by `ffi.backend()`:
    "triton" the Triton kernels or an error; "auto" the Triton kernels on CUDA (PyTorch ops
    with a one-line warning when Triton is missing), the C kernels on the CPU; "c" the C
    kernels on the CPU; "torch" PyTorch ops."""
    choice = ffi.backend()
    if choice == "triton" or (choice == "auto" and like.device.type == "cuda"):
        reason = triton_unavailable(like)
        if reason is None:
            return _TritonVotes
        if choice == "triton":
            raise ffi.KernelsUnavailable(f"--kernels triton: {reason}")
        _warn_triton_once(f"emcaps: routing on the slower PyTorch ops ({reason})")
        return _TorchVotes
    return _CVotes if ffi.use_c_kernels(like) else _TorchVotes


_triton_warned = False


def _warn_triton_once(message: str) -> None:
    global _triton_warned
    if not _triton_warned:
        warnings.warn(message, stacklevel=3)
        _triton_warned = True


@torch.compiler.disable
def triton_unavailable(like: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot route tensors like `like`, or None when they can."""
    if like.device.type != "cuda" and not interpreting():
        return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), not {like.device}"
    if like.dtype not in (torch.float32, torch.float64):
        return f"the Triton kernels take float32 or float64, not {like.dtype}"
    try:
        from emcaps_cli.routing import triton_kernels  # noqa: F401
    except ImportError as err:
        return f"Triton is not importable: {err}"
    return None


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    from emcaps_cli.capsules.em import em_routing

    votes = compute_votes(child_poses, transforms)
    if vote_offset is not None:
        votes = votes + vote_offset
    return em_routing(votes, activations_in, beta_u, beta_a, **spec.loop_options())

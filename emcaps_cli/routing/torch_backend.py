"""The routing on PyTorch ops (any device; CUDA's fallback when Triton is missing).

The votes are one block-diagonal matmul per slot, centred on their unweighted mean per parent,
with v and v² stored for the routing passes (`capsules.em.VoteOps`). The backward recomputes
the votes, replays the routing loop under autograd with the vote-reading operations replaced by
functions that pass gradients to the small tensors and *record* their coefficients (their
forward results come from the tape the forward pass kept), assembles dL/dv once as
v ⊙ (A @ B) + A @ C and maps it to the poses and W.
"""

from __future__ import annotations

import torch

from emcaps_cli.capsules.em import VoteOps, routing_iterations
from emcaps_cli.capsules.votes import vote_backward, vote_matrix, votes_from_matrix
from emcaps_cli.routing.backend import Chunk, ChunkGradients

# Votes per routing chunk (64 MB in fp32): the best of 2^22..2^25 measured on 2 cores (paper and
# small model, batch 32; docs/performance.md, "Routing the batch in chunks").
VOTE_CHUNK_ELEMENTS = 2**24


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


class TorchBackend:
    """Votes and routing in PyTorch ops: v and v² stored for the routing passes, the backward
    replayed under autograd."""

    name = "torch"

    def chunk_budget(self) -> int:
        return VOTE_CHUNK_ELEMENTS  # read at call time: the benchmark sets it

    def prepare(self, transforms: torch.Tensor) -> torch.Tensor:
        return vote_matrix(transforms)  # (S, 16, J*16)

    def forward(self, chunk: Chunk, tape: list[torch.Tensor] | None):
        """Votes and routing of one chunk: (poses (n, L, J, H), logits (n, L, J))."""
        ops, shift = _vote_ops(chunk)
        if tape is not None:
            ops = _TapedVoteOps(ops, tape)
        mean, logit, _ = routing_iterations(
            ops, chunk.activations_in, chunk.beta_u, chunk.beta_a, **chunk.spec.loop_options()
        )
        return mean + shift.squeeze(3), logit

    def backward(
        self, chunk: Chunk, tape, transforms, grad_poses, grad_logit, need_offset
    ) -> ChunkGradients:
        """Replays the routing loop under autograd with the vote-reading operations recording the
        vote gradient's coefficients (taking their forward results from the tape), then builds
        the vote gradient once and maps it to the poses and W."""
        spec = chunk.spec
        with torch.no_grad():
            base, _ = _vote_ops(chunk)
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


def _vote_ops(chunk: Chunk) -> tuple[VoteOps, torch.Tensor]:
    centred, shift = _centred_votes(chunk.child_poses, chunk.prepared, chunk.vote_offset)
    return VoteOps(centred, centred * centred), shift


def _centred_votes(child_poses, matrix, vote_offset):
    """Votes (n, L, J, S, H) centred on their unweighted mean per parent, and that mean."""
    votes = votes_from_matrix(child_poses, matrix)  # (n, L, J, S, H)
    if vote_offset is not None:
        votes += vote_offset  # (S, H) broadcast
    shift = votes.mean(dim=3, keepdim=True)  # (n, L, J, 1, H)
    votes -= shift
    return votes, shift


TORCH = TorchBackend()

"""The C kernels' calls through ctypes (source: kernels.c; building and loading: build.py).

`route_forward` computes a chunk's votes straight into the routing layout and runs every
iteration of Procedure 1 on them, reading each vote once per pass (v² formed on the fly) while
the chunk's votes sit in cache; `route_backward` is its hand-written backward, down to the
gradients of the poses and W, with the vote gradient never stored. The PyTorch path
(`capsules.em.VoteOps`) makes one pass over memory per vote-sized operation and keeps v² next to v.

Every routing entry point takes pointers to structs: `Problem` (shapes, schedule, scalars),
`Inputs` (the input tensors) and `ForwardBuffers` or `BackwardBuffers` (work space, outputs,
tape), ctypes mirrors of the C structs of the same role, field for field. kernels.c reports
their layouts through `emcaps_layout` (compared in tests/test_cpu_kernels.py) and its
interface version through `emcaps_abi_version` (checked by build.py on load).
"""

from __future__ import annotations

import ctypes
import threading

import torch

from emcaps_cli.capsules.votes import POSE_SIZE

# The backend choice lives in routing/backend.py; these names stay importable from here for the
# command line and the benchmarks, which import them from this module.
from emcaps_cli.routing.c import build

_i64, _f64, _ptr_t = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
_ptr_array = ctypes.POINTER(ctypes.c_void_p)
_local = threading.local()  # per-thread vote workspace (see _workspace)


class Problem(ctypes.Structure):
    """emcaps_problem: one chunk's shapes (N, L, S, J, Q), λ schedule and scalars."""

    _fields_ = [
        *[(name, _i64) for name in ("N", "L", "S", "J", "Q", "iters", "num_children")],
        ("lambdas", ctypes.POINTER(_f64)),
        *[(name, _f64) for name in ("var_floor", "sum_floor", "likelihood_power")],
    ]


class Inputs(ctypes.Structure):
    """emcaps_inputs: the input tensors (offset, child_index, parent_count may be NULL)."""

    _fields_ = [
        (name, _ptr_t)
        for name in (
            "poses", "tiled", "offset", "a_in", "beta_u", "beta_a", "child_index",
            "parent_count",
        )
    ]  # fmt: skip


class ForwardBuffers(ctypes.Structure):
    """emcaps_forward_buffers: route_forward's work space, outputs and tape (NULL or an array
    of 4·iters − 2 pointers)."""

    _fields_ = [
        *[
            (name, _ptr_t)
            for name in (
                "votes", "shift", "assignments", "variance", "log_sigmas", "slot_a", "slot_b",
                "child_a", "child_b", "poses_out", "logit_out",
            )
        ],
        ("tape", _ptr_array),
    ]  # fmt: skip


class BackwardBuffers(ctypes.Structure):
    """emcaps_backward_buffers: route_backward's tape and output gradients in, work space and
    gradients out (tape: 4·iters − 2 pointers, coefs: 2·iters − 1)."""

    _fields_ = [
        ("tape", _ptr_array),
        *[(name, _ptr_t) for name in ("g_poses", "g_logit", "votes", "shift", "rowbuf")],
        *[(name, _ptr_t) for name in ("grad_assign", "slot", "child")],
        ("coefs", _ptr_array),
        *[(name, _ptr_t) for name in ("vcoef", "constant", "grad_a", "grad_bu", "grad_ba")],
        ("wmat", _ptr_t),
        ("threads", _i64),
        *[(n, _ptr_t) for n in ("grad_poses", "grad_w_threads", "grad_off_threads", "gp_threads")],
    ]


STRUCTS = (Problem, Inputs, ForwardBuffers, BackwardBuffers)  # emcaps_layout's numbering


def library() -> ctypes.CDLL:
    """The compiled kernels with their signatures declared; raises KernelsUnavailable."""
    lib = build.library()
    # marked on the object itself: an id() of a freed library can come back for a new one
    if not getattr(lib, "_emcaps_declared", False):
        _declare(lib)
        lib._emcaps_declared = True
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    problem, inputs = ctypes.POINTER(Problem), ctypes.POINTER(Inputs)
    for suffix in ("f32", "f64"):
        getattr(lib, f"votes_{suffix}").argtypes = [problem, inputs, _ptr_t, _ptr_t]
        forward = ctypes.POINTER(ForwardBuffers)
        getattr(lib, f"route_forward_{suffix}").argtypes = [problem, inputs, forward]
        backward = ctypes.POINTER(BackwardBuffers)
        getattr(lib, f"route_backward_{suffix}").argtypes = [problem, inputs, backward]
        getattr(lib, f"exp_lanes_{suffix}").argtypes = [_ptr_t, _i64, _ptr_t]
    lib.emcaps_layout.argtypes = [_i64, ctypes.POINTER(_i64)]
    lib.emcaps_layout.restype = _i64


def c_layout(which: int) -> list[int]:
    """sizeof and every field offset of C struct `which` (STRUCTS' order), from kernels.c."""
    out = (_i64 * 64)()
    count = library().emcaps_layout(which, out)
    return list(out[:count])


def _function(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pointers(tensors: list[torch.Tensor]):
    """A C array of the tensors' data pointers (kept alive by the caller)."""
    return (ctypes.c_void_p * len(tensors))(*[_ptr(t) for t in tensors])


def tile_transforms(transforms: torch.Tensor) -> torch.Tensor:
    """(S, J, q, q) -> (S, J, q, 16) with tiled[s, j, k, h] = W[s, j, k, h % q]."""
    q = transforms.shape[-1]
    return transforms.repeat(1, 1, 1, POSE_SIZE // q).contiguous()


class PreparedTransforms:
    """W of a layer in the two arrangements the kernels read, made once per layer call.

    tiled (S, J, q, 16): for the votes (see tile_transforms). columns (S, J, q, 16): for the
    backward; matrix poses: columns[s, j, c, (r, k)] = W[s, j, k, c], W's column c spread over
    the rows r; vector poses: W itself (= tiled).
    """

    def __init__(self, transforms: torch.Tensor) -> None:
        s, j, q, _ = transforms.shape
        self.tiled = tile_transforms(transforms)
        if q == 4:
            spread = transforms.transpose(-1, -2).unsqueeze(-2).expand(s, j, q, q, q)
            self.columns = spread.reshape(s, j, q, POSE_SIZE).contiguous()
        else:
            self.columns = self.tiled


def _workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least `numel` entries for a chunk's votes, shared by every kernel
    call of this thread.

    Routing chunks run one after another and each needs its votes only until its call ends, so
    one buffer serves them all; a fresh vote-sized tensor per chunk costs more in first-touch
    page faults than computing the votes (docs/performance.md)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buffers.pop(like.dtype, None)
        with torch.inference_mode(False):  # kept for later calls outside inference mode too
            buf = buffers[like.dtype] = like.new_empty(numel)
    return buf[:numel]


class RoutingProblem:
    """One chunk's routing inputs in the layout the C calls read, and their two structs.

    child_poses (N, L, S, 16), W as PreparedTransforms, offset (S, 16) or None,
    activations_in (N, L, S), β (J,), lambdas one inverse temperature per iteration,
    child_index and parent_count (L*S,) for exact routing or None, the two numeric floors.
    The tensors are converted to the poses' dtype and made contiguous here, and kept alive
    as long as the structs that point at them.
    """

    def __init__(
        self,
        child_poses: torch.Tensor,
        transforms: PreparedTransforms,
        offset: torch.Tensor | None,
        activations_in: torch.Tensor,
        beta_u: torch.Tensor,
        beta_a: torch.Tensor,
        lambdas: list[float],
        child_index: torch.Tensor | None,
        parent_count: torch.Tensor | None,
        num_children: int,
        var_floor: float,
        sum_floor: float,
        likelihood_power: float = 1.0,
    ) -> None:
        dtype = child_poses.dtype
        self.child_poses = child_poses.contiguous()
        self.transforms = transforms
        self.offset = None if offset is None else offset.to(dtype).contiguous()
        self.activations_in = activations_in.to(dtype).contiguous()
        self.beta_u, self.beta_a = beta_u.to(dtype).contiguous(), beta_a.to(dtype).contiguous()
        self.child_index = self.parent_count = None
        if child_index is not None:
            self.child_index = child_index.to(torch.int64).contiguous()
            self.parent_count = parent_count.to(dtype).contiguous()
        self.lambdas = list(lambdas)
        self.num_children = num_children
        self._lambdas = (_f64 * len(self.lambdas))(*self.lambdas)
        n, l, s, _, j, q = self.shape
        self.problem = Problem(
            n, l, s, j, q, len(self.lambdas), num_children,
            self._lambdas, var_floor, sum_floor, likelihood_power,
        )  # fmt: skip
        self.inputs = Inputs(
            _ptr(self.child_poses), _ptr(transforms.tiled), _ptr(self.offset),
            _ptr(self.activations_in), _ptr(self.beta_u), _ptr(self.beta_a),
            _ptr(self.child_index), _ptr(self.parent_count),
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(N, L, S, 16, J, q)."""
        tiled = self.transforms.tiled
        return (*self.child_poses.shape, tiled.shape[1], tiled.shape[2])


def votes(
    child_poses: torch.Tensor, tiled: torch.Tensor, offset: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """child_poses (N, L, S, 16), tiled (S, J, q, 16), offset (S, 16) or None ->
    votes (N, L, J, S, 16) and their unweighted mean per parent (N, L, J, 1, 16).

    route_forward and route_backward compute the votes themselves; this entry point is for the
    tests of the vote math. The votes live in the per-thread workspace: they are valid until the
    next kernel call in the same thread."""
    n, l, s, h = child_poses.shape
    j, q = tiled.shape[1], tiled.shape[2]
    poses = child_poses.contiguous()
    offset = None if offset is None else offset.to(poses.dtype).contiguous()
    out = _workspace(n * l * j * s * h, poses).view(n, l, j, s, h)
    shift = poses.new_empty(n, l, j, 1, h)
    problem = Problem(N=n, L=l, S=s, J=j, Q=q)
    inputs = Inputs(poses=_ptr(poses), tiled=_ptr(tiled), offset=_ptr(offset))
    _function("votes", poses.dtype)(problem, inputs, _ptr(out), _ptr(shift))
    return out, shift


def exp_lanes(x: torch.Tensor) -> torch.Tensor:
    """The kernels' vectorised exp (used in the E-step's normalisation), for the tests:
    x (n,) with n a multiple of 16."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _function("exp_lanes", x.dtype)(_ptr(x), x.numel(), _ptr(out))
    return out


def route_forward(
    problem: RoutingProblem, keep_tape: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Votes and the whole of Procedure 1 for a chunk of images in one call (the math of
    routing.routing_iterations; see route_forward in the C file).

    Returns poses (N, L, J, 16), activation logits (N, L, J) and, if `keep_tape`, what
    route_backward needs from the forward pass.
    """
    n, l, s, h, j, _ = problem.shape
    poses = problem.child_poses
    children = max(problem.num_children, 1)
    out_poses, out_logit = poses.new_empty(n, l, j, h), poses.new_empty(n, l, j)
    buffers = {
        "votes": _workspace(n * l * j * s * h, poses),
        "shift": poses.new_empty(n, l, j, 1, h),
        "assignments": poses.new_empty(n, l, j, s),
        "variance": poses.new_empty(n, l, j, h),
        "log_sigmas": poses.new_empty(n, l, j),
        "slot_a": poses.new_empty(n, l, s),
        "slot_b": poses.new_empty(n, l, s),
        "child_a": poses.new_empty(n, children),
        "child_b": poses.new_empty(n, children),
        "poses_out": out_poses,
        "logit_out": out_logit,
    }
    iters = len(problem.lambdas)
    tape = tape_ptrs = None
    if keep_tape:  # Σ w x and Σ w x² per iteration, E-step forms and assignments but the last
        tape = [poses.new_empty(n, l, j, h) for _ in range(2 * iters)]
        tape += [poses.new_empty(n, l, j, s) for _ in range(2 * iters - 2)]
        tape_ptrs = _pointers(tape)
    fields = ForwardBuffers(**{k: _ptr(v) for k, v in buffers.items()}, tape=tape_ptrs)
    _function("route_forward", poses.dtype)(problem.problem, problem.inputs, fields)
    return out_poses, out_logit, tape


def route_backward(
    problem: RoutingProblem,
    tape: list[torch.Tensor],
    grad_poses: torch.Tensor | None,
    grad_logit: torch.Tensor | None,
    need_offset: bool,
):
    """Gradients of route_forward from its tape, for one chunk: (poses (N, L, S, 16),
    transforms (S, J, q, q), activations_in (N, L, S), β_u (J,), β_a (J,), offset (S, 16) or
    None). The votes are recomputed; their gradient is formed vote by vote, never stored."""
    n, l, s, h, j, q = problem.shape
    poses, dtype = problem.child_poses, problem.child_poses.dtype
    records = 2 * len(problem.lambdas) - 1
    threads = torch.get_num_threads()
    out = {  # what the caller sums or returns
        "grad_a": poses.new_empty(n, l, s),
        "grad_bu": poses.new_empty(n * l, j),
        "grad_ba": poses.new_empty(n * l, j),
        "grad_poses": poses.new_empty(n, l, s, h),
        "grad_w_threads": poses.new_zeros(threads, s, j, q, q),  # one copy per thread
        "grad_off_threads": poses.new_zeros(threads, s, h) if need_offset else None,
    }
    work = {
        "g_poses": None if grad_poses is None else grad_poses.to(dtype).contiguous(),
        "g_logit": None if grad_logit is None else grad_logit.to(dtype).contiguous(),
        "votes": _workspace(n * l * j * s * h, poses),
        "shift": poses.new_empty(n, l, j, 1, h),
        "rowbuf": poses.new_empty(n * l * j, 2 * h + 1),
        "grad_assign": poses.new_empty(n, l, j, s),
        "slot": poses.new_empty(n, l, s),
        "child": poses.new_empty(n, max(problem.num_children, 1)),
        "vcoef": poses.new_empty(n, l, j, records, h),
        "constant": poses.new_empty(n, l, j, records, h),
        "wmat": problem.transforms.columns,
        "gp_threads": poses.new_empty(threads, s, h),
    }
    coefs = [poses.new_empty(n, l, j, s) for _ in range(records)]
    tape_ptrs, coef_ptrs = _pointers(tape), _pointers(coefs)
    fields = BackwardBuffers(
        **{k: _ptr(v) for k, v in {**out, **work}.items()},
        tape=tape_ptrs, coefs=coef_ptrs, threads=threads,
    )  # fmt: skip
    _function("route_backward", dtype)(problem.problem, problem.inputs, fields)
    grad_off = out["grad_off_threads"]
    return (
        out["grad_poses"],
        out["grad_w_threads"].sum(0),
        out["grad_a"],
        out["grad_bu"].sum(0),
        out["grad_ba"].sum(0),
        None if grad_off is None else grad_off.sum(0),
    )

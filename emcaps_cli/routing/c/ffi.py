"""C kernels for EM routing on the CPU (source: kernels.c, beside this file).

`route_forward` computes a chunk's votes straight into the routing layout and runs every
iteration of Procedure 1 on them, reading each vote once per pass (v² formed on the fly) while
the chunk's votes sit in cache; `route_backward` is its hand-written backward, down to the
gradients of the poses and W, with the vote gradient never stored. The PyTorch path
(`capsules.em.VoteOps`) makes one pass over memory per vote-sized operation and keeps v² next to v.

The source is compiled on first use with the system C compiler (`$CC`, else `cc`) at
`-O3 -march=native -fopenmp` and cached under `$EMCAPS_KERNEL_CACHE` (default
`~/.cache/emcaps/kernels`), keyed by the source, compiler, flags and CPU, and called through
ctypes. The kernels split their loops with OpenMP; they bind to the OpenMP runtime PyTorch has
already loaded, so they run on PyTorch's threads (`torch.set_num_threads`).

Which path runs is `backend()`: "auto" (the default; the C kernels for float32/float64 CPU
tensors when they build, with a one-line warning on stderr when they do not; the Triton
kernels on CUDA), "c" (the C kernels or an error), "torch" (the PyTorch path everywhere) or
"triton" (the Triton kernels, routing/triton_kernels.py, or an error). `fused.implementation`
makes the choice. Set it with `set_backend`, the `--kernels` option or `EMCAPS_KERNELS`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from emcaps_cli.capsules.votes import POSE_SIZE

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
BACKENDS = ("auto", "c", "torch", "triton")

_backend = os.environ.get("EMCAPS_KERNELS", "auto")
_library: ctypes.CDLL | None = None
_failure: str | None = None
_warned = False
_local = threading.local()  # per-thread vote workspace (see _workspace)


class KernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded (the message says why)."""


def set_backend(name: str) -> None:
    """Choose "auto", "c", "torch" or "triton" for the routing's vote-sized work (see the
    module doc)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name


def backend() -> str:
    if _backend not in BACKENDS:
        raise ValueError(f"EMCAPS_KERNELS must be one of {', '.join(BACKENDS)}, got {_backend!r}")
    return _backend


def use_c_kernels(like: torch.Tensor) -> bool:
    """Whether routing on tensors like `like` runs on the C kernels."""
    choice = backend()
    if choice in ("torch", "triton") or like.device.type != "cpu":
        return False
    if like.dtype not in (torch.float32, torch.float64):
        if choice == "c":
            raise KernelsUnavailable(f"the C kernels take float32 or float64, not {like.dtype}")
        return False
    return _loads(choice == "c")


@torch.compiler.disable  # file system and ctypes: not for torch.compile to trace
def _loads(required: bool) -> bool:
    try:
        library()
    except KernelsUnavailable as err:
        if required:
            raise
        _warn_once(f"emcaps: using the slower PyTorch routing kernels ({err})")
        return False
    return True


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        print(message, file=sys.stderr)
        _warned = True


def _cache_dir() -> Path:
    if os.environ.get("EMCAPS_KERNEL_CACHE"):
        return Path(os.environ["EMCAPS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emcaps" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (a shared cache must not hand a
    library built for one CPU to another)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, str(SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["no output"]
            first = next((ln for ln in lines if "error" in ln), lines[0])
            raise KernelsUnavailable(f"{compiler} failed to build {SOURCE.name}: {first}")
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL:
    """The compiled kernels, built on first use; raises KernelsUnavailable with the reason."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise KernelsUnavailable(_failure)
    try:
        _library = _load()
    except KernelsUnavailable as err:
        _failure = str(err)
        raise
    return _library


def _load() -> ctypes.CDLL:
    if platform.system() == "Windows":
        raise KernelsUnavailable("the C kernels are built with a Unix C compiler")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KernelsUnavailable(f"no C compiler found ({os.environ.get('CC', 'cc')})")
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update((platform.machine() + _cpu_signature()).encode())
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except OSError as err:  # an unwritable cache directory, say
            raise KernelsUnavailable(f"could not build into {target.parent}: {err}") from err
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise KernelsUnavailable(f"could not load {target}: {err}") from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    problem = [ptr] * 7 + [i64] + [ptr] * 2 + [i64] * 6 + [ctypes.c_double] * 3  # arguments()
    for suffix in ("f32", "f64"):
        getattr(lib, f"votes_{suffix}").argtypes = [ptr] * 3 + [i64] * 5 + [ptr] * 2
        getattr(lib, f"route_forward_{suffix}").argtypes = problem + [ptr] * 12
        getattr(lib, f"route_backward_{suffix}").argtypes = problem + [ptr] * 16 + [i64] + [ptr] * 4
        getattr(lib, f"exp_lanes_{suffix}").argtypes = [ptr, i64, ptr]
    return lib


def _function(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


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
    one buffer serves them all; a fresh 64 MB tensor per chunk cost more in first-touch page faults
    (~65 ms each, measured) than computing the votes (~3 ms)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buffers.pop(like.dtype, None)
        with torch.inference_mode(False):  # kept for later calls outside inference mode too
            buf = buffers[like.dtype] = like.new_empty(numel)
    return buf[:numel]


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
    _function("votes", poses.dtype)(
        _ptr(poses), _ptr(tiled), _ptr(offset), s, j, q, 0, n * l, _ptr(out), _ptr(shift)
    )
    return out, shift


@dataclass
class RoutingProblem:
    """One chunk's routing inputs, as both C calls take them (the same first 18 arguments).

    child_poses (N, L, S, 16), W as PreparedTransforms, offset (S, 16) or None,
    activations_in (N, L, S), β (J,), lambdas one inverse temperature per iteration,
    child_index and parent_count (L*S,) for exact routing or None, the two numeric floors.
    """

    child_poses: torch.Tensor
    transforms: PreparedTransforms
    offset: torch.Tensor | None
    activations_in: torch.Tensor
    beta_u: torch.Tensor
    beta_a: torch.Tensor
    lambdas: list[float]
    child_index: torch.Tensor | None
    parent_count: torch.Tensor | None
    num_children: int
    var_floor: float
    sum_floor: float
    likelihood_power: float = 1.0

    def __post_init__(self) -> None:
        dtype = self.child_poses.dtype
        self.child_poses = self.child_poses.contiguous()
        if self.offset is not None:
            self.offset = self.offset.to(dtype).contiguous()
        self.activations_in = self.activations_in.to(dtype).contiguous()
        self.beta_u = self.beta_u.to(dtype).contiguous()
        self.beta_a = self.beta_a.to(dtype).contiguous()
        if self.child_index is not None:
            self.child_index = self.child_index.to(torch.int64).contiguous()
            self.parent_count = self.parent_count.to(dtype).contiguous()

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(N, L, S, 16, J, q)."""
        tiled = self.transforms.tiled
        return (*self.child_poses.shape, tiled.shape[1], tiled.shape[2])

    def arguments(self) -> tuple:
        n, l, s, _, j, q = self.shape
        iters = len(self.lambdas)
        return (
            _ptr(self.child_poses), _ptr(self.transforms.tiled), _ptr(self.offset),
            _ptr(self.activations_in), _ptr(self.beta_u), _ptr(self.beta_a),
            (ctypes.c_double * iters)(*self.lambdas), iters,
            _ptr(self.child_index), _ptr(self.parent_count), self.num_children,
            n, l, s, j, q, self.var_floor, self.sum_floor, self.likelihood_power,
        )  # fmt: skip


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
    votes = _workspace(n * l * j * s * h, poses)
    shift = poses.new_empty(n, l, j, 1, h)
    assignments = poses.new_empty(n, l, j, s)
    variance, log_sigmas = poses.new_empty(n, l, j, h), poses.new_empty(n, l, j)
    slot_a, slot_b = poses.new_empty(n, l, s), poses.new_empty(n, l, s)
    child_a, child_b = poses.new_empty(n, children), poses.new_empty(n, children)
    out_poses, out_logit = poses.new_empty(n, l, j, h), poses.new_empty(n, l, j)
    iters = len(problem.lambdas)
    tape = None
    if keep_tape:  # Σ w x and Σ w x² per iteration, E-step forms and assignments but the last
        tape = [poses.new_empty(n, l, j, h) for _ in range(2 * iters)]
        tape += [poses.new_empty(n, l, j, s) for _ in range(2 * iters - 2)]
    tape_ptrs = None if tape is None else (ctypes.c_void_p * len(tape))(*[_ptr(t) for t in tape])
    _function("route_forward", poses.dtype)(
        *problem.arguments(),
        _ptr(votes), _ptr(shift), _ptr(assignments), _ptr(variance), _ptr(log_sigmas),
        _ptr(slot_a),
        _ptr(slot_b), _ptr(child_a), _ptr(child_b), _ptr(out_poses), _ptr(out_logit), tape_ptrs,
    )  # fmt: skip
    return out_poses, out_logit, tape


def exp_lanes(x: torch.Tensor) -> torch.Tensor:
    """The kernels' vectorised exp (used in the E-step's normalisation), for the tests:
    x (n,) with n a multiple of 16."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _function("exp_lanes", x.dtype)(_ptr(x), x.numel(), _ptr(out))
    return out


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
    num_children = problem.num_children
    g_poses = None if grad_poses is None else grad_poses.to(dtype).contiguous()
    g_logit = None if grad_logit is None else grad_logit.to(dtype).contiguous()
    iters = len(problem.lambdas)
    records = 2 * iters - 1
    threads = torch.get_num_threads()
    votes = _workspace(n * l * j * s * h, poses)
    shift = poses.new_empty(n, l, j, 1, h)
    rowbuf = poses.new_empty(n * l * j, 2 * h + 1)
    grad_assign = poses.new_empty(n, l, j, s)
    slot = poses.new_empty(n, l, s)
    child = poses.new_empty(n, max(num_children, 1))
    coefs = [poses.new_empty(n, l, j, s) for _ in range(records)]
    v_coefs = poses.new_empty(n, l, j, records, h)
    constants = poses.new_empty(n, l, j, records, h)
    grad_a = poses.new_empty(n, l, s)
    grad_bu_rows, grad_ba_rows = poses.new_empty(n * l, j), poses.new_empty(n * l, j)
    grad_child = poses.new_empty(n, l, s, h)
    grad_w = poses.new_zeros(threads, s, j, q, q)  # one copy per thread, summed below
    grad_off = poses.new_zeros(threads, s, h) if need_offset else None
    gp_work = poses.new_empty(threads, s, h)
    tape_ptrs = (ctypes.c_void_p * len(tape))(*[_ptr(t) for t in tape])
    coef_ptrs = (ctypes.c_void_p * records)(*[_ptr(c) for c in coefs])
    _function("route_backward", dtype)(
        *problem.arguments(),
        tape_ptrs, _ptr(g_poses), _ptr(g_logit), _ptr(votes), _ptr(shift), _ptr(rowbuf),
        _ptr(grad_assign), _ptr(slot), _ptr(child), coef_ptrs, _ptr(v_coefs), _ptr(constants),
        _ptr(grad_a), _ptr(grad_bu_rows), _ptr(grad_ba_rows), _ptr(problem.transforms.columns),
        threads, _ptr(grad_child), _ptr(grad_w), _ptr(grad_off), _ptr(gp_work),
    )  # fmt: skip
    return (
        grad_child,
        grad_w.sum(0),
        grad_a,
        grad_bu_rows.sum(0),
        grad_ba_rows.sum(0),
        None if grad_off is None else grad_off.sum(0),
    )

"""The routing on the Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1).

One kernel launch per routing iteration forward and backward, the votes recomputed in every
pass over a problem's slots and their gradient never stored (triton_kernels.py). Triton itself
is imported only when these kernels run, so the package imports without it.
"""

from __future__ import annotations

import os

import torch

from emcaps_cli.capsules.em import SUM_FLOOR, inverse_temperatures
from emcaps_cli.routing.backend import Chunk, ChunkGradients


class TritonBackend:
    """Votes and routing as Triton kernels: nothing vote-sized is stored, so the whole batch is
    routed at once."""

    name = "triton"

    def chunk_budget(self) -> int:
        return 0

    def prepare(self, transforms: torch.Tensor) -> torch.Tensor:
        return transforms.contiguous()

    def forward(self, chunk: Chunk, tape: list[torch.Tensor] | None):
        """Every iteration of Procedure 1 for the chunk, one kernel launch each."""
        from emcaps_cli.routing import triton_kernels

        poses, logit, taped = triton_kernels.route_forward(_problem(chunk), tape is not None)
        if tape is not None:
            tape.extend(taped)
        return poses, logit

    def backward(
        self, chunk: Chunk, tape, transforms, grad_poses, grad_logit, need_offset
    ) -> ChunkGradients:
        """The same gradients as TorchBackend.backward, from the kernels' hand-written backward."""
        from emcaps_cli.routing import triton_kernels

        problem = _problem(chunk)
        return triton_kernels.route_backward(problem, tape, grad_poses, grad_logit, need_offset)


def _problem(chunk: Chunk):
    """The chunk as triton_kernels.RoutingProblem (R_0 and the child table made here)."""
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


# The oldest NVIDIA GPUs the Triton kernels run on, as CUDA compute capability (major, minor):
# Triton's compiler generates code for Volta (sm_70) and newer only, and PyTorch refuses older
# GPUs for its own Triton code for the same reason. The kernels ask nothing more of the GPU:
# float32 arithmetic, reductions and float32 atomic adds; no tl.dot (tensor cores), no bf16.
MIN_CAPABILITY = (7, 0)

_gpu_reasons: dict[int, str | None] = {}  # `gpu_unsupported`'s answer per GPU index


@torch.compiler.disable
def triton_unavailable(like: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot route tensors like `like`, or None when they can."""
    if like.device.type != "cuda" and not interpreting():
        return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), not {like.device}"
    if like.dtype not in (torch.float32, torch.float64):
        return f"the Triton kernels take float32 or float64, not {like.dtype}"
    if like.device.type == "cuda":
        return gpu_unsupported(like.device)
    return _import_error()


def gpu_unsupported(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on the CUDA GPU `device`, or None when they can:
    a compute capability below MIN_CAPABILITY (NVIDIA only), Triton missing, or Triton's
    driver failing to start (it builds its launcher with the system C compiler). Asked of each
    GPU once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_reasons:
        _gpu_reasons[index] = _capability_error(index) or _import_error() or _driver_error()
    return _gpu_reasons[index]


def _capability_error(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if torch.version.hip is not None or (major, minor) >= MIN_CAPABILITY:
        return None  # ROCm's capabilities name AMD architectures, not NVIDIA's
    need = ".".join(map(str, MIN_CAPABILITY))
    return (
        f"{torch.cuda.get_device_name(index)} has CUDA compute capability {major}.{minor}; "
        f"Triton compiles for {need} and newer"
    )


def _import_error() -> str | None:
    try:
        from emcaps_cli.routing import triton_kernels  # noqa: F401
    except ImportError as err:
        return f"Triton is not importable: {err}"
    return None


def _driver_error() -> str | None:
    import triton

    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as err:  # whatever stops Triton's driver stops its kernels
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"Triton cannot start on this GPU: {first}"
    return None


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON = TritonBackend()

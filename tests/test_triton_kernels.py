"""The Triton routing kernels equal plain autograd through Procedure 1: values and every gradient.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest.py before Triton is imported); with one, on CUDA tensors as compiled kernels. The
interpreter is slow, so the problems are small: 2 images, a 4x4 grid of 1 child type (3x3
kernel: 4 parent positions of 9 slots), 3 parent types.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # else conftest.py has set TRITON_INTERPRET=1

try:
    import triton
except ImportError as err:  # the dev extra installs it
    pytest.skip(f"triton is not importable ({err})", allow_module_level=True)

from emcaps_cli.capsules.geometry import conv_child_map  # noqa: E402
from emcaps_cli.capsules.layers import ClassCaps  # noqa: E402
from emcaps_cli.routing import active_backend_name, select, triton_kernels  # noqa: E402
from emcaps_cli.routing import backend as routing_backend  # noqa: E402
from emcaps_cli.routing.backend import KernelsUnavailable  # noqa: E402
from emcaps_cli.routing.fused import RoutingSpec, plain_route, route  # noqa: E402
from emcaps_cli.routing.triton_backend import triton_unavailable  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
D = torch.float64
# Triton's own library functions (tl.zeros, tl.sum, ...) as well as ours must have been defined
# in interpreter mode: Triton reads TRITON_INTERPRET once, when it is first imported.
INTERPRETED = all(
    type(f).__name__ == "InterpretedFunction"
    for f in (triton_kernels._forward_step, triton.language.standard.zeros)
)

if not ON_GPU and not INTERPRETED:
    pytest.skip(
        "no GPU, and Triton was imported before TRITON_INTERPRET=1 was set (conftest.py sets it)",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def triton_backend():
    before = routing_backend.backend()
    routing_backend.set_backend("triton")
    yield
    routing_backend.set_backend(before)


def conv_problem(pose, exact, offset, iters, images=2, seed=0, dtype=D, power=1.0):
    """Routing inputs of a 3x3 conv capsule layer on a 4x4 grid of 1 child type."""
    g = torch.Generator().manual_seed(seed)
    rows, q = (4, 4) if pose == "matrix" else (1, 16)
    side, k, b, j = 4, 3, 1, 3
    positions, slots = (side - k + 1) ** 2, k * k * b
    child_map = conv_child_map(side, side, k, 1, b).to(DEVICE) if exact else None
    tensors = [
        torch.randn(images, positions, slots, 16, generator=g),  # child poses
        torch.randn(slots, j, q, q, generator=g) / q**0.5,  # W
        torch.rand(images, positions, slots, generator=g),  # activations in
        torch.randn(j, generator=g) * 0.3,  # β_u
        torch.randn(j, generator=g) * 0.3,  # β_a
    ]
    vote_offset = torch.randn(slots, 16, generator=g) if offset else None
    tensors = [t.to(DEVICE, dtype) for t in tensors]
    vote_offset = None if vote_offset is None else vote_offset.to(DEVICE, dtype)
    spec = RoutingSpec(iters, 0.5, child_map, rows, q, likelihood_power=power)
    return tensors, vote_offset, spec


def class_problem(pose, iters, images=2, seed=0, power=1.0):
    """Routing inputs of the class layer on a 2x2 grid of 2 child types, with Coordinate
    Addition (the vote offset), built by ClassCaps itself."""
    torch.manual_seed(seed)
    layer = ClassCaps(
        2, 3, iters=iters, pose=pose, coord_add=True, final_lambda=0.5, likelihood_power=power
    ).double()
    layer.coordinates = torch.rand(4, 2, dtype=D)
    poses = torch.randn(images, 2, 2, 2, 16, dtype=D)
    acts = torch.rand(images, 2, 2, 2, dtype=D)
    inputs = layer.routing_inputs(poses, acts)
    g = torch.Generator().manual_seed(seed + 1)
    beta = [torch.randn(3, generator=g, dtype=D) * 0.3 for _ in range(2)]
    tensors = [inputs.child_poses, inputs.transforms, inputs.activations_in, *beta]
    tensors = [t.detach().to(DEVICE) for t in tensors]
    return tensors, inputs.vote_offset.detach().to(DEVICE), inputs.spec


def weighted_loss(poses, acts, seed=9):
    """Every output pose entry and activation weighted by a fixed random number."""
    g = torch.Generator().manual_seed(seed)
    wp = torch.randn(poses.shape, generator=g, dtype=poses.dtype).to(poses.device)
    wa = torch.randn(acts.shape, generator=g, dtype=acts.dtype).to(acts.device)
    return (poses * wp).sum() + (acts * wa).sum()


def assert_triton_equals_plain(tensors, vote_offset, spec, tol):
    """route (on the Triton kernels) and plain_route: the same outputs and the gradients of
    weighted_loss for the poses, W, activations, β_u, β_a and the vote offset."""
    leaves = []
    for _ in range(2):
        copy = [t.clone().requires_grad_(True) for t in tensors]
        offset = None if vote_offset is None else vote_offset.clone().requires_grad_(True)
        leaves.append((copy, offset))
    (a, off_a), (b, off_b) = leaves
    assert select.resolve(a[0]).name == "triton"
    p1, a1 = route(*a, spec, off_a)
    p2, a2 = plain_route(*b, spec, off_b)
    torch.testing.assert_close(p1, p2, **tol["values"])
    torch.testing.assert_close(a1, a2, **tol["values"])
    weighted_loss(p1, a1).backward()
    weighted_loss(p2, a2).backward()
    for x, y in zip(a + [off_a], b + [off_b], strict=True):
        if x is not None:
            assert x.grad is not None and torch.isfinite(x.grad).all()
            torch.testing.assert_close(x.grad, y.grad, **tol["grads"])


F64 = {"values": dict(atol=1e-10, rtol=0), "grads": dict(atol=1e-9, rtol=1e-7)}


def test_the_interpreter_runs_a_kernel_on_this_torch():
    import triton.language as tl

    @triton.jit
    def add(x, y, out, n, BLOCK: tl.constexpr):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + at, tl.load(x + at, mask=at < n) + tl.load(y + at, mask=at < n), mask=at < n)

    x, y = torch.randn(50, device=DEVICE), torch.randn(50, device=DEVICE)
    out = torch.empty_like(x)
    add[(4,)](x, y, out, 50, BLOCK=16)
    torch.testing.assert_close(out, x + y, atol=0, rtol=0)


@pytest.mark.parametrize(
    "pose, exact, offset, iters",
    [
        pytest.param("matrix", True, False, 3, marks=pytest.mark.slow),
        ("matrix", True, True, 1),
        pytest.param("vector", True, True, 2, marks=pytest.mark.slow),
        pytest.param("matrix", False, True, 3, marks=pytest.mark.slow),
        ("vector", False, False, 1),
    ],
)
def test_conv_routing_equals_plain_autograd(pose, exact, offset, iters):
    """Exact receptive-field routing (children shared across positions) and per-patch routing,
    matrix and vector poses, with and without a vote offset, 1 to 3 iterations."""
    assert_triton_equals_plain(*conv_problem(pose, exact, offset, iters), F64)


@pytest.mark.parametrize("pose, iters", [("matrix", 3), ("vector", 2)])
def test_class_layer_with_coordinate_addition_equals_plain_autograd(pose, iters):
    assert_triton_equals_plain(*class_problem(pose, iters), F64)


@pytest.mark.slow
def test_tempered_e_step_equals_plain_autograd():
    """R ∝ a p^τ with τ = 0.1 (the model's default likelihood power), exact conv routing and the
    class layer."""
    assert_triton_equals_plain(*conv_problem("matrix", True, True, 3, seed=2, power=0.1), F64)
    assert_triton_equals_plain(*class_problem("matrix", 2, seed=2, power=0.1), F64)


@pytest.mark.slow
def test_slots_in_several_tiles_with_a_partial_last_one(monkeypatch):
    """9 slots in tiles of 4: the per-problem sums run over 3 tiles, the last one masked; and 4
    programs share 3 copies of dL/dW."""
    monkeypatch.setattr(triton_kernels, "BLOCK_S", 4)
    monkeypatch.setattr(triton_kernels, "GRADIENT_COPIES", 3)
    assert_triton_equals_plain(*conv_problem("matrix", True, True, 2, images=1, seed=3), F64)


@pytest.mark.slow
def test_batch_routed_in_chunks_and_backward_twice_with_a_retained_graph():
    """Chunks of one image give the whole batch's results, and the tape the backward reads
    survives a first backward pass."""
    tensors, offset, spec = conv_problem("matrix", True, True, 2, seed=5)
    whole = [t.clone().requires_grad_(True) for t in tensors]
    chunked = [t.clone().requires_grad_(True) for t in tensors]
    per_image = 4 * 9 * 3 * 16  # positions x slots x parent types x pose entries
    one_at_a_time = dataclasses.replace(spec, chunk_elements=per_image)
    first = route(*whole, spec, offset)
    second = route(*chunked, one_at_a_time, offset)
    for x, y in zip(first, second, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
    loss = weighted_loss(*first)
    once = torch.autograd.grad(loss, whole, retain_graph=True)
    twice = torch.autograd.grad(loss, whole)
    by_chunks = torch.autograd.grad(weighted_loss(*second), chunked)
    for a, b, c in zip(once, twice, by_chunks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-11, rtol=1e-9)


@pytest.mark.slow
def test_float32_and_bf16_autocast_keep_routing_in_float32():
    """float32 is what runs on the GPU; under bf16 autocast (`--amp`) route casts up and the
    kernels still compute in float32."""
    tensors, offset, spec = conv_problem("matrix", True, True, 3, dtype=torch.float32)
    tol = {"values": dict(atol=2e-5, rtol=1e-5), "grads": dict(atol=2e-4, rtol=1e-4)}
    assert_triton_equals_plain(tensors, offset, spec, tol)
    poses, acts = route(*tensors, spec, offset)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        poses_amp, acts_amp = route(*[t.bfloat16() for t in tensors], spec, offset.bfloat16())
    assert poses_amp.dtype == acts_amp.dtype == torch.float32
    expected, _ = route(*[t.bfloat16().float() for t in tensors], spec, offset.bfloat16().float())
    torch.testing.assert_close(poses_amp, expected, atol=1e-6, rtol=0)
    assert not torch.equal(poses_amp, poses)  # the inputs were rounded to bf16, not the routing


def test_child_table_lists_every_parent_slot_of_each_child():
    child_map = conv_child_map(5, 5, 3, 1, 2)  # 3x3 positions: the centre child has 9 parents
    table = triton_kernels.child_table(child_map.index, child_map.num_children)
    assert table.shape == (child_map.num_children, 16)  # padded to a power of two
    for child in range(child_map.num_children):
        listed = sorted(int(x) for x in table[child] if x >= 0)
        assert listed == torch.nonzero(child_map.index == child).flatten().tolist()


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_unavailable(torch.zeros(1))
    assert reason is not None and "CUDA" in reason
    with pytest.raises(KernelsUnavailable, match="--kernels triton: .*CUDA"):
        select.resolve(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "float32 or float64" in triton_unavailable(torch.zeros(1).bfloat16())


def test_auto_takes_triton_on_cuda_and_warns_once_when_it_cannot(monkeypatch):
    cuda_like = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    routing_backend.set_backend("auto")
    if not ON_GPU:
        monkeypatch.setattr(select, "triton_unavailable", lambda like: None)
    assert select.resolve(cuda_like).name == "triton"
    monkeypatch.setattr(select, "triton_unavailable", lambda like: "no triton here")
    monkeypatch.setattr(select, "_warned", set())
    with pytest.warns(UserWarning, match=r"slower PyTorch ops \(no triton here\)") as record:
        assert select.resolve(cuda_like).name == "torch"
        assert select.resolve(cuda_like).name == "torch"
    assert len(record) == 1
    assert select.resolve(torch.zeros(1)).name != "triton"


def test_kernels_option_takes_triton_and_refuses_it_without_a_gpu(monkeypatch):
    typer = pytest.importorskip("typer")  # the GPU check may run without the CLI's packages

    from emcaps_cli.cli._common import use_kernels
    from emcaps_cli.errors import EmcapsError

    use_kernels("triton")  # the interpreter (or a GPU) is here
    assert routing_backend.backend() == "triton" and active_backend_name(DEVICE) == "triton"
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(EmcapsError, match="--kernels triton: .*need a CUDA GPU"):
            use_kernels("triton")
    with pytest.raises(typer.BadParameter, match="auto, c, torch, triton"):
        use_kernels("cuda")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic
@pytest.mark.parametrize("where", ["poses", "activations"])
def test_a_nan_input_reaches_both_outputs_of_its_image_only(where):
    """No max or clamp in the kernels may turn a NaN into a finite number (training's NaN
    guard relies on NaN reaching the loss)."""
    tensors, offset, spec = conv_problem("matrix", True, True, 2)
    tensors = [t.clone() for t in tensors]
    if where == "poses":
        tensors[0][0, 0, 0, 5] = float("nan")
    else:
        tensors[2][0, 0, 0] = float("nan")
    poses, acts = route(*tensors, spec, offset)
    assert torch.isnan(poses[0]).any() and torch.isnan(acts[0]).any()
    assert torch.isfinite(poses[1]).all() and torch.isfinite(acts[1]).all()


@pytest.mark.skipif(not ON_GPU, reason="about a minute in the interpreter: run on a GPU")
def test_paper_shaped_network_on_triton_equals_the_pytorch_path():
    """The whole network (tiny widths, stride-2 exact routing with children no parent holds,
    the class layer): outputs and every parameter gradient, Triton against PyTorch ops."""
    from emcaps_cli.config import ModelConfig, parse_arch
    from emcaps_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=parse_arch("8,4,4,4"))).to(DEVICE)
    x = torch.randn(4, 2, 32, 32, device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        routing_backend.set_backend(backend)
        model.zero_grad()
        out = model(x)
        (out * torch.arange(5, device=DEVICE)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_kernels_compile_for_a_hopper_gpu_without_spilling_registers():
    """The interpreter never compiles: this runs Triton's compiler and ptxas for sm_90 on the
    paper's conv-capsule shape (matrix poses, J = 32 parents of S = 288 slots), no GPU needed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton ships no ptxas ({ptxas})")
    script = Path(__file__).with_name("helpers_triton_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(script), "4", "288", "32"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {row["kernel"] for row in rows} == {"_forward_step", "_backward_step"}
    for row in rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0, row

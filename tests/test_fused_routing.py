"""The memory-lean fused votes + routing function equals plain autograd through Procedure 1."""

import ctypes
import dataclasses
import platform
import subprocess

import pytest
import torch

from emcaps_cli.capsules.geometry import conv_child_map
from emcaps_cli.routing import active_backend_name
from emcaps_cli.routing import backend as routing_backend
from emcaps_cli.routing.backend import KernelsUnavailable
from emcaps_cli.routing.c import build, ffi
from emcaps_cli.routing.fused import RoutingSpec, plain_route, route

D = torch.float64


def problem(pose, exact, offset, seed=0, images=2, chunk_elements=None):
    g = torch.Generator().manual_seed(seed)
    rows, q = (4, 4) if pose == "matrix" else (1, 16)
    side, k, b, j = 4, 3, 2, 3
    n_pos, s = (side - k + 1) ** 2, k * k * b
    child_map = conv_child_map(side, side, k, 1, b) if exact else None
    poses = torch.randn(images, n_pos, s, 16, generator=g, dtype=D)
    transforms = torch.randn(s, j, q, q, generator=g, dtype=D) / q**0.5
    acts = torch.rand(images, n_pos, s, generator=g, dtype=D)
    beta_u = torch.randn(j, generator=g, dtype=D) * 0.3
    beta_a = torch.randn(j, generator=g, dtype=D) * 0.3
    vote_offset = torch.randn(s, 16, generator=g, dtype=D) if offset else None
    spec = RoutingSpec(3, 0.5, child_map, rows, q, chunk_elements)
    return (poses, transforms, acts, beta_u, beta_a), vote_offset, spec


def assert_route_equals_plain(inputs, spec, vote_offset, loss):
    """route and plain_route give the same poses, activations and gradients of `loss`."""
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.clone().requires_grad_(True) for t in inputs]
    p1, a1 = route(*a, spec, vote_offset)
    p2, a2 = plain_route(*b, spec, vote_offset)
    torch.testing.assert_close(p1, p2, atol=1e-10, rtol=0)
    torch.testing.assert_close(a1, a2, atol=1e-10, rtol=0)
    loss(p1, a1).backward()
    loss(p2, a2).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)


def random_weighted_loss(inputs, seed):
    """A loss that weights every output pose entry and activation by a fixed random number."""
    g = torch.Generator().manual_seed(seed)
    n, l, _, _ = inputs[0].shape
    j = inputs[1].shape[1]
    wp = torch.randn(n, l, j, 16, generator=g, dtype=D)
    wa = torch.randn(n, l, j, generator=g, dtype=D)
    return lambda p, a: (p * wp).sum() + (a * wa).sum()


@pytest.mark.parametrize("pose", ["matrix", "vector"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("chunk_images", [0, 1, 2])
def test_fused_equals_plain_autograd_values_and_gradients(
    pose, exact, offset, chunk_images, kernels
):
    """On the C kernels and on PyTorch ops; also when the batch of 3 is routed in chunks
    (1 image, or 2 then 1) instead of at once."""
    per_image = 4 * 18 * 3 * 16  # parent positions x slots x parent types x pose entries
    inputs, vote_offset, spec = problem(
        pose, exact, offset, images=3, chunk_elements=chunk_images * per_image
    )
    assert_route_equals_plain(inputs, spec, vote_offset, random_weighted_loss(inputs, 9))


@pytest.mark.parametrize("exact", [True, False])
def test_fused_equals_plain_autograd_with_a_large_variance_floor(exact, kernels):
    """The variance floor reaches both kernel paths: values and gradients still agree."""
    inputs, vote_offset, spec = problem("matrix", exact, True)
    spec = dataclasses.replace(spec, var_floor=0.5)
    assert_route_equals_plain(inputs, spec, vote_offset, random_weighted_loss(inputs, 4))
    high, _ = route(*inputs, spec, vote_offset)
    low, _ = route(*inputs, dataclasses.replace(spec, var_floor=0.01), vote_offset)
    assert not torch.allclose(high, low)  # the floor changes the routing


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("iters", [2, 3])
def test_fused_equals_plain_autograd_with_a_tempered_e_step(exact, iters, kernels):
    """The E-step's likelihood power τ reaches both kernel paths: values and gradients agree."""
    inputs, vote_offset, spec = problem("matrix", exact, True)
    spec = dataclasses.replace(spec, iters=iters, likelihood_power=0.3)
    assert_route_equals_plain(inputs, spec, vote_offset, random_weighted_loss(inputs, 5))
    tempered, _ = route(*inputs, spec, vote_offset)
    plain, _ = route(*inputs, dataclasses.replace(spec, likelihood_power=1.0), vote_offset)
    assert not torch.allclose(tempered, plain)  # τ changes the routing


@pytest.mark.slow
def test_fused_gradcheck_with_a_tempered_e_step(kernels):
    (poses, transforms, acts, beta_u, beta_a), offset, spec = problem("matrix", True, True)
    poses, acts = poses[:1], acts[:1]
    spec = RoutingSpec(3, 1.0, spec.child_map, 4, 4, likelihood_power=0.4)
    args = (poses, transforms, acts, beta_u, beta_a, offset)
    args = tuple(t.clone().requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(
        lambda p, w, a, bu, ba, o: route(p, w, a, bu, ba, spec, o), args, eps=1e-6, atol=1e-5
    )


@pytest.mark.slow
def test_fused_gradcheck(kernels):
    (poses, transforms, acts, beta_u, beta_a), _, _ = problem("matrix", True, False)
    poses, acts = poses[:1, :2], acts[:1, :2]  # one image, two parent positions
    spec = RoutingSpec(2, 1.0, None, 4, 4)
    args = tuple(t.clone().requires_grad_(True) for t in (poses, transforms, acts, beta_u, beta_a))
    assert torch.autograd.gradcheck(lambda *x: route(*x, spec), args, eps=1e-6, atol=1e-5)


@pytest.mark.slow
def test_fused_gradcheck_exact_routing_with_offset(kernels):
    (poses, transforms, acts, beta_u, beta_a), offset, spec = problem("matrix", True, True)
    poses, acts = poses[:1], acts[:1]  # one image, every parent position (children shared)
    spec = RoutingSpec(2, 1.0, spec.child_map, 4, 4)
    args = (poses, transforms, acts, beta_u, beta_a, offset)
    args = tuple(t.clone().requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(
        lambda p, w, a, bu, ba, o: route(p, w, a, bu, ba, spec, o), args, eps=1e-6, atol=1e-5
    )


def test_fused_gradient_when_only_activations_are_used(kernels):
    inputs, _, spec = problem("matrix", True, False)
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.clone().requires_grad_(True) for t in inputs]
    route(*a, spec)[1].sum().backward()
    plain_route(*b, spec)[1].sum().backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kernels", ["torch"], indirect=True)  # the C path records nothing
def test_backward_frees_its_recordings(kernels):
    """No reference cycle survives a backward pass (it once leaked ~80 MB per training step)."""
    import gc
    import weakref

    from emcaps_cli.routing import torch_backend

    alive = []
    original = torch_backend._RecordingVoteOps.__init__

    def tracking_init(self, *args):
        original(self, *args)
        alive.append(weakref.ref(self))

    torch_backend._RecordingVoteOps.__init__ = tracking_init
    try:
        inputs, _, spec = problem("matrix", True, False)
        args = [t.clone().requires_grad_(True) for t in inputs]
        poses, acts = route(*args, spec)
        (poses.sum() + acts.sum()).backward()
        del poses, acts
        gc.collect()
    finally:
        torch_backend._RecordingVoteOps.__init__ = original
    assert alive and all(ref() is None for ref in alive)


def test_chunks_respect_the_vote_budget_and_are_balanced():
    from emcaps_cli.routing.fused import _chunks

    poses = torch.zeros(32, 4, 18, 16)  # 4 positions x 18 slots, 3 parent types: 3,456 votes
    transforms = torch.zeros(18, 3, 4, 4)
    per_image = 4 * 18 * 3 * 16

    def sizes(budget):
        spec = RoutingSpec(3, 0.5, None, 4, 4, budget)
        return [s.stop - s.start for s in _chunks(poses, transforms, spec, 2**24)]

    assert sizes(0) == [32]
    assert sizes(25 * per_image) == [16, 16]
    assert sizes(per_image) == [1] * 32
    assert sizes(per_image // 2) == [1] * 32  # never less than one image
    assert sizes(10 * per_image) == [8, 8, 8, 8]


def test_routing_stays_float32_under_bf16_autocast(kernels):
    """`--amp` autocasts the network; the routing itself must not drop to bf16."""
    inputs, vote_offset, spec = problem("matrix", True, True)
    inputs = [t.float() for t in inputs]
    offset = vote_offset.float()
    poses, acts = route(*inputs, spec, offset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        poses_amp, acts_amp = route(*inputs, spec, offset)
        half_inputs = [t.bfloat16() for t in inputs]
        poses_half, _ = route(*half_inputs, spec, offset.bfloat16())
    assert poses_amp.dtype == acts_amp.dtype == torch.float32
    torch.testing.assert_close(poses_amp, poses, atol=1e-6, rtol=0)
    torch.testing.assert_close(acts_amp, acts, atol=1e-6, rtol=0)
    assert poses_half.dtype == torch.float32  # bf16 inputs are cast up, not routed in bf16


def test_backward_twice_with_retained_graph(kernels):
    """The forward results kept for the backward replay survive a first backward pass."""
    inputs, vote_offset, spec = problem("matrix", True, True)
    args = [t.clone().requires_grad_(True) for t in inputs]
    poses, acts = route(*args, spec, vote_offset)
    loss = poses.square().sum() + acts.sum()
    first = torch.autograd.grad(loss, args, retain_graph=True)
    second = torch.autograd.grad(loss, args)
    for x, y in zip(first, second, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny_network():
    """The paper-shaped network (tiny widths) in float64 and a batch of 3 for it."""
    from emcaps_cli.config import ModelConfig, parse_arch
    from emcaps_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=parse_arch("8,4,4,4"))).double()
    return model, torch.randn(3, 2, 32, 32, dtype=D)


def outputs_and_gradients(model, x):
    """The network's outputs and every parameter's gradient of a fixed weighting of them."""
    model.zero_grad()
    out = model(x)
    (out * torch.arange(5, dtype=D)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_whole_network_equals_plain_autograd_routing(kernels, tiny_network, monkeypatch):
    """Every layer's routing on the backend under test against plain autograd through every
    op (plain_route, the same math stored step by step): outputs and every gradient."""
    from emcaps_cli.capsules import layers

    model, x = tiny_network
    assert active_backend_name() == kernels  # the fast path under test is the one that runs
    o1, g1 = outputs_and_gradients(model, x)
    monkeypatch.setattr(layers, "route", plain_route)
    o2, g2 = outputs_and_gradients(model, x)
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.fixture
def c_kernels():
    """Skips the test where the C kernels do not build (no C compiler)."""
    try:
        ffi.library()
    except KernelsUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("offset", [True, False])
def test_c_forward_in_float32_agrees_with_the_pytorch_path(exact, offset, c_kernels):
    """float32 runs the C kernels' own vectorised exp; float64 tests above pin the math."""
    inputs, vote_offset, spec = problem("matrix", exact, offset, images=3)
    inputs = [t.float() for t in inputs]
    vote_offset = None if vote_offset is None else vote_offset.float()
    results = []
    before = routing_backend.backend()
    try:
        for backend in ("torch", "c"):
            routing_backend.set_backend(backend)
            assert active_backend_name() == backend
            results.append(route(*inputs, spec, vote_offset))
    finally:
        routing_backend.set_backend(before)
    (p1, a1), (p2, a2) = results
    torch.testing.assert_close(p2, p1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a2, a1, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("where", ["poses", "activations"])
def test_a_nan_input_reaches_both_outputs(kernels, where):
    """No clamp or max may turn a NaN into a finite number (the NaN guard of training relies
    on NaN reaching the loss)."""
    inputs, vote_offset, spec = problem("matrix", True, True)
    inputs = [t.clone() for t in inputs]
    if where == "poses":
        inputs[0][0, 0, 0, 5] = float("nan")
    else:
        inputs[2][0, 0, 0] = float("nan")
    poses, acts = route(*inputs, spec, vote_offset)
    assert torch.isnan(poses[0]).any() and torch.isnan(acts[0]).any()
    assert torch.isfinite(poses[1]).all() and torch.isfinite(acts[1]).all()  # other image


@pytest.mark.parametrize("iters", [1, 6])  # 6 iterations: 11 vote-gradient records
def test_fused_equals_plain_autograd_for_other_iteration_counts(kernels, iters):
    inputs, vote_offset, spec = problem("matrix", True, True)
    spec = RoutingSpec(iters, 0.5, spec.child_map, spec.rows, spec.row_len)
    assert_route_equals_plain(inputs, spec, vote_offset, lambda p, a: (p * p).sum() + a.sum())


def _isa_skip_reason(arch: str) -> str | None:
    """Why the kernels built for -march=`arch` cannot run here (None when they can)."""
    if arch == "native":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"-march={arch} is an x86-64 ISA; this machine is {platform.machine()}"
    try:
        missing = build.missing_cpu_flags(arch)
    except KernelsUnavailable as err:
        return str(err)
    return f"this CPU lacks {' '.join(missing)} for -march={arch}" if missing else None


@pytest.fixture(scope="module")
def library_with_64_byte_parts(tmp_path_factory):
    """The kernels compiled with the AVX-512 layout of a vote (-DVBYTES=64), for this CPU."""
    target = tmp_path_factory.mktemp("kernels") / "kernels_64_byte_parts.so"
    cmd = [build.compiler(), *build.flags("native"), "-DVBYTES=64", "-o", target, build.SOURCE]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(target))


@pytest.fixture(params=["native", "x86-64", "x86-64-v3", "x86-64-v4", "native-64-byte-parts"])
def isa_build(request, monkeypatch):
    """The C kernels built for one ISA ($EMCAPS_KERNEL_ARCH), routing through them; skipped
    where this CPU cannot run that build. x86-64 (SSE2) takes the narrowest parts (16 bytes, as
    NEON), x86-64-v3 the AVX2 ones, x86-64-v4 the AVX-512 ones; native-64-byte-parts is the
    AVX-512 parts' code (-DVBYTES=64) on whatever this CPU is."""
    arch = request.param
    try:
        ffi.library()
    except KernelsUnavailable as err:
        pytest.skip(str(err))
    reason = _isa_skip_reason(arch.removesuffix("-64-byte-parts"))
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(build.ARCH_VARIABLE, arch.removesuffix("-64-byte-parts"))
    monkeypatch.setattr(build, "_library", None)  # restored after the test: the default build
    monkeypatch.setattr(build, "_failure", None)
    if arch.endswith("-64-byte-parts"):
        library = request.getfixturevalue("library_with_64_byte_parts")
        monkeypatch.setattr(build, "_library", library)
    before = routing_backend.backend()
    routing_backend.set_backend("c")
    yield arch
    routing_backend.set_backend(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pose", ["matrix", "vector"])
def test_each_isa_build_equals_plain_autograd(isa_build, dtype, pose):
    """Outputs and every gradient (poses, W, activations, β_u, β_a, offset) of the C kernels
    built for each ISA this CPU runs, against plain autograd in float64: to float64 rounding,
    and to float32 rounding in float32 (where the kernels' own exp runs). 18 slots: one block
    of 16 through the vectorised paths, 2 through their remainders."""
    inputs, offset, spec = problem(pose, True, True, images=2)
    exact = [t.clone().requires_grad_(True) for t in (*inputs, offset)]
    ours = [t.to(dtype).requires_grad_(True) for t in (*inputs, offset)]
    loss = random_weighted_loss(inputs, 6)
    p1, a1 = route(*ours[:5], spec, ours[5])
    assert build.library() is ffi.library() and active_backend_name() == "c"
    p2, a2 = plain_route(*exact[:5], spec, exact[5])
    # errors seen: about 1e-14 in float64, 4e-6 in float32 (relative to each tensor's largest)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(p1.double(), p2, **tol)
    torch.testing.assert_close(a1.double(), a2, **tol)
    loss(p1.double(), a1.double()).backward()
    loss(p2, a2).backward()
    names = ("poses", "W", "a", "beta_u", "beta_a", "offset")
    for name, x, y in zip(names, ours, exact, strict=True):
        scale = y.grad.abs().max().item()
        torch.testing.assert_close(
            x.grad.double() / scale, y.grad / scale, **tol, msg=lambda m, n=name: f"{n}: {m}"
        )

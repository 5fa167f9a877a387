"""The C kernels of the routing equal the plain PyTorch expressions they replace, and the
kernels are built, cached, checked and chosen as documented."""

from __future__ import annotations

import ctypes
import subprocess
import warnings

import pytest
import torch

from emcaps_cli.capsules.votes import compute_votes
from emcaps_cli.errors import EmcapsError
from emcaps_cli.routing import active_backend_name, select
from emcaps_cli.routing import backend as routing_backend
from emcaps_cli.routing.backend import KernelsUnavailable, UnknownBackend
from emcaps_cli.routing.c import build, ffi


@pytest.fixture(autouse=True)
def _need_compiler():
    try:
        ffi.library()
    except KernelsUnavailable as err:
        pytest.skip(str(err))


def case(dtype, q, slots=37, blocks=(2, 5), types=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, l = blocks
    poses = torch.randn(n, l, slots, 16, generator=g, dtype=dtype)
    transforms = torch.randn(slots, types, q, q, generator=g, dtype=dtype)
    offset = torch.randn(slots, 16, generator=g, dtype=dtype)
    return poses, transforms, offset


TOL = {torch.float64: dict(atol=1e-11, rtol=1e-11), torch.float32: dict(atol=2e-4, rtol=1e-5)}
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [4, 16])  # matrix poses (4 rows of 4) and vector poses (1 x 16)
@pytest.mark.parametrize("with_offset", [True, False])
def test_votes_are_pose_times_transform_plus_offset_and_their_mean(dtype, q, with_offset):
    poses, transforms, offset = case(dtype, q)
    offset = offset if with_offset else None
    expected = compute_votes(poses, transforms)  # (N, L, J, S, 16)
    if offset is not None:
        expected = expected + offset
    votes, shift = ffi.votes(poses, ffi.tile_transforms(transforms), offset)
    torch.testing.assert_close(votes, expected, **TOL[dtype])
    torch.testing.assert_close(shift, expected.mean(dim=3, keepdim=True), **TOL[dtype])


def test_kernels_use_every_thread_and_give_the_same_result_on_one():
    poses, transforms, offset = case(torch.float64, 4, blocks=(3, 7))
    tiled = ffi.tile_transforms(transforms)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [t.clone() for t in ffi.votes(poses, tiled, offset)]
        torch.set_num_threads(2)
        two = ffi.votes(poses, tiled, offset)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A kernel module state with nothing built or loaded yet, caching in tmp_path."""
    monkeypatch.setenv("EMCAPS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_library", None)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setattr(select, "_warned", set())
    before = routing_backend.backend()
    yield tmp_path
    routing_backend.set_backend(before)


def test_build_is_cached_by_source_compiler_and_cpu(fresh_state):
    ffi.library()
    built = list(fresh_state.glob("cpu_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    build._library = None
    ffi.library()  # loads the cached file, does not rebuild
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in fresh_state.iterdir() if p not in built]  # no temp files left


def compile_library(tmp_path, source: str, name: str):
    """A tiny shared library from C `source`, compiled with the kernels' compiler."""
    c_file = tmp_path / f"{name}.c"
    c_file.write_text("#include <stdint.h>\n" + source)
    target = tmp_path / f"{name}.so"
    subprocess.run([build.compiler(), "-shared", "-fPIC", "-o", target, c_file], check=True)
    return target


def test_the_abi_check_refuses_a_library_without_the_version_or_with_another(tmp_path):
    none = ctypes.CDLL(str(compile_library(tmp_path, "int64_t unrelated(void) { return 0; }", "a")))
    assert "no emcaps_abi_version" in build.abi_problem(none)
    old = "int64_t emcaps_abi_version(void) { return 1; }"
    other = ctypes.CDLL(str(compile_library(tmp_path, old, "b")))
    assert f"ABI version is 1, not {build.ABI_VERSION}" in build.abi_problem(other)
    assert build.abi_problem(ffi.library()) is None


def test_a_stale_cached_library_is_rebuilt_not_called(fresh_state):
    """A file in the cache's place whose ABI version differs (an older build, say)."""
    target = build.cached_path(build.compiler())
    stale = "int64_t emcaps_abi_version(void) { return 1; }"
    compile_library(fresh_state, stale, "stale").rename(target)
    lib = ffi.library()
    assert build.abi_problem(lib) is None
    assert build.abi_problem(ctypes.CDLL(str(target))) is None  # the file itself was replaced
    x = torch.linspace(-3, 3, 32)
    torch.testing.assert_close(ffi.exp_lanes(x), torch.exp(x), atol=0, rtol=2e-7)


def test_the_ctypes_structures_match_the_c_structs_field_for_field():
    for which, struct in enumerate(ffi.STRUCTS):
        expected = [ctypes.sizeof(struct)]
        expected += [getattr(struct, name).offset for name, _ in struct._fields_]
        assert ffi.c_layout(which) == expected, struct.__name__
    assert ffi.c_layout(len(ffi.STRUCTS)) == []  # no struct beyond those


def test_missing_compiler_is_an_error_for_c_and_a_warning_for_auto(
    fresh_state, monkeypatch, capsys
):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    x = torch.zeros(1)
    routing_backend.set_backend("c")
    with pytest.raises(KernelsUnavailable, match="no C compiler found"):
        select.resolve(x)
    routing_backend.set_backend("auto")
    with pytest.warns(UserWarning, match="using the slower PyTorch routing kernels") as record:
        assert select.resolve(x).name == "torch"
        assert active_backend_name() == "torch"
    assert len(record) == 1  # said once
    assert capsys.readouterr().err == ""  # a warning, not a print


def test_backend_choice():
    x = torch.zeros(1)
    before = routing_backend.backend()
    try:
        routing_backend.set_backend("torch")
        assert select.resolve(x).name == active_backend_name() == "torch"
        routing_backend.set_backend("c")
        assert select.resolve(x).name == active_backend_name("cpu") == "c"
        with pytest.raises(KernelsUnavailable, match="float32 or float64"):
            select.resolve(x.bfloat16())
        routing_backend.set_backend("auto")
        assert select.resolve(x).name == "c"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # another dtype is no reason to warn
            assert select.resolve(x.bfloat16()).name == "torch"
    finally:
        routing_backend.set_backend(before)
    with pytest.raises(UnknownBackend, match="auto, c, torch"):
        routing_backend.set_backend("cuda")


def test_kernel_errors_are_the_errors_the_command_line_reports():
    assert issubclass(KernelsUnavailable, EmcapsError)
    assert issubclass(UnknownBackend, EmcapsError)


def test_vectorised_exp_is_within_one_ulp_and_keeps_the_edge_cases():
    """float32 E-step normalisation uses the kernels' own exp: measured against exp in float64."""
    x = torch.linspace(-87.3, 88.3, 16 * 20_000, dtype=torch.float32)
    got = ffi.exp_lanes(x).double()
    exact = torch.exp(x.double())
    rounded = exact.float()
    ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
    assert ((got - exact).abs() / ulp).max() <= 1.01
    edge = torch.tensor(
        [0.0, float("-inf"), -1e30, -90.0, float("nan"), 1.0, -1.0, 2.0] * 2, dtype=torch.float32
    )
    out = ffi.exp_lanes(edge)
    assert out[0] == 1.0 and out[1] == 0.0 and out[2] == 0.0 and out[3] == 0.0
    assert torch.isnan(out[4])  # a NaN upstream must not turn into a finite number here
    torch.testing.assert_close(out[5:8], torch.exp(edge[5:8]), atol=0, rtol=2e-7)
    torch.testing.assert_close(ffi.exp_lanes(x.double()), torch.exp(x.double()), atol=0, rtol=1e-15)


def test_routing_gradients_agree_on_one_and_two_threads():
    """route_backward keeps per-thread copies of dL/dW; their sum must not depend on the count."""
    from emcaps_cli.capsules.geometry import conv_child_map
    from emcaps_cli.routing.fused import RoutingSpec, route

    g = torch.Generator().manual_seed(3)
    d = torch.float64
    poses = torch.randn(2, 4, 18, 16, generator=g, dtype=d)
    transforms = torch.randn(18, 3, 4, 4, generator=g, dtype=d) / 2
    acts = torch.rand(2, 4, 18, generator=g, dtype=d)
    beta = torch.zeros(3, dtype=d)
    spec = RoutingSpec(3, 0.5, conv_child_map(4, 4, 3, 1, 2), 4, 4)
    grads = []
    threads = torch.get_num_threads()
    before = routing_backend.backend()
    try:
        routing_backend.set_backend("c")
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_(True) for t in (poses, transforms, acts)]
            out, act = route(*leaves, beta, beta, spec)
            (out.square().sum() + act.sum()).backward()
            grads.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
        routing_backend.set_backend(before)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_unwritable_cache_is_reported_not_raised_as_oserror(fresh_state, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EMCAPS_KERNEL_CACHE", str(blocker / "kernels"))
    with pytest.raises(KernelsUnavailable, match="could not build into"):
        ffi.library()

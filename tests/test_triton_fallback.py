"""Which GPUs and installations the Triton kernels run on: `--kernels auto` falls back to the
PyTorch ops with one warning line where they cannot, `--kernels triton` is a one-line error.
The GPU's compute capability, Triton's import and Triton's driver are mocked: no GPU needed."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import emcaps_cli.routing
from emcaps_cli.errors import EmcapsError, FallbackWarning
from emcaps_cli.routing import backend as routing_backend
from emcaps_cli.routing import select, triton_backend
from emcaps_cli.routing.backend import KernelsUnavailable
from emcaps_cli.routing.triton_backend import MIN_CAPABILITY, gpu_unsupported

CUDA_LIKE = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
IMPORT_ERROR, DRIVER_ERROR = triton_backend._import_error, triton_backend._driver_error


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """A mocked NVIDIA GPU 0 of capability `gpu.capability` whose Triton imports and starts;
    the kernel choice, the fallback warnings and the answers per GPU start afresh."""
    state = SimpleNamespace(capability=(8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: state.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(triton_backend, "_import_error", lambda: None)
    monkeypatch.setattr(triton_backend, "_driver_error", lambda: None)
    monkeypatch.setattr(triton_backend, "_gpu_reasons", {})
    monkeypatch.setattr(select, "_warned", set())
    before = routing_backend.backend()
    yield state
    routing_backend.set_backend(before)


def test_triton_needs_volta_or_newer() -> None:
    assert MIN_CAPABILITY == (7, 0)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (9, 0), (12, 0)])
def test_auto_takes_triton_on_a_gpu_triton_compiles_for(gpu, capability) -> None:
    gpu.capability = capability
    routing_backend.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select.resolve(CUDA_LIKE).name == "triton"


@pytest.mark.parametrize("capability", [(3, 7), (5, 2), (6, 0), (6, 1)])
def test_auto_falls_back_on_an_older_gpu_with_one_warning(gpu, capability) -> None:
    gpu.capability = capability
    routing_backend.set_backend("auto")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert select.resolve(CUDA_LIKE).name == "torch"
        assert select.resolve(CUDA_LIKE).name == "torch"
    assert [w.category for w in record] == [FallbackWarning]
    major, minor = capability
    assert str(record[0].message) == (
        "emcaps: routing on the slower PyTorch ops (Tesla P100-PCIE-16GB has CUDA compute "
        f"capability {major}.{minor}; Triton compiles for 7.0 and newer)"
    )


def test_the_command_line_shows_the_fallback_as_one_line(gpu) -> None:
    pytest.importorskip("typer")
    from emcaps_cli.cli.main import format_warning

    gpu.capability = (6, 1)
    routing_backend.set_backend("auto")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        select.resolve(CUDA_LIKE)
    (w,) = record
    shown = format_warning(w.message, w.category, w.filename, w.lineno, w.line)
    assert shown == (
        "warning: routing on the slower PyTorch ops (Tesla P100-PCIE-16GB has CUDA compute "
        "capability 6.1; Triton compiles for 7.0 and newer)\n"
    )
    other = format_warning(UserWarning("x"), UserWarning, "f.py", 3)
    assert other.startswith("f.py:3: UserWarning: x")  # Python's own format for the rest


def test_kernels_triton_on_an_older_gpu_is_a_one_line_error(gpu) -> None:
    pytest.importorskip("typer")
    from emcaps_cli.cli._common import use_kernels

    gpu.capability = (6, 1)
    routing_backend.set_backend("triton")
    with pytest.raises(KernelsUnavailable, match=r"--kernels triton: .* capability 6\.1"):
        select.resolve(CUDA_LIKE)
    with pytest.raises(EmcapsError) as info:
        use_kernels("triton")
    assert str(info.value) == (
        "--kernels triton: Tesla P100-PCIE-16GB has CUDA compute capability 6.1; Triton "
        "compiles for 7.0 and newer"
    )
    gpu.capability = (7, 0)
    triton_backend._gpu_reasons.clear()
    use_kernels("triton")  # accepted


def test_without_triton_auto_falls_back_and_triton_is_refused(
    gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_backend, "_import_error", IMPORT_ERROR)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "emcaps_cli.routing.triton_kernels", None)
    monkeypatch.delattr(emcaps_cli.routing, "triton_kernels", raising=False)
    routing_backend.set_backend("auto")
    with pytest.warns(FallbackWarning, match=r"slower PyTorch ops \(Triton is not importable"):
        assert select.resolve(CUDA_LIKE).name == "torch"
    routing_backend.set_backend("triton")
    with pytest.raises(KernelsUnavailable, match="--kernels triton: Triton is not importable"):
        select.resolve(CUDA_LIKE)


def test_a_triton_whose_driver_cannot_start_is_not_used(
    gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    triton = pytest.importorskip("triton")

    class NoCompiler:
        def get_current_target(self):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment")

    monkeypatch.setattr(triton_backend, "_driver_error", DRIVER_ERROR)
    monkeypatch.setattr(triton.runtime.driver, "_active", NoCompiler())
    assert gpu_unsupported(torch.device("cuda", 0)) == (
        "Triton cannot start on this GPU: Failed to find C compiler. Please specify via CC "
        "environment"
    )


def test_rocm_capabilities_are_not_held_against_the_nvidia_threshold(
    gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    gpu.capability = (6, 0)
    assert gpu_unsupported(torch.device("cuda", 0)) is None


def test_each_gpu_is_asked_once(gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(triton_backend, "_driver_error", lambda: asked.append(1))
    for _ in range(3):
        assert gpu_unsupported(torch.device("cuda", 0)) is None
    assert asked == [1]

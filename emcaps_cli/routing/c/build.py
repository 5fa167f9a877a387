"""Building, caching and loading the C kernels (kernels.c, beside this file).

The source is compiled on first use with the system C compiler (`$CC`, else `cc`) at
`-O3 -march=native -fopenmp` and cached under `$EMCAPS_KERNEL_CACHE` (default
`~/.cache/emcaps/kernels`), keyed by the source, compiler, flags and CPU. The kernels split
their loops with OpenMP; they bind to the OpenMP runtime PyTorch has already loaded, so they
run on PyTorch's threads (`torch.set_num_threads`).

A loaded library must report ABI_VERSION from `emcaps_abi_version()`: a cached file without
that symbol, or with another version, is rebuilt rather than called (its entry points would
read their arguments in another layout).
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from emcaps_cli.routing.backend import KernelsUnavailable

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
ABI_VERSION = 2  # EMCAPS_ABI_VERSION in kernels.c

_library: ctypes.CDLL | None = None
_failure: str | None = None


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


def abi_problem(lib: ctypes.CDLL) -> str | None:
    """Why `lib` cannot be called with this module's structs, or None when it can."""
    try:
        version_of = lib.emcaps_abi_version
    except AttributeError:
        return "it has no emcaps_abi_version"
    version_of.restype, version_of.argtypes = ctypes.c_int64, []
    version = version_of()
    if version != ABI_VERSION:
        return f"its ABI version is {version}, not {ABI_VERSION}"
    return None


def compiler() -> str:
    """The C compiler's path; raises KernelsUnavailable when there is none."""
    if platform.system() == "Windows":
        raise KernelsUnavailable("the C kernels are built with a Unix C compiler")
    found = shutil.which(os.environ.get("CC", "cc"))
    if found is None:
        raise KernelsUnavailable(f"no C compiler found ({os.environ.get('CC', 'cc')})")
    return found


def cached_path(compiler: str) -> Path:
    """Where the library built by `compiler` from this source for this CPU is cached."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update((platform.machine() + _cpu_signature()).encode())
    return _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _load() -> ctypes.CDLL:
    cc = compiler()
    target = cached_path(cc)
    if not target.exists():
        _build(cc, target)
    lib = _open(target)
    stale = abi_problem(lib)
    if stale is None:
        return lib
    _ctypes.dlclose(lib._handle)  # else dlopen of the same path hands the stale library back
    _build(cc, target)
    lib = _open(target)
    still = abi_problem(lib)
    if still is not None:
        raise KernelsUnavailable(f"{target} was rebuilt, but {still}")
    return lib


def _open(target: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(target))
    except OSError as err:
        raise KernelsUnavailable(f"could not load {target}: {err}") from err


def _build(compiler: str, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as err:  # an unwritable cache directory, say
        raise KernelsUnavailable(f"could not build into {target.parent}: {err}") from err
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

"""Building, caching and loading the C kernels (kernels.c, beside this file).

The source is compiled on first use with the system C compiler (`$CC`, else `cc`) at
`-O3 -march=ARCH -fno-trapping-math -fopenmp` and cached under `$EMCAPS_KERNEL_CACHE` (default
`~/.cache/emcaps/kernels`), keyed by the source, compiler, flags and, for `native`, the CPU.
ARCH is `$EMCAPS_KERNEL_ARCH`, else `native`: any `-march` value the compiler accepts
(`x86-64-v3` for AVX2 + FMA, `x86-64-v4` for AVX-512, `haswell`, ...). A named ISA whose
instructions this CPU lacks (by the compiler's ISA macros against /proc/cpuinfo) is refused
with the missing flags, never loaded to die on an illegal instruction. The kernels split
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
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from emcaps_cli.routing.backend import KernelsUnavailable

SOURCE = Path(__file__).with_name("kernels.c")
# Every build's flags; `flags` adds -march. -fno-trapping-math lets selects (x >= 0 ? a : 0)
# vectorise without AVX-512 masks.
FLAGS = [
    "-O3",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp",
    "-Wno-psabi",
]
ARCH_VARIABLE = "EMCAPS_KERNEL_ARCH"
# The compiler's ISA macros and the /proc/cpuinfo flag each needs (x86).
_CPU_FLAGS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm",
    "__MOVBE__": "movbe", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2",
}  # fmt: skip
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


def arch() -> str:
    """The `-march` value the kernels are built for: $EMCAPS_KERNEL_ARCH, else native."""
    value = os.environ.get(ARCH_VARIABLE, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value):
        raise KernelsUnavailable(
            f"{ARCH_VARIABLE}={value!r} is not a -march value "
            "(native, x86-64-v3, x86-64-v4, haswell, skylake-avx512, ...)"
        )
    return value


def flags(target_arch: str) -> list[str]:
    """The compiler's flags for a build for `-march=target_arch`."""
    return [*FLAGS, f"-march={target_arch}"]


def missing_cpu_flags(target_arch: str, cc: str | None = None) -> list[str]:
    """The /proc/cpuinfo flags that code built for `-march=target_arch` needs and this CPU
    lacks ([] for native, or where the CPU's flags are unknown); raises KernelsUnavailable when
    the compiler does not accept the value."""
    cc = cc or compiler()
    result = subprocess.run(
        [cc, f"-march={target_arch}", "-dM", "-E", "-x", "c", "-"],
        input="", capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        first = next((ln for ln in lines if "error" in ln), lines[0])
        raise KernelsUnavailable(f"{ARCH_VARIABLE}={target_arch}: {cc} refuses it: {first}")
    have = _cpu_flags()
    if target_arch == "native" or not have:
        return []
    macros = set(re.findall(r"^#define (__\w+__) ", result.stdout, flags=re.MULTILINE))
    return sorted(
        flag for macro, flag in _CPU_FLAGS.items() if macro in macros and flag not in have
    )


def cached_path(compiler: str, target_arch: str | None = None) -> Path:
    """Where the library built by `compiler` from this source for `-march=target_arch` (default:
    arch(); for native: for this CPU) is cached."""
    target_arch = target_arch or arch()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(flags(target_arch)).encode()):
        key.update(part)
    cpu = _cpu_signature() if target_arch == "native" else ""
    key.update((platform.machine() + cpu).encode())
    return _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _load() -> ctypes.CDLL:
    cc, target_arch = compiler(), arch()
    if target_arch != "native":  # before building or loading: never run what the CPU lacks
        missing = missing_cpu_flags(target_arch, cc)
        if missing:
            raise KernelsUnavailable(
                f"{ARCH_VARIABLE}={target_arch} needs CPU flags this CPU lacks: "
                + " ".join(missing)
            )
    target = cached_path(cc, target_arch)
    if not target.exists():
        _build(cc, target_arch, target)
    lib = _open(target)
    stale = abi_problem(lib)
    if stale is None:
        return lib
    _ctypes.dlclose(lib._handle)  # else dlopen of the same path hands the stale library back
    _build(cc, target_arch, target)
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


def _build(compiler: str, target_arch: str, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as err:  # an unwritable cache directory, say
        raise KernelsUnavailable(f"could not build into {target.parent}: {err}") from err
    os.close(fd)
    try:
        cmd = [compiler, *flags(target_arch), "-o", tmp, str(SOURCE)]
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


def _cpu_flags() -> set[str]:
    """This CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()

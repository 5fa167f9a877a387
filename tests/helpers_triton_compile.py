"""Compiles the Triton routing kernels for a Hopper GPU (sm_90) without one: Triton's own
front end, its NVIDIA back end and the ptxas it ships. Run as a script (Triton must not be in
interpreter mode); prints one JSON line per kernel with ptxas's register and spill counts.

    python tests/helpers_triton_compile.py Q S J [--all]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from emcaps_cli.routing import triton_kernels  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SCALARS = {"lam": "fp32", "var_floor": "fp32", "sum_floor": "fp32", "power": "fp32"}


def argument_type(name: str) -> str:
    if name.endswith("_ptr"):
        return "*i64" if name == "table_ptr" else "*fp32"
    return SCALARS.get(name, "i32")


def compile_for_sm90(fn, constants: dict, warps: int):
    signature = {n: "constexpr" if n in constants else argument_type(n) for n in fn.arg_names}
    where = {(fn.arg_names.index(n),): v for n, v in constants.items()}
    source = ASTSource(fn, signature, constexprs=where)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def ptxas_usage(kernel) -> dict:
    """Registers per thread and spill-store bytes, from ptxas -v on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run(
        [PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
    )
    os.unlink(f.name)
    registers = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
    }


def variants(everything: bool) -> list[tuple[bool, bool]]:
    """(FIRST, LAST) specialisations: a middle iteration, or with --all every kind."""
    middle = [(False, False)]
    return middle + [(True, False), (False, True), (True, True)] if everything else middle


def main() -> None:
    q, s, j = (int(x) for x in sys.argv[1:4])
    everything = "--all" in sys.argv
    # The launch settings route_forward and route_backward use for this shape.
    problem = SimpleProblem(s, j, q)
    meta = triton_kernels.RoutingProblem.meta(problem)
    warps = meta.pop("num_warps")
    for first, last in variants(everything):
        for fn, extra in ((triton_kernels._forward_step, {}),
                          (triton_kernels._backward_step, {"ROWS": 16 // q})):  # fmt: skip
            constants = dict(S=s, J=j, FIRST=first, LAST=last, **meta, **extra)
            kernel = compile_for_sm90(fn, constants, warps)
            row = {"kernel": fn.__name__, "first": first, "last": last, **meta, "warps": warps}
            print(json.dumps({**row, **ptxas_usage(kernel)}), flush=True)


class SimpleProblem:
    """Just the shape RoutingProblem.meta reads."""

    def __init__(self, s: int, j: int, q: int) -> None:
        self.shape, self.offset = (1, 1, s, j, q), object()


if __name__ == "__main__":
    main()

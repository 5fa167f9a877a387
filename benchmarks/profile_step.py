"""Where a training step's time goes, by phase, at several batch sizes.

Times forward + spread loss, backward, gradient clipping, Adam and the weight average's update
of `emcaps train`'s default recipe on random inputs (CPU or CUDA, whichever `--device` gives),
averaged over `--steps` steps after `--warm-up` steps, batches alternated `--rounds` times.
`--table` adds torch.profiler's table of the operators with the most self time for the first
batch size. A fixed cost per step shows as phases that do not scale with the batch.

    python benchmarks/profile_step.py --arch 32,32,32,32 --batch 16 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from recipe_step import RecipeStep  # benchmarks/, this script's folder

from emcaps_cli.config import ModelConfig, parse_arch
from emcaps_cli.models import build_model
from emcaps_cli.utils.allocator import keep_freed_memory
from emcaps_cli.utils.atomic import atomic_path
from emcaps_cli.utils.device import resolve_device

PHASES = ("forward", "backward", "clip", "adam", "average")


def phase_times(arch: str, batch: int, steps: int, warm_up: int, device) -> dict[str, float]:
    """Mean milliseconds per step of each phase."""
    step = fresh_step(arch, batch, device)

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    totals = dict.fromkeys(PHASES, 0.0)
    for i in range(warm_up + steps):
        t0 = mark()
        loss = step.forward()
        t1 = mark()
        step.backward(loss)
        t2 = mark()
        step.clip()
        t3 = mark()
        step.adam()
        t4 = mark()
        step.update_average()
        t5 = mark()
        if i >= warm_up:
            spans = ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))
            for name, (a, b) in zip(PHASES, spans, strict=True):
                totals[name] += (b - a) * 1000 / steps
    return totals


def fresh_step(arch: str, batch: int, device) -> RecipeStep:
    """The default recipe's step for a freshly initialised network on random inputs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=parse_arch(arch))).to(device)
    x = torch.randn(batch, 2, 32, 32, device=device)  # (N, 2, 32, 32)
    y = torch.randint(0, 5, (batch,), device=device)
    return RecipeStep(model, x, y)


def operator_table(arch: str, batch: int, device) -> str:
    """torch.profiler's operators by self time over three training steps."""
    from torch.profiler import ProfilerActivity, profile

    step = fresh_step(arch, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # warm-up
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="32,32,32,32", help="A,B,C,D (default: the paper's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warm-up", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the batches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--table", action="store_true", help="print torch.profiler's table")
    parser.add_argument("--json", help="write the measurements here (atomically)")
    args = parser.parse_args()
    keep_freed_memory()
    device = resolve_device(args.device)
    rows = []
    for round_ in range(args.rounds):
        for batch in args.batch:
            ms = phase_times(args.arch, batch, args.steps, args.warm_up, device)
            total = sum(ms.values())
            rows.append(
                {"round": round_, "batch": batch, "ms": ms, "images_per_s": batch * 1000 / total}
            )
            phases = "  ".join(f"{k} {v:7.1f}" for k, v in ms.items())
            print(f"b={batch:<4} {phases}  ms;  {batch * 1000 / total:6.1f} img/s", flush=True)
    if args.table:
        print(operator_table(args.arch, args.batch[0], device))
    if args.json:
        meta = {"arch": args.arch, "threads": torch.get_num_threads(), "device": str(device)}
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Speed and memory of the capsule network: images/s for inference and for a training step
(forward + spread loss + backward + gradient clipping + Adam + the weight average's update, as
`emcaps train` with its default --front-lr-scale, --grad-clip and --ema-decay; `--grad-clip 0`
leaves the clipping out), peak memory, fused vs plain-autograd
routing, and the fast EM routing against the loop reference of Procedure 1 on a reduced shape.

Each measurement runs in its own subprocess so that peak RSS (CPU) belongs to it alone.

    python benchmarks/bench_model.py                       # paper + small model, batch 8 and 32
    python benchmarks/bench_model.py --batch 32 --models paper --impls fused --json out.json
    python benchmarks/bench_model.py --busy 1 --models small --batch 32 --impls fused

With --busy N every configuration is measured twice in a row, quiet and then beside N busy
processes (single-threaded CPU-bound loops, benchmarks/busy.py); the row holds both and their
ratio. Under --busy the statistic is the median step time (the best of a few steps hides what
a descheduled thread costs); quiet runs report the best, as before, and the median too.
--threads auto (the default) is the library's policy (emcaps_cli/utils/threads.py: one thread per
CPU left over by other processes, re-read every second); a number fixes the count.

On a GPU (`--device cuda`) the defaults become batch 32 and 128, the implementations triton,
torch and plain, and fp32 as well as bf16 autocast (`--precision fp32 amp`); `--compile on`
adds torch.compile'd runs. Memory is then the peak of torch.cuda.max_memory_allocated, and
`--budget-s` stops starting configurations after that many seconds (rows say "skipped"):

    python benchmarks/bench_model.py --device cuda --json gpu.json
    python benchmarks/bench_model.py --device cuda --models paper --batch 128 --compile off on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODELS = {"paper": "32,32,32,32", "small": "64,8,16,16"}
IMPLS = ["fused", "triton", "torch", "whole", "plain"]
# Defaults of --batch, --impls and --precision per device kind.
DEFAULTS = {
    "cpu": {"batch": [8, 32], "impls": ["fused", "torch", "plain"], "precision": ["fp32"]},
    "cuda": {
        "batch": [32, 128],
        "impls": ["triton", "torch", "plain"],
        "precision": ["fp32", "amp"],
    },
}
WARM_UP_S = 1.5  # untimed steps first, for at least this long


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args) -> dict:
    """One configuration, in this process: returns images/s and peak memory."""
    import torch
    from recipe_step import RecipeStep  # benchmarks/, this script's folder

    import emcaps_cli.capsules.layers as layers
    from emcaps_cli.config import ModelConfig, parse_arch
    from emcaps_cli.models import build_model
    from emcaps_cli.routing import backend, torch_backend
    from emcaps_cli.routing.c import backend as c_backend
    from emcaps_cli.routing.fused import plain_route
    from emcaps_cli.utils.allocator import keep_freed_memory
    from emcaps_cli.utils.device import resolve_device
    from emcaps_cli.utils.threads import ThreadGovernor

    governor = ThreadGovernor(None if args.threads == "auto" else int(args.threads))
    if args.allocator == "tuned":
        keep_freed_memory()  # as the emcaps command does
    if args.chunk_elements is not None:  # both paths' chunk budget (votes per routing chunk)
        torch_backend.VOTE_CHUNK_ELEMENTS = args.chunk_elements
        c_backend.C_VOTE_CHUNK_ELEMENTS = args.chunk_elements
    if args.impl in ("torch", "triton"):
        backend.set_backend(args.impl)  # the fused function on PyTorch ops / Triton only
    if args.impl == "plain":
        layers.route = plain_route  # the naive baseline: plain autograd through every op
    elif args.impl == "whole":
        torch_backend.VOTE_CHUNK_ELEMENTS = 0  # fused, but the whole batch routed at once
        c_backend.C_VOTE_CHUNK_ELEMENTS = 0
    device = resolve_device(args.device)
    config = ModelConfig(
        arch=parse_arch(MODELS[args.model]), iters=args.iters, routing=args.routing
    )
    model = build_model(config).to(device)
    x = torch.randn(args.batch, 2, 32, 32, device=device)
    y = torch.randint(0, 5, (args.batch,), device=device)
    rss_before = peak_memory_mb(device)
    if args.precision == "amp" and device.type != "cuda":
        raise SystemExit("--precision amp: bf16 autocast is measured on CUDA only")
    # bf16 autocast as `emcaps train --amp` runs it; the routing itself stays float32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "amp")
    network = torch.compile(model) if args.compile == "on" else model

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    clip = None  # training steps only
    if args.mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                network(x)
    else:
        step = RecipeStep(model, x, y, network=network, grad_clip=args.grad_clip, autocast=autocast)
        clip = step.clip_norm

    warm_until = time.perf_counter() + WARM_UP_S
    while True:  # warm-up (allocations, caches, the thread policy's first load sample)
        governor.update()
        step()
        sync()
        if time.perf_counter() >= warm_until:
            break
    times = []
    for _ in range(args.repeats):
        governor.update()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    median = statistics.median(times)
    return {
        "model": args.model,
        "arch": MODELS[args.model],
        "mode": args.mode,
        "impl": args.impl,
        "kernels": kernels_used(args.impl, x),
        "precision": args.precision,
        "compile": args.compile,
        "routing": args.routing,
        "batch": args.batch,
        "iters": args.iters,
        "grad_clip": clip,
        "seconds_per_batch": best,
        "images_per_s": args.batch / best,
        "median_images_per_s": args.batch / median,
        "threads": governor.threads,
        "peak_memory_mb": peak_memory_mb(device),
        "memory_before_mb": rss_before,
        "device": str(device),
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "allocator": args.allocator,
        "chunk_elements": args.chunk_elements,
    }


def kernels_used(impl: str, x) -> str:
    """Which routing implementation the layers ran: triton, c, torch or plain."""
    if impl == "plain":
        return "plain"
    from emcaps_cli.routing import active_backend_name

    return active_backend_name(x.device)


def reference_ratio(threads: int) -> dict:
    """Fast em_routing vs the loop reference on one exact conv-capsule problem (float64)."""
    import torch

    from emcaps_cli.capsules.geometry import conv_child_map
    from emcaps_cli.capsules.layers import ConvCaps
    from emcaps_cli.capsules.reference import dense_conv_problem, reference_em_routing

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side, b, j = 6, 4, 4
    layer = ConvCaps(b, j, kernel=3, stride=1, iters=3).double()
    poses = torch.randn(1, side, side, b, 16, dtype=torch.float64)
    acts = torch.rand(1, side, side, b, dtype=torch.float64)
    votes, a, connected = dense_conv_problem(
        poses[0], acts[0], layer.transforms.detach(), 3, 1, 4, 4
    )
    n_out = votes.shape[1] // j
    beta = torch.zeros(votes.shape[1], dtype=torch.float64)
    t = time.perf_counter()
    reference_em_routing(votes, a, connected, beta, beta, 3, 0.01)
    slow = time.perf_counter() - t
    with torch.no_grad():
        layer(poses, acts)
        t = time.perf_counter()
        for _ in range(10):
            layer(poses, acts)
        fast = (time.perf_counter() - t) / 10
    assert conv_child_map(side, side, 3, 1, b).num_children == side * side * b
    return {
        "shape": f"{side}x{side}x{b} -> {int(n_out**0.5)}x{int(n_out**0.5)}x{j}, K=3, 3 iters,"
        " float64, 1 image",
        "reference_s": slow,
        "fast_s": fast,
        "speedup": slow / fast,
    }


def measure_in_child(args, model, routing, batch, mode, impl, precision="fp32", compiled="off"):
    """One configuration in a fresh process (so that its peak RSS is its own)."""
    cmd = [
        sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--impl", impl,
        "--routing", routing, "--batch", str(batch), "--iters", str(args.iters),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
        "--device", args.device, "--allocator", args.allocator,
        "--precision", precision, "--compile", compiled,
    ]  # fmt: skip
    if args.grad_clip is not None:
        cmd += ["--grad-clip", str(args.grad_clip)]
    if args.chunk_elements is not None:
        cmd += ["--chunk-elements", str(args.chunk_elements)]
    config = dict(model=model, mode=mode, impl=impl, batch=batch, routing=routing,
                  precision=precision, compile=compiled)  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {args.child_timeout} s"}
    if out.returncode != 0:
        return {**config, "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_busy(quiet: dict, args, *config) -> dict:
    """`quiet` plus the same configuration measured beside args.busy busy processes."""
    from busy import busy_processes

    with busy_processes(args.busy):
        busy = measure_in_child(args, *config)
    if "error" in busy:
        return {**quiet, "busy": {"processes": args.busy, "error": busy["error"]}}
    keys = ("images_per_s", "median_images_per_s", "threads", "peak_memory_mb")
    return {
        **quiet,
        "busy": {"processes": args.busy, **{k: busy[k] for k in keys}},
        "busy_ratio": busy["median_images_per_s"] / quiet["median_images_per_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["paper", "small"], choices=list(MODELS))
    p.add_argument("--batch", nargs="+", type=int, help="default: 8 32 on the CPU, 32 128 on CUDA")
    p.add_argument("--modes", nargs="+", default=["inference", "train"])
    p.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        help="fused: the layers' code (C kernels on the CPU when they build, Triton on CUDA); "
        "triton: the same fused function on the Triton kernels; torch: on PyTorch ops only; "
        "whole: fused without routing the batch in chunks; plain: plain autograd through "
        "every op (the naive baseline). Default: fused torch plain on the CPU, triton torch "
        "plain on CUDA",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "amp"],
        help="fp32, or amp: bf16 autocast as `emcaps train --amp` (CUDA only). Default: fp32 "
        "on the CPU, both on CUDA",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="on: the network under torch.compile (the routing runs eagerly inside it)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="start no configuration after this many seconds (the rest are marked skipped)",
    )
    p.add_argument(
        "--child-timeout", type=float, default=600, help="seconds one configuration may take"
    )
    p.add_argument("--routing", nargs="+", default=["exact"], choices=["exact", "patch"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument(
        "--grad-clip",
        type=float,
        help="training steps: clip the gradient to this norm (default: emcaps train's for the "
        "capsule network; 0: no clipping)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="intra-op threads: a number, or auto (the library's policy; default)",
    )
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="also measure each configuration beside N busy processes (default 0: quiet only)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--thp",
        choices=["on", "off"],
        default="on",
        help="transparent huge pages in PyTorch's CPU allocator (THP_MEM_ALLOC_ENABLE; "
        "the emcaps command turns it on)",
    )
    p.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: glibc keeps freed memory for reuse, as the emcaps command sets it "
        "(emcaps_cli/utils/allocator.py); default: glibc's defaults",
    )
    p.add_argument(
        "--chunk-elements",
        type=int,
        help="votes per routing chunk for every path (default: the library's, 2^22 on the C "
        "kernels, 2^24 on PyTorch ops)",
    )
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    for name, value in DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        args.routing, args.batch = args.routing[0], args.batch[0]
        args.precision, args.compile = args.precision[0], args.compile[0]
        print(json.dumps(measure(args)))
        return

    # Read by PyTorch at its first import, so it is set here for the child processes.
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if args.thp == "on" else "0"
    import torch

    rows = run_all(args)
    result = {"machine": machine(args, torch), "runs": rows}
    if kind == "cuda":
        result["triton_over_torch"] = speedups(rows, "triton", "torch")
    else:
        result["reference"] = reference_ratio(2 if args.threads == "auto" else int(args.threads))
        ref = result["reference"]
        print(
            f"reference loop {ref['reference_s']:.2f} s vs fast {ref['fast_s'] * 1e3:.1f} ms "
            f"({ref['speedup']:.0f}x) on {ref['shape']}",
            file=sys.stderr,
        )
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


def configurations(args):
    """(model, routing, batch, mode, impl, precision, compile) in the order they run."""
    for model in args.models:
        for routing in args.routing:
            for batch in args.batch:
                for mode in args.modes:
                    for compiled in args.compile:
                        for precision in args.precision:
                            for impl in args.impls:
                                yield model, routing, batch, mode, impl, precision, compiled


def run_all(args) -> list[dict]:
    """Every configuration, each in its own process, within --budget-s if given."""
    start, rows = time.perf_counter(), []
    for config in configurations(args):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            keys = ("model", "routing", "batch", "mode", "impl", "precision", "compile")
            rows.append({**dict(zip(keys, config, strict=True)), "error": "skipped: --budget-s"})
            continue
        row = measure_in_child(args, *config)
        if args.busy and "error" not in row:
            row = with_busy(row, args, *config)
        rows.append(row)
        print(_fmt(row), file=sys.stderr, flush=True)
    return rows


def machine(args, torch) -> dict:
    info = {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor(),
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        import triton

        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["triton"] = triton.__version__
    return info


def speedups(rows: list[dict], fast: str, slow: str) -> list[dict]:
    """images/s of impl `fast` over `slow` for every configuration that measured both."""
    keys = ("model", "routing", "batch", "mode", "precision", "compile")
    speed = {
        (row["impl"], *(row[k] for k in keys)): row["images_per_s"]
        for row in rows
        if "error" not in row
    }
    out = []
    for (impl, *config), value in speed.items():
        other = speed.get((slow, *config))
        if impl == fast and other:
            out.append({**dict(zip(keys, config, strict=True)), "ratio": value / other})
    return out


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:5s} {row['mode']:9s} {row['impl']:5s} b={row['batch']:<3d} ERROR"
    text = (
        f"{row['model']:5s} {row['routing']:5s} {row['mode']:9s} {row['impl']:6s} "
        f"{row['precision']:4s} compile {row['compile']:3s} "
        f"b={row['batch']:<3d} {row['images_per_s']:8.1f} img/s  "
        f"peak {row['peak_memory_mb']:8.0f} MB  {row['threads']} threads"
    )
    busy = row.get("busy")
    if busy and "error" not in busy:
        text += (
            f"  | median quiet {row['median_images_per_s']:.1f}, beside {busy['processes']} "
            f"busy {busy['median_images_per_s']:.1f} img/s ({busy['threads']} threads): "
            f"x{row['busy_ratio']:.2f}"
        )
    return text


if __name__ == "__main__":
    main()

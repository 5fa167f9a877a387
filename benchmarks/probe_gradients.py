"""Gradient signal of the capsule network at initialisation, per layer: how large the gradient
is and whether successive batches agree on its direction.

For each setting (routing iterations × E-step likelihood power τ) a network is built with the
same seed, and the spread loss (margin 0.2, as at the start of training) is differentiated on
`--batches` successive batches of training images (centre crops). Printed per layer: the mean
gradient norm and the mean cosine between the gradients of successive batches (1: every batch
pushes the same way; 0: noise). Also the class layer's mean largest assignment R per child.

    python benchmarks/probe_gradients.py --data data/smallnorb.h5 --iters 1,2,3 --powers 1,0.1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from emcaps_cli.capsules.health import capsule_health
from emcaps_cli.config import ModelConfig, parse_arch
from emcaps_cli.data.cache import load_cache
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.losses import spread_loss
from emcaps_cli.models import build_model

LAYERS = ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps")


def layer_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """{layer: flattened gradient of the spread loss} for one batch."""
    model.zero_grad(set_to_none=True)
    spread_loss(model(images), labels, 0.2).backward()
    return {
        name: torch.cat([p.grad.flatten() for p in getattr(model, name).parameters()])
        for name in LAYERS
    }


def probe(config: ModelConfig, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int):
    torch.manual_seed(seed)
    model = build_model(config)
    grads = [layer_gradients(model, x, y) for x, y in batches]
    out = {}
    for name in LAYERS:
        norms = [float(g[name].norm()) for g in grads]
        cosines = [
            float(torch.nn.functional.cosine_similarity(a[name], b[name], dim=0))
            for a, b in itertools.pairwise(grads)
        ]
        out[name] = {"grad_norm": float(np.mean(norms)), "cosine": float(np.mean(cosines))}
    x, y = batches[0]
    health = capsule_health(model, x, y, spread_loss, 0.2)
    out["class_max_assignment"] = health["class_caps"]["max_assignment"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/smallnorb.h5"))
    p.add_argument("--arch", default="64,8,16,16")
    p.add_argument("--iters", default="1,2,3", help="comma-separated routing iterations")
    p.add_argument("--powers", default="1,0.1", help="comma-separated likelihood powers τ")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    train = load_cache(args.data).train
    batches = []
    for k in range(args.batches):
        sl = slice(k * args.batch_size, (k + 1) * args.batch_size)
        images = torch.from_numpy(np.ascontiguousarray(train.images[sl]))
        batches.append((eval_batch(images, 2), torch.from_numpy(train.labels[sl]).long()))
    rows = []
    for iters, power in itertools.product(
        [int(v) for v in args.iters.split(",")], [float(v) for v in args.powers.split(",")]
    ):
        config = ModelConfig(arch=parse_arch(args.arch), iters=iters, likelihood_power=power)
        result = probe(config, batches, args.seed)
        rows.append({"iters": iters, "likelihood_power": power, **result})
        cells = "  ".join(
            f"{name} {result[name]['grad_norm']:.3g} ({result[name]['cosine']:+.2f})"
            for name in LAYERS
        )
        print(
            f"iters {iters} τ {power:g}: class max R {result['class_max_assignment']:.2f}  {cells}",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

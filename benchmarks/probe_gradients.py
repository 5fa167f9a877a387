"""Gradient signal and routing state of the capsule network, per layer: how large the gradient
is, whether successive batches agree on its direction, and how hard each layer routes.

For each setting a network is built with the same seed (or loaded from `--checkpoint` and
rebuilt with the setting's routing options), and the spread loss (margin 0.2, as at the start
of training, unless `--margin`) is differentiated on `--batches` successive batches of
training images (centre crops). Printed per layer: the mean gradient norm, the mean cosine
between the gradients of successive batches (1: every batch pushes the same way; 0: noise),
and for each routing layer the mean largest assignment R per child against its value under
uniform assignments (x uniform: 1 means the routing left R uniform).

A setting is `NAME=field=value,field=value` over ModelConfig fields (routing options such as
iters, likelihood_power, var_floor, final_lambda) plus `w_scale=F`, which multiplies every
capsule layer's transformation matrices W by F after initialisation (votes F times smaller).

    python benchmarks/probe_gradients.py --set "tau1=likelihood_power=1,var_floor=0.01" \
        --set "tempered=likelihood_power=0.1,var_floor=0.1" --json probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from emcaps_cli.capsules.health import ROUTING_LAYERS, capsule_health
from emcaps_cli.checkpoint import load_model
from emcaps_cli.config import ModelConfig, parse_arch
from emcaps_cli.data.cache import load_cache
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.losses import spread_loss
from emcaps_cli.models import build_model

LAYERS = ("conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps")


def layer_gradients(model: torch.nn.Module, images, labels, margin: float):
    """{layer: flattened gradient of the spread loss} for one batch."""
    model.zero_grad(set_to_none=True)
    spread_loss(model(images), labels, margin).backward()
    return {
        name: torch.cat([p.grad.flatten() for p in getattr(model, name).parameters()])
        for name in LAYERS
    }


def probe(model: torch.nn.Module, batches, margin: float) -> dict:
    grads = [layer_gradients(model, x, y, margin) for x, y in batches]
    out = {}
    for name in LAYERS:
        norms = [float(g[name].norm()) for g in grads]
        cosines = [
            float(torch.nn.functional.cosine_similarity(a[name], b[name], dim=0))
            for a, b in itertools.pairwise(grads)
        ]
        out[name] = {"grad_norm": float(np.mean(norms)), "cosine": float(np.mean(cosines))}
    x, y = batches[0]
    health = capsule_health(model, x, y, spread_loss, margin)
    for name in ROUTING_LAYERS:
        for key in ("max_assignment", "max_assignment_uniform", "activation_std"):
            out[name][key] = health[name][key]
    return out


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    fields = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        fields[key.strip()] = json.loads(value) if value[:1] in "-0123456789[tfn" else value
    return name, fields


def make_model(args, fields: dict) -> torch.nn.Module:
    fields = dict(fields)
    w_scale = float(fields.pop("w_scale", 1.0))
    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        config = dataclasses.replace(model.config, **fields)
        state = model.state_dict()
        model = build_model(config)
        model.load_state_dict(state)
    else:
        torch.manual_seed(args.seed)
        model = build_model(ModelConfig(**{"arch": parse_arch(args.arch), **fields}))
    with torch.no_grad():
        for name in ROUTING_LAYERS:
            getattr(model, name).transforms.mul_(w_scale)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/smallnorb.h5"))
    p.add_argument("--arch", default="64,8,16,16")
    p.add_argument("--checkpoint", type=Path, help="probe these trained weights instead")
    p.add_argument("--set", action="append", default=[], type=parse_setting, dest="sets")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--margin", type=float, default=0.2)
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
    for name, fields in args.sets or [("defaults", {})]:
        result = probe(make_model(args, fields), batches, args.margin)
        rows.append({"name": name, "settings": fields, **result})
        cells = "  ".join(
            f"{layer} {result[layer]['grad_norm']:.2g} ({result[layer]['cosine']:+.2f})"
            for layer in LAYERS
        )
        routes = "  ".join(
            f"{layer} R {result[layer]['max_assignment']:.3f}"
            f" ({result[layer]['max_assignment'] / result[layer]['max_assignment_uniform']:.1f}x)"
            f" a-sd {result[layer]['activation_std']:.2f}"
            for layer in ROUTING_LAYERS
        )
        print(f"{name}: {cells}\n    {routes}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

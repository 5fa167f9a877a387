r"""Research screen of EM-routing variants: one short training run per call, one JSON line out.

This is a research screen, not a benchmark of the library and not its supported options. Each
call trains one network once (one seed; differences of a few points are noise) in-process
through `emcaps_cli.training.loop.train`, after monkeypatching library internals (`layers.route`,
`em.m_step`, `em.normalise_assignments`, `torch_backend.routing_iterations`) and handing
`train` its own `build_model` and `train_batch` (TRAIN_PARTS) to try variants that are mostly
not options of `emcaps train`. The patches are applied in `main` and never undone: one
process per run.

Knobs, set with `--set KEY=VALUE` (VALUE parsed as JSON when it can be, else a string) or all
at once as `--knobs '{...}'`. The defaults are those of the original screen, so a knob dict
means the same run as its line in benchmarks/screen_results.jsonl (the library's own defaults
have moved since: lr 3e-4 for the CNN, var_floor 0.1):

  model          "capsnet" or "cnn" (default capsnet)
  arch           [A, B, C, D] of Fig. 1, or "A,B,C,D" (default [64, 8, 16, 16])
  iters          EM routing iterations (default 3)
  epochs         training epochs (default 6; also --epochs)
  lr, lr_decay   Adam learning rate of the first epoch, × lr_decay per epoch (default 3e-3, 0.96)
  batch          images per optimiser step (default 32)
  seed           seed of the split, initialisation and augmentation (default 0)
  loss           "spread", "margin" or "cross-entropy" (default: spread, cross-entropy for cnn)
  limit_train    train on a random subset of this many images (also --limit-train)
  limit_test     test on a random subset of this many images (also --limit-test)
  noaug          train on centre crops, as for testing (TrainConfig augment=False)
  aug_crop_only  augment with the random crop only, without brightness and contrast
  augment_warmup epochs over which the augmentation grows from none (TrainConfig's field;
                 default 0, full from the first step, as the original screen)
  var_floor      added to every σ² of the M-step, set on each layer's RoutingSpec (default 1e-4)
  lambda         λ_max of every routing layer (default: the model's final_lambda, 0.01)
  conv_lambda    λ_max of the two conv-capsule layers (over `lambda`)
  class_lambda   λ_max of the class-capsule layer (over `lambda`)
  massnorm       divide the M-step's mass Σ_i R_ij a_i by n, the mean mass per parent with all
                 activations 1 (n = children / (L·J) with a child map, S / J for the class
                 layer): applied as λ/n and β_a·n
  ba_scale       β_a enters the routing multiplied by this (default 1)
  bu_scale       β_u enters the routing multiplied by this (default 1)
  conv_ba0       added to β_a of the conv-capsule layers (× n under massnorm)
  class_ba0      added to β_a of the class-capsule layer (× n under massnorm)
  conv_bu0       added to β_u of the conv-capsule layers
  class_bu0      added to β_u of the class-capsule layer
  kernels        routing backend: "c", "torch" or "auto" (default auto: C kernels on the CPU)
  detach_r       true: every E-step's R is a constant in the backward; "conv": only in the
                 conv-capsule layers (those with a child map)
  early          only the last E-step passes gradients (the R of earlier E-steps is detached)
  centre         the M-step's cost centred over the J parent types of each position
  relfloor       σ² gets a further floor of relfloor × the unweighted mean squared centred vote
                 of that parent (detached)
  class_w        re-initialise W of the class capsules as N(0, class_w²)
  conv_w         re-initialise W of both conv-capsule layers as N(0, conv_w²)
  prim_act_w     re-initialise the primary capsules' activation 1x1 conv as N(0, w²) with bias −1
                 (the released code's primary layer: weights std 3.0, sigmoid(x − 1))
  prim_pose_w    re-initialise the primary capsules' pose 1x1 conv as N(0, w²), bias 0
  bn1            BatchNorm2d after conv1 (before its ReLU), as some public implementations do
  likelihood_power  the model's E-step power τ (ModelConfig.likelihood_power; default 1, both
                 kernel paths)
  estep_temp     the same τ under the name its screen lines were recorded with (they ran on
                 the PyTorch routing, before the model field existed)
  lr_warm        the learning rate ramps linearly from 0 over the first lr_warm optimiser steps
  warm           routing iterations ramp 1, 2, ... up to iters_final, one more every `warm`
                 epochs (steps per epoch from the training-set size)
  iters_final    where `warm` stops (default: iters)

detach_r, early, centre and relfloor patch the PyTorch routing code, which the C kernels never
run: they switch `emcaps_cli.routing.c.routing_backend.set_backend("torch")` (4-7x slower on the
CPU: 110-220 s against ~30 s a run in the screen) and refuse kernels="c". The route patch
(λ, β, massnorm, var_floor) works on both backends. The capsule-health statistics in the run's
metrics.jsonl recompute each layer's routing from its own RoutingSpec: they see the M-step and
E-step patches but not the route patch (they, like config.json, have the library's var_floor).

Output, on stdout, one JSON line in the format of screen_results.jsonl: tag; K, the knob dict
as given (with --epochs / --limit-* when passed); test and train, the last epoch's test error
and training-batch error (%); curve, the test error (%) after every epoch; s, wall seconds of
training plus diagnostics; diag, the activation mean±std of the primary, conv-caps-1,
conv-caps-2 and class capsules on the first 64 test images ({} for the CNN). Progress goes to
stderr. The run directory is --out (default runs/screen/TAG), removed first.

Against the scratch harness that wrote screen_results.jsonl, the same knobs run the same
training, except that centre with relfloor now centres relfloor's cost (before, relfloor
discarded it; no recorded line has both). Its knobs detach_spec (dead) and spe (steps per
epoch, now computed) are gone.

    python benchmarks/screen_routing.py --tag vf1_noaug --set var_floor=0.1 --set noaug=true \
        --append benchmarks/screen_results.jsonl
    python benchmarks/screen_routing.py --tag cen_mn1 --epochs 10 \
        --knobs '{"centre": 1, "massnorm": 1, "lambda": 1.0}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emcaps_cli.capsules import em, layers
from emcaps_cli.checkpoint import LAST, load_checkpoint
from emcaps_cli.config import ModelConfig, TrainConfig, parse_arch
from emcaps_cli.data import transforms
from emcaps_cli.data.cache import load_cache
from emcaps_cli.errors import EmcapsError
from emcaps_cli.models import build_model
from emcaps_cli.routing import backend as routing_backend
from emcaps_cli.routing import torch_backend
from emcaps_cli.training import loop
from emcaps_cli.training.data import config_split
from emcaps_cli.training.rundir import METRICS_JSONL
from emcaps_cli.utils.reporter import Reporter

Knobs = dict[str, Any]

DEFAULT_DATA = Path("data/smallnorb.h5")
DEFAULT_RUNS = Path("runs/screen")
# The original screen's settings where a knob is not given (see the module doc).
DEFAULTS: Knobs = {
    "model": "capsnet",
    "arch": (64, 8, 16, 16),
    "iters": 3,
    "epochs": 6,
    "lr": 3e-3,
    "lr_decay": 0.96,
    "batch": 32,
    "seed": 0,
    "var_floor": 1e-4,
    "likelihood_power": 1.0,
    "augment_warmup": 0.0,
}
KNOBS = frozenset(DEFAULTS) | {
    "loss", "limit_train", "limit_test", "noaug", "aug_crop_only",
    "lambda", "conv_lambda", "class_lambda", "massnorm", "ba_scale", "bu_scale",
    "conv_ba0", "class_ba0", "conv_bu0", "class_bu0",
    "kernels", "detach_r", "early", "centre", "relfloor",
    "class_w", "conv_w", "warm", "iters_final",
    "prim_act_w", "prim_pose_w", "bn1", "lr_warm", "estep_temp",
}  # fmt: skip
# Patches the C kernels never see.
TORCH_ONLY = ("detach_r", "early", "centre", "relfloor")
# Knobs of the capsule routing or layers: meaningless for model=cnn.
CAPSNET_ONLY = KNOBS - {
    "model", "arch", "iters", "epochs", "lr", "lr_decay", "batch", "seed", "loss",
    "limit_train", "limit_test", "noaug", "aug_crop_only", "kernels", "lr_warm",
    "augment_warmup",
}  # fmt: skip
FLAG_KNOBS = ("epochs", "limit_train", "limit_test")  # knobs that have a flag of their own
DIAG_IMAGES = 64  # first test images of the activation summary
DIAG_LAYERS = {
    "prim": "primary_caps",
    "cc1": "conv_caps1",
    "cc2": "conv_caps2",
    "cls": "class_caps",
}
RUN_FILES = ("config.json", "metrics.jsonl", LAST)  # what marks a directory as a run directory
# The parts `loop.train` is given in place of the library's (build_model, train_batch).
TRAIN_PARTS: dict[str, Callable[..., Any]] = {}


class ScreenError(Exception):
    """A one-line error for the user (bad knob, unsafe --out)."""


# --- knobs -------------------------------------------------------------------------------------


def parse_set(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value): VALUE as JSON if it parses (1, 0.1, true, [1,2]), else str."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_knob_dict(text: str) -> Knobs:
    """`--knobs '{"massnorm": 1, ...}'`, the old harness's call style."""
    try:
        knobs = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({err})") from err
    if not isinstance(knobs, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object")
    return knobs


def collect_knobs(args: argparse.Namespace) -> Knobs:
    """--knobs, then --set, then the --epochs / --limit-* shorthands (recorded in K too)."""
    knobs = dict(args.knobs or {})
    knobs.update(args.sets or [])
    for key in FLAG_KNOBS:
        value = getattr(args, key)
        if value is None:
            continue
        if key in knobs and knobs[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ScreenError(f"{flag} {value} and knob {key}={knobs[key]}: give one")
        knobs[key] = value
    return knobs


def check_knobs(knobs: Knobs) -> None:
    """Refuse unknown knobs and combinations that would silently do something else."""
    unknown = sorted(set(knobs) - KNOBS)
    if unknown:
        raise ScreenError(f"unknown knob(s) {', '.join(unknown)}; see the module doc")
    if knobs.get("kernels", "auto") not in routing_backend.BACKENDS:
        raise ScreenError(f"kernels={knobs['kernels']}: expected one of c, torch, auto")
    if knobs.get("detach_r", False) not in (True, False, "conv"):  # 0 and 1 compare equal
        raise ScreenError(f'detach_r={knobs["detach_r"]}: expected true, false or "conv"')
    torch_only = [k for k in TORCH_ONLY if knobs.get(k)]
    if torch_only and knobs.get("kernels") == "c":
        raise ScreenError(f"{', '.join(torch_only)}: patch the torch routing; drop kernels=c")
    if knobs.get("noaug") and knobs.get("aug_crop_only"):
        raise ScreenError("noaug and aug_crop_only: give one")
    if "estep_temp" in knobs and "likelihood_power" in knobs:
        raise ScreenError("estep_temp and likelihood_power: the same τ, give one")
    if "iters_final" in knobs and not knobs.get("warm"):
        raise ScreenError("iters_final: only with warm")
    if knobs.get("warm") and not (isinstance(knobs["warm"], int) and knobs["warm"] >= 1):
        raise ScreenError(f"warm={knobs['warm']}: expected a whole number of epochs >= 1")
    capsnet_only = sorted(k for k in CAPSNET_ONLY if k in knobs)
    if knob(knobs, "model") != "capsnet" and capsnet_only:
        raise ScreenError(f"{', '.join(capsnet_only)}: capsule-network knobs with model=cnn")


def knob(knobs: Knobs, key: str) -> Any:
    """A knob's value, or the screen's default."""
    return knobs.get(key, DEFAULTS.get(key))


def train_config(knobs: Knobs, data: Path, out: Path) -> TrainConfig:
    """The TrainConfig a knob dict describes (the routing variants are patches, not options)."""
    arch = knob(knobs, "arch")
    model = ModelConfig(
        model=knob(knobs, "model"),
        arch=parse_arch(arch) if isinstance(arch, str) else tuple(arch),
        iters=knob(knobs, "iters"),
        likelihood_power=knobs.get("estep_temp", knob(knobs, "likelihood_power")),
    )
    return TrainConfig(
        data=str(data),
        out=str(out),
        model=model,
        loss=knobs.get("loss"),
        epochs=knob(knobs, "epochs"),
        batch_size=knob(knobs, "batch"),
        lr=knob(knobs, "lr"),
        lr_decay=knob(knobs, "lr_decay"),
        seed=knob(knobs, "seed"),
        limit_train=knobs.get("limit_train"),
        limit_test=knobs.get("limit_test"),
        augment=not knobs.get("noaug"),
        augment_warmup=knob(knobs, "augment_warmup"),
    )


# --- patches: each installs one variant, or nothing when its knob is absent ----------------------


def select_kernels(knobs: Knobs) -> None:
    """The torch routing for the patches the C kernels cannot see, else kernels= if given."""
    if any(knobs.get(k) for k in TORCH_ONLY):
        routing_backend.set_backend("torch")
    elif "kernels" in knobs:
        routing_backend.set_backend(knobs["kernels"])


def patch_route(knobs: Knobs) -> None:
    """λ_max, β and var_floor per layer kind, and massnorm, around `layers.route`.

    The class layer is the routing problem without a child map and with one parent position;
    every other one is a conv-capsule layer. With mass n, logit = (λ/n)(β_a·n − cost) =
    λ(β_a − cost/n): the cost is that of the mean parent's share of the mass.
    """
    original = layers.route
    ba_scale, bu_scale = knobs.get("ba_scale", 1.0), knobs.get("bu_scale", 1.0)
    var_floor = knob(knobs, "var_floor")

    def route(child_poses, transforms, activations_in, beta_u, beta_a, spec, vote_offset=None):
        _, l, s, _ = child_poses.shape  # (N, L, S, 16)
        j = beta_a.shape[0]
        kind = "class_" if spec.child_map is None and l == 1 else "conv_"
        lam = knobs.get(kind + "lambda", knobs.get("lambda", spec.final_lambda))
        mass = 1.0
        if knobs.get("massnorm"):
            mass = spec.child_map.num_children / (l * j) if spec.child_map is not None else s / j
        beta_a = (beta_a * ba_scale + knobs.get(kind + "ba0", 0.0)) * mass
        beta_u = beta_u * bu_scale + knobs.get(kind + "bu0", 0.0)
        spec = dataclasses.replace(spec, final_lambda=lam / mass, var_floor=var_floor)
        return original(child_poses, transforms, activations_in, beta_u, beta_a, spec, vote_offset)

    layers.route = route


def patch_detach_assignments(knobs: Knobs) -> None:
    """detach_r: the E-step's R (N, L, J, S) a constant in the backward pass."""
    mode = knobs.get("detach_r")
    if not mode:
        return
    original = em.normalise_assignments

    def normalise_assignments(logits, child_map):
        assignments = original(logits, child_map)
        if mode == "conv" and child_map is None:  # the class layer keeps its gradient
            return assignments
        return assignments.detach()

    em.normalise_assignments = normalise_assignments


def routing_iterations_last_e_step(
    ops,
    activations_in,
    beta_u,
    beta_a,
    iters,
    final_lambda,
    child_map,
    return_assignments=False,
    var_floor=em.VAR_FLOOR,
    trace=None,
    likelihood_power=1.0,
):
    """`em.routing_iterations` with the R of every E-step but the last detached."""
    n, l, j, s, _ = ops.v.shape
    assignments = em.initial_assignments((n, l, j, s), child_map, ops.v)  # (N, L, J, S)
    for t, lam in enumerate(em.inverse_temperatures(iters, final_lambda)):
        mean, variance, logit = em.m_step(
            assignments, activations_in, ops, beta_u, beta_a, lam, var_floor
        )
        if trace is not None:
            trace.append(em.RoutingStep(assignments, variance, logit))
        if t < iters - 1 or return_assignments:
            log_a = F.logsigmoid(logit)
            logits = em.e_step_logits(mean, variance, log_a, ops, likelihood_power)
            assignments = em.normalise_assignments(logits, child_map)
            if t < iters - 2:
                assignments = assignments.detach()
    return mean, logit, assignments if return_assignments else None


def patch_early(knobs: Knobs) -> None:
    """early: only the last E-step passes gradients (in the layers' fused routing)."""
    if knobs.get("early"):
        torch_backend.routing_iterations = routing_iterations_last_e_step


def patch_relative_floor(knobs: Knobs) -> None:
    """relfloor: σ² += relfloor × mean_s v² of the parent's centred votes (detached)."""
    factor = knobs.get("relfloor")
    if not factor:
        return
    original = em.m_step

    def m_step(assignments, activations_in, ops, beta_u, beta_a, lam, var_floor=em.VAR_FLOOR):
        with torch.no_grad():
            floor = ops.v.square().mean(-2) * factor  # (N, L, J, H)
        mean, variance, _ = original(assignments, activations_in, ops, beta_u, beta_a, lam, 0.0)
        variance = variance + floor + var_floor  # (N, L, J, H)
        amount = (assignments * activations_in.unsqueeze(2)).sum(-1)  # Σ_i R_ij a_i: (N, L, J)
        cost = ((beta_u.view(-1, 1) + 0.5 * variance.log()) * amount.unsqueeze(-1)).sum(-1)
        return mean, variance, lam * (beta_a - cost)

    em.m_step = m_step


def patch_centred_cost(knobs: Knobs) -> None:
    """centre: logit λ(β_a − (cost_j − mean_k cost_k)) over the J types at each position.

    Installed after patch_relative_floor, so it centres that patch's cost when both are on.
    """
    if not knobs.get("centre"):
        return
    original = em.m_step

    def m_step(assignments, activations_in, ops, beta_u, beta_a, lam, var_floor=em.VAR_FLOOR):
        mean, variance, logit = original(
            assignments, activations_in, ops, beta_u, beta_a, lam, var_floor
        )
        cost = beta_a - logit / lam  # (N, L, J)
        cost = cost - cost.mean(-1, keepdim=True)
        return mean, variance, lam * (beta_a - cost)

    em.m_step = m_step


def wrap_build_model(extend: Callable[[torch.nn.Module], None]) -> None:
    """Make training's build_model call `extend` on every capsule network it builds."""
    original = TRAIN_PARTS.get("build_model", build_model)

    def build(config: ModelConfig) -> torch.nn.Module:
        model = original(config)
        if config.model == "capsnet":
            extend(model)
        return model

    TRAIN_PARTS["build_model"] = build


def patch_transform_init(knobs: Knobs) -> None:
    """class_w / conv_w: W ~ N(0, std²) instead of N(0, 1/row_len)."""
    if "class_w" not in knobs and "conv_w" not in knobs:
        return

    @torch.no_grad()
    def reinitialise(model: torch.nn.Module) -> None:
        if "class_w" in knobs:
            model.class_caps.transforms.normal_(0, knobs["class_w"])
        if "conv_w" in knobs:
            model.conv_caps1.transforms.normal_(0, knobs["conv_w"])
            model.conv_caps2.transforms.normal_(0, knobs["conv_w"])

    wrap_build_model(reinitialise)


def patch_primary_init(knobs: Knobs) -> None:
    """prim_act_w / prim_pose_w: the primary capsules' 1x1 convolutions re-initialised."""
    if "prim_act_w" not in knobs and "prim_pose_w" not in knobs:
        return

    @torch.no_grad()
    def reinitialise(model: torch.nn.Module) -> None:
        if "prim_act_w" in knobs:
            model.primary_caps.activation.weight.normal_(0, knobs["prim_act_w"])
            model.primary_caps.activation.bias.fill_(-1.0)
        if "prim_pose_w" in knobs:
            model.primary_caps.pose.weight.normal_(0, knobs["prim_pose_w"])
            model.primary_caps.pose.bias.zero_()

    wrap_build_model(reinitialise)


def patch_batch_norm(knobs: Knobs) -> None:
    """bn1: conv1 becomes conv1 followed by BatchNorm2d."""
    if not knobs.get("bn1"):
        return

    def add_norm(model: torch.nn.Module) -> None:
        conv = model.conv1
        model.conv1 = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(conv.out_channels))

    wrap_build_model(add_norm)


def patch_lr_warm_up(knobs: Knobs) -> None:
    """lr_warm: every Adam step k (1-based) uses lr · min(1, k / lr_warm)."""
    ramp = knobs.get("lr_warm")
    if not ramp:
        return
    base = torch.optim.Adam

    class WarmAdam(base):
        steps = 0

        def step(self, closure=None):  # type: ignore[override]
            self.steps += 1
            factor = min(1.0, self.steps / ramp)
            saved = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = group["lr"] * factor
            try:
                return super().step(closure)
            finally:
                for group, lr in zip(self.param_groups, saved, strict=True):
                    group["lr"] = lr

    torch.optim.Adam = WarmAdam  # training builds its optimiser as torch.optim.Adam


def steps_per_epoch(config: TrainConfig) -> int:
    """Optimiser steps per epoch of a single-process run of `config` (as training counts them)."""
    rows = config_split(config, load_cache(config.data))
    return math.ceil(len(rows.train) / config.batch_size)


def patch_warm_up(knobs: Knobs, config: TrainConfig) -> None:
    """warm: before training step k, every routing layer runs min(iters_final, 1 + e // warm)
    iterations, e = k // steps per epoch; evaluation uses the last training step's count."""
    warm = knobs.get("warm")
    if not warm:
        return
    final = knobs.get("iters_final", knob(knobs, "iters"))
    per_epoch = steps_per_epoch(config)

    def add_schedule(model: torch.nn.Module) -> None:
        steps = 0

        def set_iterations(module: torch.nn.Module, inputs: Any) -> None:
            nonlocal steps
            if not module.training:  # evaluation; capsule_health calls forward_layers
                return
            iters = min(final, 1 + (steps // per_epoch) // warm)
            for layer in (module.conv_caps1, module.conv_caps2, module.class_caps):
                layer.iters = iters
            steps += 1

        model.register_forward_pre_hook(set_iterations)

    wrap_build_model(add_schedule)


def crop_only_batch(
    images: torch.Tensor,
    channels: int,
    generator: torch.Generator,
    size: int = 32,
    strength: float = 1.0,
    order: str = "image",
) -> torch.Tensor:
    """`transforms.train_batch` without the brightness and contrast jitter (with order
    "crop" it has none anyway)."""
    if order == "crop":
        return transforms.train_batch(images, channels, generator, size, strength, order)
    x = transforms.standardize(transforms.select_channels(images, channels))
    return transforms.random_crop(x, size, generator, reach=strength)


def patch_crop_only(knobs: Knobs) -> None:
    """aug_crop_only: training batches get the random crop only."""
    if knobs.get("aug_crop_only"):
        TRAIN_PARTS["train_batch"] = crop_only_batch


def apply_patches(knobs: Knobs, config: TrainConfig) -> None:
    select_kernels(knobs)
    patch_route(knobs)
    patch_detach_assignments(knobs)
    patch_early(knobs)
    patch_relative_floor(knobs)
    patch_centred_cost(knobs)  # after relfloor: centres its cost
    patch_transform_init(knobs)
    patch_primary_init(knobs)
    patch_batch_norm(knobs)
    patch_lr_warm_up(knobs)
    patch_warm_up(knobs, config)
    patch_crop_only(knobs)


# --- run and report ----------------------------------------------------------------------------


class EpochLines(Reporter):
    """One progress line per epoch on stderr."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        print(
            f"{self.tag}: epoch {metrics['epoch']}: test {100 * metrics['test_error']:.1f} %, "
            f"train {100 * metrics['train_error']:.1f} %",
            file=sys.stderr,
            flush=True,
        )


def clear_run_dir(out: Path) -> None:
    """Remove a previous run in `out`; refuse a directory that does not look like one."""
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not any((out / f).exists() for f in RUN_FILES)):
        raise ScreenError(f"--out {out}: exists and is not a run directory; not removing it")
    shutil.rmtree(out)


@torch.no_grad()
def activation_summary(run_dir: Path, data: Path) -> dict[str, str]:
    """Activation mean±std of every capsule layer on the first DIAG_IMAGES test images, from
    the run's last.pt (routed through the same patches as the training)."""
    checkpoint = load_checkpoint(run_dir / LAST)
    model = build_model(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model_state"])
    model.eval()
    images = load_cache(data).test.images[:DIAG_IMAGES]
    x = transforms.eval_batch(
        torch.from_numpy(np.ascontiguousarray(images)),
        model.config.channels,
        order=model.config.standardize,
    )
    outputs = model.forward_layers(x)  # name -> (poses, activations)
    stats = {short: outputs[name][1] for short, name in DIAG_LAYERS.items()}
    return {short: f"{a.mean().item():.2f}±{a.std().item():.2f}" for short, a in stats.items()}


def test_curve(run_dir: Path) -> list[float]:
    """Test error (%) after every epoch, from metrics.jsonl."""
    lines = (run_dir / METRICS_JSONL).read_text().splitlines()
    return [round(json.loads(line)["test_error"] * 100, 1) for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Knobs and output: see the module docstring (benchmarks/screen_routing.py).",
    )
    p.add_argument("--tag", required=True, help="name of the run and of its result line")
    p.add_argument(
        "--set",
        dest="sets",
        type=parse_set,
        action="append",
        metavar="KEY=VALUE",
        help="a knob, repeatable; VALUE is parsed as JSON when it can be, else a string",
    )
    p.add_argument("--knobs", type=parse_knob_dict, metavar="JSON", help="knobs as one JSON object")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="HDF5 cache (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, help="the epochs knob (default 6)")
    p.add_argument("--limit-train", type=int, metavar="N", help="the limit_train knob")
    p.add_argument("--limit-test", type=int, metavar="N", help="the limit_test knob")
    p.add_argument(
        "--out", type=Path, help=f"run directory, removed first (default: {DEFAULT_RUNS}/TAG)"
    )
    p.add_argument("--append", type=Path, metavar="PATH", help="append the JSON line to PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.tag or Path(args.tag).name != args.tag:
            raise ScreenError(f"--tag {args.tag!r}: expected a plain name (no '/')")
        knobs = collect_knobs(args)
        check_knobs(knobs)
        out = args.out or DEFAULT_RUNS / args.tag
        config = train_config(knobs, args.data, out)
        apply_patches(knobs, config)
        clear_run_dir(out)
    except (ScreenError, EmcapsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = loop.train(config, reporter=EpochLines(args.tag), **TRAIN_PARTS)
        diag = activation_summary(out, args.data) if config.model.model == "capsnet" else {}
    except EmcapsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    last = result.last_metrics
    line = json.dumps(
        {
            "tag": args.tag,
            "K": knobs,
            "test": round(last["test_error"] * 100, 1),
            "train": round(last["train_error"] * 100, 1),
            "curve": test_curve(out),
            "s": round(time.perf_counter() - start),
            "diag": diag,
        }
    )
    print(line, flush=True)
    if args.append:
        with args.append.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

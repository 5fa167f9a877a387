"""benchmarks/recipe_step.py: the speed benchmarks time the step `emcaps train` takes."""

from __future__ import annotations

import torch
from conftest import load_benchmark

from emcaps_cli.config import ModelConfig, TrainConfig, parse_arch
from emcaps_cli.models import build_model
from emcaps_cli.training.schedule import parameter_groups


def _step(**options):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=parse_arch("8,4,4,4")))
    x = torch.randn(4, 2, 32, 32)  # (N, 2, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    return load_benchmark("recipe_step").RecipeStep(model, x, y, **options)


def _grad_norm(model) -> float:
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


def test_the_step_clips_to_the_recipe_norm_and_uses_its_learning_rate_groups():
    recipe = TrainConfig().resolved()
    step = _step()
    assert step.clip_norm == recipe.grad_clip > 0
    step.backward(step.forward())
    raw = _grad_norm(step.model)
    step.clip()
    assert _grad_norm(step.model) <= min(raw, step.clip_norm) * (1 + 1e-5)
    expected = parameter_groups(step.model, recipe.front_lr_scale)
    assert [len(g["params"]) for g in step.optimiser.param_groups] == [
        len(g["params"]) for g in expected
    ]


def test_a_whole_step_moves_the_weights_and_their_average():
    step = _step(grad_clip=0)
    assert step.clip_norm == 0
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    step()
    step()
    assert step.steps == 2
    name = next(n for n, _ in step.model.named_parameters())  # conv1's weight
    moved = step.model.state_dict()[name]
    averaged = step.average.state[name]
    assert not torch.equal(moved, before[name])
    assert not torch.equal(averaged, before[name]) and not torch.equal(averaged, moved)

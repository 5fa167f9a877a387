"""Capsule-health diagnostics: the statistics mean what docs/training.md says they mean."""

import math

import pytest
import torch

from emcaps_cli.capsules.geometry import conv_child_map
from emcaps_cli.capsules.health import LAYERS, ROUTING_LAYERS, assignment_stats, capsule_health
from emcaps_cli.config import ModelConfig
from emcaps_cli.losses import spread_loss
from emcaps_cli.models import build_model


def test_uniform_assignments_have_full_entropy_and_the_smallest_maximum():
    r = torch.full((2, 1, 4, 6), 0.25)  # 6 children, each spread evenly over 4 parents
    largest, entropy = assignment_stats(r, None)
    assert largest == pytest.approx(0.25)
    assert entropy == pytest.approx(1.0)


def test_one_hot_assignments_have_zero_entropy():
    r = torch.zeros(1, 1, 3, 5)
    r[:, :, 1] = 1.0
    largest, entropy = assignment_stats(r, None)
    assert (largest, entropy) == (pytest.approx(1.0), pytest.approx(0.0))


def test_exact_routing_counts_every_parent_of_a_child():
    """With a child map a child's assignments span all parent positions holding it: uniform
    R = 1/(J * count) is full entropy, whatever the child's count."""
    cmap = conv_child_map(4, 4, 3, 1, 1)  # 2x2 parent positions, 9 slots each
    j = 2
    count = cmap.parent_count.view(1, 4, 1, 9)
    r = (1.0 / (j * count)).expand(1, 4, j, 9)
    largest, entropy = assignment_stats(r, cmap)
    assert entropy == pytest.approx(1.0)
    centre = 1.0 / (j * 4)  # the middle child is held by all four positions
    assert largest > centre


def test_capsule_health_reports_every_layer_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2))
    images = torch.randn(6, 2, 32, 32)
    labels = torch.randint(0, 5, (6,))
    before = [p.grad for p in model.parameters()]
    health = capsule_health(model, images, labels, spread_loss, 0.2)
    assert [p.grad for p in model.parameters()] == before  # all None: nothing written
    assert set(health) == set(LAYERS)
    for name in ROUTING_LAYERS:
        stats = health[name]
        assert 0 < stats["activation_mean"] < 1
        assert 0 <= stats["assignment_entropy"] <= 1 + 1e-6
        assert 0 < stats["max_assignment"] <= 1
        # no child's largest R is below its uniform share
        assert 0 < stats["max_assignment_uniform"] <= stats["max_assignment"] + 1e-6
        assert all(math.isfinite(v) for v in stats.values())
    assert all(health[name]["grad_norm"] > 0 for name in LAYERS)


def test_a_larger_variance_floor_shows_as_softer_routing():
    """The diagnostic must move with the thing it measures: a floor far above the votes'
    spread keeps assignments near uniform."""
    images = torch.randn(4, 2, 32, 32)
    labels = torch.randint(0, 5, (4,))

    def entropy(var_floor):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=3, var_floor=var_floor))
        return capsule_health(model, images, labels, spread_loss, 0.2)["class_caps"]

    hard, soft = entropy(1e-4), entropy(10.0)
    assert soft["assignment_entropy"] > hard["assignment_entropy"]
    assert soft["assignment_entropy"] > 0.99
    assert soft["log_sigma"] > hard["log_sigma"]

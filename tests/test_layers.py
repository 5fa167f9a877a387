"""Capsule layers and the network of Fig. 1: votes, Coordinate Addition, shapes, parameters."""

import pytest
import torch

from emcaps_cli.capsules.geometry import patch_positions, receptive_field_centres
from emcaps_cli.capsules.layers import ClassCaps, ConvCaps, PrimaryCaps
from emcaps_cli.config import ModelConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.models import build_model, count_parameters

D = torch.float64


@pytest.mark.parametrize("pose,rows,q", [("matrix", 4, 4), ("vector", 1, 16)])
def test_conv_votes_are_pose_times_transform(pose, rows, q):
    layer = ConvCaps(2, 3, kernel=3, stride=2, pose=pose).double()
    poses = torch.randn(2, 5, 5, 2, 16, dtype=D)
    votes = layer.votes(poses)  # (N, L, J, K*K*B, 16)
    positions = patch_positions(5, 5, 3, 2)
    assert votes.shape == (2, 4, 3, 18, 16)
    for n in range(2):
        for l in range(4):
            for offset in range(9):
                p = positions[l, offset]
                for t in range(2):
                    m = poses[n, p // 5, p % 5, t].reshape(rows, q)
                    for j in range(3):
                        expected = (m @ layer.transforms[offset * 2 + t, j]).reshape(16)
                        torch.testing.assert_close(votes[n, l, j, offset * 2 + t], expected)


def test_coordinate_addition_adds_scaled_centre_to_right_column():
    with_ca = ClassCaps(3, 5, coord_add=True).double()
    without = ClassCaps(3, 5, coord_add=False).double()
    without.load_state_dict(with_ca.state_dict())
    coords = torch.rand(4, 2, dtype=D)
    with_ca.coordinates = coords
    poses = torch.randn(2, 2, 2, 3, 16, dtype=D)
    diff = (with_ca.votes(poses) - without.votes(poses)).reshape(2, 5, 4, 3, 16)
    expected = torch.zeros(4, 16, dtype=D)
    expected[:, 3], expected[:, 7] = coords[:, 0], coords[:, 1]  # M[0, 3] and M[1, 3]
    torch.testing.assert_close(diff, expected[None, None, :, None].expand_as(diff))


def test_class_capsules_share_transforms_across_positions():
    layer = ClassCaps(2, 5, coord_add=False).double()
    poses = torch.randn(1, 2, 2, 2, 16, dtype=D)
    poses[0, 1, 1] = poses[0, 0, 0]
    votes = layer.votes(poses).reshape(1, 5, 4, 2, 16)
    torch.testing.assert_close(votes[:, :, 0], votes[:, :, 3])


def test_receptive_field_centres_of_the_paper_network():
    centres = receptive_field_centres(32, [(5, 2), (1, 1), (3, 2), (3, 1)])
    # conv1 cell o covers pixels 2o..2o+4; conv caps 2 cell q ends up centred on pixel 4q + 8.
    torch.testing.assert_close(centres, torch.tensor([8.5, 12.5, 16.5, 20.5]))


def test_primary_capsules_shapes_and_activation_range():
    layer = PrimaryCaps(8, 4)
    poses, acts = layer(torch.randn(3, 8, 14, 14))
    assert poses.shape == (3, 14, 14, 4, 16) and acts.shape == (3, 14, 14, 4)
    assert ((acts > 0) & (acts < 1)).all()


@pytest.mark.parametrize(
    "arch,expected,tolerance",
    [((32, 32, 32, 32), 310_000, 0.03), ((64, 8, 16, 16), 68_000, 0.03)],
)
def test_parameter_counts_match_the_paper(arch, expected, tolerance):
    n = count_parameters(build_model(ModelConfig(arch=arch)))
    assert abs(n - expected) / expected < tolerance, n


def test_baseline_cnn_has_about_4_2m_parameters():
    n = count_parameters(build_model(ModelConfig(model="cnn")))
    assert abs(n - 4_200_000) / 4_200_000 < 0.03, n


@pytest.mark.parametrize("pose", ["matrix", "vector"])
@pytest.mark.parametrize("routing", ["exact", "patch"])
def test_network_forward_shapes_and_range(pose, routing):
    model = build_model(
        ModelConfig(arch=(8, 4, 4, 4), iters=2, pose=pose, routing=routing, channels=1)
    )
    out = model.forward_all(torch.randn(2, 1, 32, 32))
    assert out["activations"].shape == (2, 5) and out["poses"].shape == (2, 5, 16)
    assert ((out["activations"] > 0) & (out["activations"] < 1)).all()
    assert model.grid_sizes() == [14, 14, 6, 4]


def test_network_is_dtype_agnostic_and_differentiable():
    model = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2)).double()
    x = torch.randn(2, 2, 32, 32, dtype=D, requires_grad=True)
    scores = model(x)
    assert scores.dtype == D
    scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_network_trains_after_running_under_inference_mode(kernels):
    """Cached geometry (and the C kernels' workspace) made under torch.inference_mode must not
    turn into inference tensors that a later backward would need."""
    from emcaps_cli.config import ModelConfig, parse_arch
    from emcaps_cli.models import build_model

    model = build_model(ModelConfig(arch=parse_arch("8,4,4,4"), iters=1))
    x = torch.randn(2, 2, 32, 32)
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_conv_final_lambda_sets_the_conv_capsule_layers_only() -> None:
    config = ModelConfig(arch=(8, 4, 4, 4), iters=2, conv_final_lambda=0.3)
    net = build_model(config)
    assert (net.conv_caps1.final_lambda, net.conv_caps2.final_lambda) == (0.3, 0.3)
    assert net.class_caps.final_lambda == config.final_lambda == 0.03
    default = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2))
    assert default.conv_caps1.final_lambda == 0.3
    paper = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2, conv_final_lambda=None))
    assert paper.conv_caps1.final_lambda == 0.03
    with pytest.raises(EmcapsError, match="--conv-final-lambda"):
        ModelConfig(conv_final_lambda=0.0)


def test_conv_lambda_by_width_scales_each_conv_layer_by_parent_over_child_types() -> None:
    # A parent's expected share of its children grows with child types / parent types, so
    # λ_max × (parent types / child types) keeps the cost term's reach the same at any widths.
    narrow = ModelConfig(arch=(8, 2, 4, 8), iters=2, conv_final_lambda=0.3)
    assert narrow.conv_lambdas() == pytest.approx((0.3 * 4 / 2, 0.3 * 8 / 4))
    net = build_model(narrow)
    assert net.conv_caps1.final_lambda == pytest.approx(0.6)
    assert net.conv_caps2.final_lambda == pytest.approx(0.6)
    assert net.class_caps.final_lambda == narrow.final_lambda  # the class layer is not scaled
    equal = ModelConfig(arch=(32, 32, 32, 32))  # the paper model: every factor is exactly 1
    assert equal.conv_lambdas() == (equal.conv_final_lambda, equal.conv_final_lambda)
    one = ModelConfig(arch=(8, 2, 4, 8), conv_final_lambda=0.3, conv_lambda_by_width=False)
    assert one.conv_lambdas() == (0.3, 0.3)


def test_class_beta_a_scale_multiplies_the_class_layers_threshold_only() -> None:
    """β_a = scale × parameter: the same network as the plain parameter holding scale × the
    value, with a gradient scale times as large on the parameter and none changed elsewhere."""
    layer, other = "class_caps", "conv_caps1"
    torch.manual_seed(0)
    scaled = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2, class_beta_a_scale=1000.0))
    plain = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2, class_beta_a_scale=1.0))
    plain.load_state_dict(scaled.state_dict())
    scaled_beta = getattr(scaled, layer).beta_a
    plain_beta = getattr(plain, layer).beta_a
    with torch.no_grad():
        scaled_beta.copy_(torch.linspace(-1.0, 1.0, scaled_beta.numel()) * 1e-3)
        plain_beta.copy_(scaled_beta * 1000)
    x = torch.randn(3, 2, 32, 32)
    out_scaled, out_plain = scaled(x), plain(x)
    torch.testing.assert_close(out_scaled, out_plain)
    out_scaled.sum().backward()
    out_plain.sum().backward()
    torch.testing.assert_close(scaled_beta.grad, 1000 * plain_beta.grad, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        getattr(scaled, other).beta_a.grad, getattr(plain, other).beta_a.grad
    )


def test_beta_a_scale_defaults_by_parametrisation() -> None:
    assert ModelConfig().class_beta_a_scale == 1000.0
    assert ModelConfig(parametrisation="released").class_beta_a_scale == 1.0
    with pytest.raises(EmcapsError, match="--class-beta-a-scale"):
        ModelConfig(class_beta_a_scale=0.0)


def test_class_iters_sets_the_class_capsule_layer_only() -> None:
    config = ModelConfig(arch=(8, 4, 4, 4), iters=3, class_iters=2)
    net = build_model(config)
    assert (net.conv_caps1.iters, net.conv_caps2.iters, net.class_caps.iters) == (3, 3, 2)
    same = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=3))
    assert same.class_caps.iters == 3  # unset: every layer runs --iters, as the paper
    with pytest.raises(EmcapsError, match="--class-iters 0"):
        ModelConfig(class_iters=0)

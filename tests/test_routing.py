"""EM routing (Procedure 1): the fast implementation against the loop reference, gradients,
invariants and numerical stability."""

import pytest
import torch

from emcaps_cli.capsules.em import VAR_FLOOR, em_routing, inverse_temperatures
from emcaps_cli.capsules.geometry import conv_child_map
from emcaps_cli.capsules.layers import ConvCaps
from emcaps_cli.capsules.reference import dense_conv_problem, reference_em_routing

D = torch.float64


def fc_problem(n=2, s=7, j=3, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(n, 1, j, s, h, generator=g, dtype=D)
    acts = torch.rand(n, 1, s, generator=g, dtype=D)
    beta_u = torch.randn(j, generator=g, dtype=D) * 0.5
    beta_a = torch.randn(j, generator=g, dtype=D) * 0.5
    return votes, acts, beta_u, beta_a


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
@pytest.mark.parametrize("final_lambda", [0.01, 1.0])
def test_fully_connected_routing_matches_procedure_1(iters, final_lambda):
    votes, acts, beta_u, beta_a = fc_problem()
    poses, a, R = em_routing(
        votes, acts, beta_u, beta_a, iters, final_lambda, return_assignments=True
    )
    for n in range(votes.shape[0]):
        connected = torch.ones(votes.shape[3], votes.shape[2], dtype=torch.bool)
        ref_mu, ref_a, ref_R = reference_em_routing(
            votes[n, 0].transpose(0, 1),
            acts[n, 0],
            connected,
            beta_u,
            beta_a,
            iters,
            final_lambda,
        )
        torch.testing.assert_close(poses[n, 0], ref_mu, atol=1e-6, rtol=0)
        torch.testing.assert_close(a[n, 0], ref_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(R[n, 0].transpose(0, 1), ref_R, atol=1e-6, rtol=0)


def small_conv_layer(
    routing,
    stride,
    pose="matrix",
    in_types=2,
    out_types=3,
    seed=0,
    var_floor=VAR_FLOOR,
    likelihood_power=1.0,
):
    torch.manual_seed(seed)
    layer = ConvCaps(
        in_types,
        out_types,
        kernel=3,
        stride=stride,
        iters=3,
        pose=pose,
        routing=routing,
        final_lambda=0.5,
        var_floor=var_floor,
        likelihood_power=likelihood_power,
    ).double()
    with torch.no_grad():
        layer.beta_u.normal_(0, 0.5)
        layer.beta_a.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("stride,side", [(1, 5), (2, 7)])
@pytest.mark.parametrize("pose", ["matrix", "vector"])
@pytest.mark.parametrize("var_floor,power", [(VAR_FLOOR, 1.0), (0.3, 1.0), (0.1, 0.3)])
def test_exact_conv_routing_matches_reference_over_whole_grid(
    stride, side, pose, var_floor, power, kernels
):
    """Also with a variance floor far above the default (the M-step adds it to every σ²) and
    with a tempered E-step (R ∝ a p^τ)."""
    layer = small_conv_layer("exact", stride, pose, var_floor=var_floor, likelihood_power=power)
    g = torch.Generator().manual_seed(1)
    poses = torch.randn(1, side, side, 2, 16, generator=g, dtype=D)
    acts = torch.rand(1, side, side, 2, generator=g, dtype=D)
    out_poses, out_acts = layer(poses, acts)
    votes, a, connected = dense_conv_problem(
        poses[0], acts[0], layer.transforms.detach(), 3, stride, layer.rows, layer.row_len
    )
    ref_mu, ref_a, _ = reference_em_routing(
        votes,
        a,
        connected,
        layer.beta_u.detach().repeat(votes.shape[1] // 3),
        layer.beta_a.detach().repeat(votes.shape[1] // 3),
        3,
        0.5,
        var_floor,
        power,
    )
    torch.testing.assert_close(out_poses.reshape(-1, 16), ref_mu, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_acts.reshape(-1), ref_a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stride,side", [(1, 5), (2, 7)])
def test_patch_conv_routing_matches_reference_patch_by_patch(stride, side, kernels):
    layer = small_conv_layer("patch", stride)
    g = torch.Generator().manual_seed(2)
    poses = torch.randn(1, side, side, 2, 16, generator=g, dtype=D)
    acts = torch.rand(1, side, side, 2, generator=g, dtype=D)
    out_poses, out_acts = layer(poses, acts)
    out_side = out_poses.shape[1]
    votes, a, connected = dense_conv_problem(
        poses[0], acts[0], layer.transforms.detach(), 3, stride, layer.rows, layer.row_len
    )
    for l in range(out_side * out_side):
        parents = torch.arange(l * 3, l * 3 + 3)
        children = connected[:, parents[0]].nonzero().squeeze(1)
        ref_mu, ref_a, _ = reference_em_routing(
            votes[children][:, parents],
            a[children],
            torch.ones(len(children), 3, dtype=torch.bool),
            layer.beta_u.detach(),
            layer.beta_a.detach(),
            3,
            0.5,
        )
        torch.testing.assert_close(out_poses.reshape(-1, 3, 16)[l], ref_mu, atol=1e-6, rtol=0)
        torch.testing.assert_close(out_acts.reshape(-1, 3)[l], ref_a, atol=1e-6, rtol=0)


def test_exact_and_patch_routing_differ_when_fields_overlap():
    exact = small_conv_layer("exact", 1)
    patch = small_conv_layer("patch", 1)
    patch.load_state_dict(exact.state_dict())
    g = torch.Generator().manual_seed(3)
    poses = torch.randn(1, 5, 5, 2, 16, generator=g, dtype=D)
    acts = torch.rand(1, 5, 5, 2, generator=g, dtype=D)
    assert not torch.allclose(exact(poses, acts)[1], patch(poses, acts)[1], atol=1e-4)


def test_gradcheck_fully_connected():
    votes, acts, beta_u, beta_a = fc_problem(n=1, s=4, j=2, h=3)
    inputs = tuple(t.clone().requires_grad_(True) for t in (votes, acts, beta_u, beta_a))
    assert torch.autograd.gradcheck(
        lambda v, a, bu, ba: em_routing(v, a, bu, ba, 3, 1.0), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.slow
def test_gradcheck_exact_convolutional():
    side, k, b, j = 4, 3, 2, 2
    child_map = conv_child_map(side, side, k, 1, b)
    n_pos = (side - k + 1) ** 2
    g = torch.Generator().manual_seed(4)
    votes = torch.randn(1, n_pos, j, k * k * b, 2, generator=g, dtype=D, requires_grad=True)
    acts = torch.rand(1, n_pos, k * k * b, generator=g, dtype=D, requires_grad=True)
    beta_u = torch.zeros(j, dtype=D, requires_grad=True)
    beta_a = torch.zeros(j, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, a, bu, ba: em_routing(v, a, bu, ba, 2, 1.0, child_map),
        (votes, acts, beta_u, beta_a),
        eps=1e-6,
        atol=1e-5,
    )


def test_each_childs_assignments_sum_to_one_over_all_its_parents():
    side, k, b, j = 6, 3, 2, 3
    child_map = conv_child_map(side, side, k, 1, b)
    n_pos = (side - k + 1) ** 2
    votes = torch.randn(2, n_pos, j, k * k * b, 16, dtype=D)
    acts = torch.rand(2, n_pos, k * k * b, dtype=D)
    _, a, R = em_routing(
        votes,
        acts,
        torch.zeros(j, dtype=D),
        torch.zeros(j, dtype=D),
        3,
        0.01,
        child_map,
        return_assignments=True,
    )
    per_slot = R.sum(dim=2).reshape(2, -1)  # (N, L*S)
    per_child = torch.zeros(2, child_map.num_children, dtype=D).index_add(
        1, child_map.index, per_slot
    )
    torch.testing.assert_close(per_child, torch.ones_like(per_child))
    assert ((a > 0) & (a < 1)).all()


def test_border_children_have_fewer_parents():
    child_map = conv_child_map(5, 5, 3, 1, types=1)
    counts = torch.zeros(25).index_put_((child_map.index,), child_map.parent_count)
    counts = counts.reshape(5, 5)
    assert counts[0, 0] == 1 and counts[0, 2] == 3 and counts[2, 2] == 9
    # "corner ones receiving only one feedback per capsule type"
    assert (counts[[0, 0, 4, 4], [0, 4, 0, 4]] == 1).all()


def test_initial_assignments_are_uniform_over_actual_parents():
    # With one iteration the M-step sees only the initial R: a corner child (1 parent position)
    # carries weight 1/J, a centre child 1/(9J). Check via the parent's amount of data.
    side, k, b, j = 5, 3, 1, 2
    child_map = conv_child_map(side, side, k, 1, b)
    from emcaps_cli.capsules.em import initial_assignments

    R = initial_assignments((1, 9, j, 9), child_map, torch.zeros(1, dtype=D))
    per_child = torch.zeros(child_map.num_children, dtype=D).index_add(
        0, child_map.index, R.sum(2).reshape(-1)
    )
    torch.testing.assert_close(per_child, torch.ones(25, dtype=D))
    assert R[0, 0, 0, 0] == pytest.approx(1 / j)  # child (0,0): only parent position 0


def test_cluster_of_agreeing_votes_wins_the_parent():
    g = torch.Generator().manual_seed(5)
    n_children, j, h = 30, 4, 16
    target = torch.randn(h, generator=g, dtype=D)
    votes = torch.randn(1, 1, j, n_children, h, generator=g, dtype=D) * 2.0
    # 25 of 30 children agree closely on parent 2's pose.
    votes[0, 0, 2, :25] = target + 0.01 * torch.randn(25, h, generator=g, dtype=D)
    acts = torch.ones(1, 1, n_children, dtype=D)
    poses, a = em_routing(votes, acts, torch.zeros(j, dtype=D), torch.zeros(j, dtype=D), 3, 0.01)
    assert a[0, 0].argmax() == 2
    assert (poses[0, 0, 2] - target).abs().max() < 0.05


def test_input_activations_weight_the_m_step():
    votes, acts, beta_u, beta_a = fc_problem(n=1)
    p1, a1 = em_routing(votes, acts, beta_u, beta_a, 3, 0.01)
    p2, a2 = em_routing(
        votes, acts * torch.linspace(0.05, 1, acts.shape[-1], dtype=D), beta_u, beta_a, 3, 0.01
    )
    assert (p1 - p2).abs().max() > 1e-3 and (a1 - a2).abs().max() > 1e-6
    # An inactive child has no say: moving its votes changes nothing.
    acts0 = acts.clone()
    acts0[..., 0] = 0
    moved = votes.clone()
    moved[..., 0, :] += 100.0
    p3, a3 = em_routing(votes, acts0, beta_u, beta_a, 3, 0.01)
    p4, a4 = em_routing(moved, acts0, beta_u, beta_a, 3, 0.01)
    torch.testing.assert_close(p3, p4)
    torch.testing.assert_close(a3, a4)


def test_lambda_schedule_increases_towards_final_lambda():
    lams = inverse_temperatures(3, 0.01)
    assert lams == sorted(lams) and lams[-1] < 0.01
    assert lams[0] == pytest.approx(0.01 * 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case", ["zero_activations", "identical_votes", "one_child", "huge_votes", "tiny_votes"]
)
def test_routing_stays_finite(case, dtype):
    g = torch.Generator().manual_seed(6)
    n, j, s, h = 2, 3, 5, 16
    votes = torch.randn(n, 1, j, s, h, generator=g, dtype=dtype)
    acts = torch.rand(n, 1, s, generator=g, dtype=dtype)
    if case == "zero_activations":
        acts.zero_()
    elif case == "identical_votes":
        votes = votes[:, :, :, :1].expand(n, 1, j, s, h).clone()
    elif case == "one_child":
        votes, acts = votes[:, :, :, :1].clone(), acts[:, :, :1].clone()
    elif case == "huge_votes":
        votes = votes * 1e6
    elif case == "tiny_votes":
        votes = votes * 1e-12
    votes.requires_grad_(True)
    beta = torch.zeros(j, dtype=dtype, requires_grad=True)
    poses, a = em_routing(votes, acts, beta, beta, 3, 0.01)
    assert torch.isfinite(poses).all() and torch.isfinite(a).all()
    ((poses**2).mean() + a.sum()).backward()
    assert torch.isfinite(votes.grad).all() and torch.isfinite(beta.grad).all()

"""The authors' released parametrisation is Procedure 1's activation with rescaled β and λ."""

import math

import torch

from emcaps_cli.capsules import parametrisation
from emcaps_cli.capsules.layers import ClassCaps, ConvCaps
from emcaps_cli.config import ModelConfig
from emcaps_cli.models import build_model


def released_logit(beta_t, masses, log_var, s_b, a_b):
    """The released code's activation logit (em_layers.py), written out: H = 16."""
    h = log_var.shape[-1]
    p_i = -log_var.sum(-1)
    return beta_t * (masses * (p_i - s_b * h * (math.log(2 * math.pi) + 1)) - a_b * 5000)


def procedure_1_logit(lam, masses, log_var, beta_u, beta_a):
    log_sigma = 0.5 * log_var
    return lam * (beta_a - ((beta_u + log_sigma) * masses.unsqueeze(-1)).sum(-1))


def test_released_form_equals_the_released_logit():
    g = torch.Generator().manual_seed(0)
    masses = torch.rand(7, 5, generator=g, dtype=torch.float64) * 30
    log_var = torch.randn(7, 5, 16, generator=g, dtype=torch.float64) - 4
    s_b = torch.randn(5, generator=g, dtype=torch.float64)
    a_b = torch.randn(5, generator=g, dtype=torch.float64)
    for layer, beta_t in (("conv", 0.01), ("class", 0.01 / 4)):
        bu, ba, lam = parametrisation.effective_parameters("released", layer, s_b, a_b, 0.01)
        ours = procedure_1_logit(lam, masses, log_var, bu.view(1, 5, 1), ba)
        theirs = released_logit(beta_t, masses, log_var, s_b, a_b)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-9)


def test_paper_form_is_the_identity():
    bu, ba = torch.randn(3), torch.randn(3)
    out = parametrisation.effective_parameters("paper", "conv", bu, ba, 0.01)
    assert out[0] is bu and out[1] is ba and out[2] == 0.01


def test_released_initial_values():
    torch.manual_seed(0)
    conv = ConvCaps(8, 8, 3, 1, parametrisation="released")
    fc = ClassCaps(8, 5, parametrisation="released")
    assert torch.all(conv.beta_u == 0.5) and torch.all(conv.beta_a == 0.5)
    assert torch.all(fc.beta_u == 2.0) and torch.all(fc.beta_a == 1.0)
    assert abs(conv.transforms.std().item() - 0.3) < 0.02
    assert abs(fc.transforms.std().item() - 0.01) < 0.002
    paper = ConvCaps(8, 8, 3, 1)
    assert torch.all(paper.beta_a == 0) and abs(paper.transforms.std().item() - 0.5) < 0.03


def test_released_network_runs_and_differs_from_paper():
    images = torch.randn(2, 2, 32, 32)
    out = {}
    for kind in ("paper", "released"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=(8, 4, 4, 4), iters=2, parametrisation=kind))
        out[kind] = model(images)
        assert torch.isfinite(out[kind]).all()
    assert not torch.allclose(out["paper"], out["released"])

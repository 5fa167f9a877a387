"""`emcaps train --compile`: the torch.compile'd network computes what the eager one does.

Slow (about a minute of compilation on 2 cores), so one tiny network, one step.
"""

import pytest
import torch

from emcaps_cli.config import ModelConfig
from emcaps_cli.losses import spread_loss
from emcaps_cli.models import build_model

pytestmark = pytest.mark.slow


def test_compiled_capsule_network_matches_eager_values_and_gradients():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=(4, 2, 2, 2), iters=2, routing="exact"))
    images, labels = torch.randn(2, 2, 32, 32), torch.tensor([0, 3])

    scores = torch.compile(model)(images)
    spread_loss(scores, labels, 0.5).backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    eager_scores = model(images)
    spread_loss(eager_scores, labels, 0.5).backward()
    torch.testing.assert_close(scores, eager_scores, atol=1e-5, rtol=1e-5)
    for got, p in zip(compiled_grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4)

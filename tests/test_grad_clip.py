"""Gradient-norm clipping before Adam's step (`--grad-clip`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_cache
from test_training import cnn_config, train_tiny, weights
from torch import nn

from emcaps_cli.config import DEFAULT_GRAD_CLIP, ModelConfig, TrainConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.training.clipping import clip_gradient

pytestmark = pytest.mark.usefixtures("single_thread")


def _with_gradient(values: list[float]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(1)) for _ in values]
    for p, v in zip(params, values, strict=True):
        p.grad = torch.tensor([v])
    return params


def test_a_gradient_longer_than_the_clip_is_scaled_to_it_as_one_vector() -> None:
    params = _with_gradient([3.0, 4.0])  # norm 5
    assert clip_gradient(params, 1.0)
    clipped = torch.cat([p.grad for p in params])
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-5)
    assert clipped.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)  # direction kept


def test_a_gradient_shorter_than_the_clip_is_left_as_it_is() -> None:
    params = _with_gradient([3.0, 4.0])
    assert not clip_gradient(params, 6.0)
    assert torch.cat([p.grad for p in params]).tolist() == [3.0, 4.0]


def test_the_capsule_network_clips_by_default_and_the_cnn_does_not() -> None:
    assert TrainConfig().grad_clip is None
    assert TrainConfig().resolved().grad_clip == DEFAULT_GRAD_CLIP["capsnet"] > 0
    assert TrainConfig(model=ModelConfig(model="cnn")).resolved().grad_clip == 0.0
    assert TrainConfig(grad_clip=0.5).resolved().grad_clip == 0.5


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_clip_that_is_not_a_norm_is_refused(value: float) -> None:
    with pytest.raises(EmcapsError, match="--grad-clip"):
        TrainConfig(grad_clip=value)


def _clipped_steps(run: Path) -> list[float | None]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line).get("clipped_steps") for line in lines]


def test_every_step_is_clipped_below_the_gradients_norm_and_none_above_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    runs = {clip: tmp_path / f"clip{clip:g}" for clip in (1e-8, 1e8, 0.0)}
    for clip, run in runs.items():
        train_tiny(cnn_config(cache, run, epochs=2, grad_clip=clip, ema_decay=0.0))
    assert _clipped_steps(runs[1e-8]) == [1.0, 1.0]
    assert _clipped_steps(runs[1e8]) == [0.0, 0.0]
    assert _clipped_steps(runs[0.0]) == [None, None]  # off: not recorded
    # Adam's first step does not depend on the gradient's scale, the later ones do.
    tiny, off = weights(runs[1e-8] / "last.pt"), weights(runs[0.0] / "last.pt")
    assert any(not torch.allclose(tiny[k], off[k]) for k in off)
    never = weights(runs[1e8] / "last.pt")
    assert all(torch.equal(never[k], off[k]) for k in off)

"""FGSM / BIM against closed forms and handmade models; targeted, transfer and ε = 0 behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_eval import LinearScores, OvershootBump, make_checkpoint, shared_files

from emcaps_cli.attacks.methods import bim, fgsm, image_loss, input_gradient
from emcaps_cli.attacks.protocol import (
    AttackModel,
    AttackSettings,
    attack_checkpoints,
    default_loss_name,
    parse_eps,
    run_attack,
)
from emcaps_cli.checkpoint import load_model
from emcaps_cli.data.cache import Split
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.errors import EmcapsError
from emcaps_cli.evaluation import evaluate_model, load_test_images, predict_scores


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return shared_files()


@pytest.fixture(scope="module")
def test_images(files: dict[str, Path]) -> Split:
    return load_test_images(files["cache"])


def linear_model(seed: int = 0) -> LinearScores:
    g = torch.Generator().manual_seed(seed)
    return LinearScores(torch.randn(5, 2 * 32 * 32, generator=g), torch.randn(5, generator=g))


def test_fgsm_is_eps_times_sign_of_closed_form_gradient() -> None:
    model = linear_model()
    x = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    # Summed cross-entropy of a linear model: ∇ₓL = (softmax(Wx + b) − onehot(y)) W per image.
    probs = (x.flatten(1) @ model.weight.T + model.bias).softmax(dim=1)
    grad = ((probs - torch.nn.functional.one_hot(y, 5)) @ model.weight).view_as(x)
    loss = image_loss("cross-entropy")
    torch.testing.assert_close(input_gradient(model, x, y, loss), grad)
    assert torch.equal(fgsm(model, x, y, 0.1, loss), x + 0.1 * grad.sign())
    assert torch.equal(fgsm(model, x, y, 0.1, loss, targeted=True), x - 0.1 * grad.sign())
    assert torch.equal(fgsm(model, x, y, 0.0, loss), x)
    assert all(p.grad is None for p in model.parameters())


def test_targeted_step_lowers_the_loss_towards_the_target() -> None:
    model = linear_model(2)
    x = torch.randn(8, 2, 32, 32, generator=torch.Generator().manual_seed(3))
    target = torch.full((8,), 4)
    loss = image_loss("cross-entropy")
    before = loss(model(x), target)
    after = loss(model(fgsm(model, x, target, 0.01, loss, targeted=True)), target)
    assert after < before


@pytest.mark.parametrize("targeted", [False, True])
def test_bim_stays_inside_the_eps_ball(targeted: bool) -> None:
    model = linear_model(4)
    x = torch.randn(6, 2, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = image_loss("cross-entropy")
    for eps, step_size in ((0.05, None), (0.2, 0.15), (0.3, 0.01)):
        x_adv = bim(model, x, target, eps, loss, steps=5, step_size=step_size, targeted=targeted)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert not x_adv.requires_grad


def test_bim_is_at_least_as_strong_as_fgsm() -> None:
    # One ε = 1 step jumps over the bump where class 1 wins; ten steps of 0.25 land on it.
    model = OvershootBump()
    x = torch.zeros(3, 2, 32, 32)
    y = torch.zeros(3, dtype=torch.long)
    loss = image_loss("cross-entropy")
    fgsm_acc = (model(fgsm(model, x, y, 1.0, loss)).argmax(1) == y).float().mean()
    bim_acc = (model(bim(model, x, y, 1.0, loss, steps=10)).argmax(1) == y).float().mean()
    assert fgsm_acc == 1.0
    assert bim_acc == 0.0
    assert bim_acc <= fgsm_acc


def test_eps_zero_accuracy_equals_evaluate(files: dict[str, Path], test_images: Split) -> None:
    model, _ = load_model(files["cnn"])
    expected = evaluate_model(model, test_images, batch_size=16)["accuracy"]
    for method in ("fgsm", "bim"):
        settings = AttackSettings(method, eps=(0.0, 0.3), steps=2)
        result = attack_checkpoints([files["cnn"]], test_images, settings, batch_size=16)[0]
        assert result["accuracy"][0] == expected
        assert result["accuracy"][1] < expected  # the trained CNN is not robust at ε = 0.3


def test_targeted_eps_zero_success_is_the_share_predicted_as_target(
    files: dict[str, Path], test_images: Split
) -> None:
    model, _ = load_model(files["cnn"])
    pred = predict_scores(model, test_images.images).argmax(1).numpy()
    labels = test_images.labels
    settings = AttackSettings("fgsm", targeted=True, eps=(0.0,))
    result = attack_checkpoints([files["cnn"]], test_images, settings)[0]
    by_target = [np.mean(pred == t) for t in range(5)]
    others = [np.mean(pred[labels != t] == t) for t in range(5)]
    np.testing.assert_allclose(result["success_rate_by_target"][0], by_target)
    np.testing.assert_allclose(result["success_rate"][0], np.mean(by_target))
    np.testing.assert_allclose(result["success_rate"][0], 0.2)  # every image is predicted as one t
    np.testing.assert_allclose(result["success_rate_excluding_true_class"][0], np.mean(others))


def test_transfer_uses_the_source_gradients(files: dict[str, Path], test_images: Split) -> None:
    source, _ = load_model(files["other"])
    victim, _ = load_model(files["cnn"])
    test_images = Split(
        *(a[:12] for a in (test_images.images, test_images.labels, test_images.info))
    )
    x = eval_batch(torch.from_numpy(test_images.images), 2)
    y = torch.from_numpy(test_images.labels)
    for method in ("fgsm", "bim"):
        settings = AttackSettings(method, eps=(0.2,), steps=2)
        if method == "fgsm":
            x_adv = fgsm(source, x, y, 0.2, image_loss("cross-entropy"))
        else:
            x_adv = bim(source, x, y, 0.2, image_loss("cross-entropy"), steps=2)
        expected = int((victim(x_adv).argmax(1) == y).sum()) / len(y)
        result = attack_checkpoints(
            [files["cnn"]], test_images, settings, source=files["other"], batch_size=64
        )[0]
        assert result["accuracy"][0] == expected
        assert result["source"]["checkpoint"] == str(files["other"])


def test_transfer_between_differently_standardised_inputs_is_refused() -> None:
    weight, bias = torch.randn(5, 2 * 32 * 32), torch.randn(5)
    source = AttackModel("per-crop", LinearScores(weight, bias, standardize="crop"), "margin")
    victim = AttackModel("per-image", LinearScores(weight, bias, standardize="image"), "margin")
    images = np.zeros((2, 2, 48, 48), dtype=np.uint8)
    data = Split(images, np.zeros(2, dtype=np.int64), np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(EmcapsError, match="per-image: standardises its input per image"):
        run_attack(source, [victim], data, AttackSettings(eps=(0.0,)))


def test_gradient_diagnostics_count_exact_zeros() -> None:
    weight = torch.randn(5, 2 * 32 * 32, generator=torch.Generator().manual_seed(0))
    weight[:, : 32 * 32] = 0  # the left view never matters: half the gradient is exactly 0
    model = AttackModel("lin", LinearScores(weight, torch.zeros(5)), "cross-entropy")
    images = np.random.default_rng(0).integers(0, 255, size=(7, 2, 48, 48), dtype=np.uint8)
    data = Split(images, np.arange(7) % 5, np.zeros((7, 4), dtype=np.int64))
    result = run_attack(model, [model], data, AttackSettings(eps=(0.0,)), batch_size=3)[0]
    assert result["gradient"]["zero_fraction"] == 0.5
    x = eval_batch(torch.from_numpy(images), 2)
    grad = input_gradient(model.model, x, torch.from_numpy(data.labels), model.loss)
    assert result["gradient"]["mean_abs"] == pytest.approx(grad.abs().mean().item(), rel=1e-5)


def test_attack_leaves_the_model_in_eval_mode_without_parameter_grads(
    files: dict[str, Path], test_images: Split
) -> None:
    model = AttackModel("cnn", load_model(files["cnn"])[0], "cross-entropy")
    run_attack(model, [model], test_images, AttackSettings("bim", eps=(0.1,), steps=2))
    assert not model.model.training
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters())


def test_default_loss_is_the_training_loss() -> None:
    assert default_loss_name({"model_config": {"model": "cnn"}}) == "cross-entropy"
    assert default_loss_name({"model_config": {"model": "capsnet"}}) == "spread"
    ckpt = {"model_config": {"model": "capsnet"}, "train_config": {"loss": "margin"}}
    assert default_loss_name(ckpt) == "margin"


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(EmcapsError, match="--method"):
        AttackSettings("pgd")
    with pytest.raises(EmcapsError, match="--eps"):
        parse_eps("0,abc")
    with pytest.raises(EmcapsError, match="--eps"):
        AttackSettings(eps=(-0.1,))
    with pytest.raises(EmcapsError, match="--steps"):
        AttackSettings("bim", steps=0)


def test_capsnet_is_attacked_through_its_activations(
    files: dict[str, Path], test_images: Split, tmp_path: Path
) -> None:
    path = make_checkpoint(tmp_path / "caps.pt", model="capsnet", arch=(8, 4, 4, 4), iters=1)
    data = Split(*(a[:8] for a in (test_images.images, test_images.labels, test_images.info)))
    model, _ = load_model(path)
    assert model.score_kind == "activation"
    expected = evaluate_model(model, data, batch_size=4)["accuracy"]
    settings = AttackSettings("bim", eps=(0.0, 0.2), steps=2)
    result = attack_checkpoints([path], data, settings, batch_size=4)[0]
    assert result["loss"] == "spread"
    assert result["accuracy"][0] == expected
    assert 0 <= result["gradient"]["zero_fraction"] < 1 and result["gradient"]["mean_abs"] > 0

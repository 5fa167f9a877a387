"""The training library: splits, learning, checkpoints, exact resume, the NaN guard, signals."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cache
from torch import nn

from emcaps_cli.checkpoint import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from emcaps_cli.config import ModelConfig, TrainConfig, default_loss
from emcaps_cli.data.cache import load_cache
from emcaps_cli.data.transforms import eval_batch
from emcaps_cli.data.viewpoints import familiar_mask
from emcaps_cli.errors import EmcapsError
from emcaps_cli.losses import get_loss
from emcaps_cli.models import build_model
from emcaps_cli.routing import backend as routing_backend
from emcaps_cli.training import loop
from emcaps_cli.training.data import epoch_permutation, split_indices
from emcaps_cli.training.loop import TrainingInterrupted, resume_config, train
from emcaps_cli.training.schedule import parameter_groups
from emcaps_cli.utils.reporter import Reporter

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyNet(nn.Module):
    """A few thousand parameters, with dropout so the global RNG matters for exact resume."""

    score_kind = "logit"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(config.channels, 8, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(8, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images).flatten(1)))  # (N, 5)


def train_tiny(config: TrainConfig, resume: bool = False, **kw):
    """`train` with TinyNet for the network."""
    return train(config, resume, build_model=TinyNet, **kw)


class StepLosses(Reporter):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def step(self, done: int, loss: float, images_per_second: float) -> None:
        self.losses.append(loss)


def cnn_config(cache: Path, out: Path, **kw) -> TrainConfig:
    defaults = dict(
        data=str(cache),
        out=str(out),
        model=ModelConfig(model="cnn"),
        epochs=1,
        batch_size=20,
        lr=3e-3,
        device="cpu",
    )
    return TrainConfig(**{**defaults, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --- splits -----------------------------------------------------------------------------------


def test_split_indices_are_reproducible_disjoint_and_familiar() -> None:
    rng = np.random.default_rng(0)
    info = np.stack(
        [rng.integers(0, 10, 500), rng.integers(0, 9, 500), 2 * rng.integers(0, 18, 500)], 1
    )
    info = np.concatenate([info, np.zeros((500, 1), dtype=info.dtype)], axis=1)
    a = split_indices(info, info, "azimuth", 0.2, seed=3, limit_train=60, limit_test=50)
    b = split_indices(info, info, "azimuth", 0.2, seed=3, limit_train=60, limit_test=50)
    assert all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("train", "validation", "test")
    )
    assert len(a.train) + len(a.validation) == 60 and len(a.validation) == 12
    assert not set(a.train) & set(a.validation)
    assert familiar_mask(info[np.concatenate([a.train, a.validation])], "azimuth").all()
    assert len(a.test) == 50
    assert np.array_equal(a.test_familiar, familiar_mask(info[a.test], "azimuth"))


# --- learning ---------------------------------------------------------------------------------


def test_loss_falls_over_a_few_steps(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=200, n_test=20)
    steps, calls = StepLosses(), []
    config = cnn_config(cache, tmp_path / "run", epochs=2, lr=1e-2)
    train_tiny(config, reporter=steps, get_loss=losses_that_record(calls))
    assert len(steps.losses) == 18  # 180 training images (10% held out), batches of 20
    losses = [loss for loss, _ in calls]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1


@pytest.mark.slow
def test_small_model_learns_a_learnable_set_well_above_chance(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=300, n_test=100)
    result = train_tiny(cnn_config(cache, tmp_path / "run", epochs=6, lr=1e-2))
    assert result.last_metrics["test_error"] < 0.35  # chance is 0.8
    assert result.last_metrics["validation_error"] < 0.35


@pytest.mark.slow
def test_tiny_capsule_network_learns_above_chance(tmp_path: Path) -> None:
    """With one iteration, the former variance floor and the capsule network's learning rate:
    the default floor (0.1) exceeds the vote spread of so small a network and stalls it for
    the first epochs (docs/model.md)."""
    cache = make_cache(tmp_path / "c.h5", n_train=200, n_test=50)
    capsnet = ModelConfig(model="capsnet", arch=(8, 4, 4, 4), iters=1, var_floor=1e-4)
    steps = StepLosses()
    config = cnn_config(cache, tmp_path / "run", model=capsnet, epochs=2, batch_size=16, lr=2e-2)
    result = train(config, reporter=steps)
    assert all(np.isfinite(steps.losses))
    assert result.last_metrics["test_error"] < 0.5  # chance is 0.8
    assert result.last_metrics["margin"] > 0.2
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["train_config"]["loss"] == "spread"
    model, _ = load_model(tmp_path / "run" / "best.pt")
    assert model.score_kind == "activation"
    assert model(torch.zeros(2, 2, 32, 32)).shape == (2, 5)


# --- run directory and checkpoints ------------------------------------------------------------


def test_run_directory_and_checkpoint_rebuild(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=20)
    run = tmp_path / "run"
    train(cnn_config(cache, run, epochs=1))
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "curves.png",
    }
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    for key in ("train_loss", "margin", "lr", "train_error", "validation_error", "test_error"):
        assert key in metrics
    assert metrics["images_per_second"] > 0 and metrics["seconds"] > 0

    data = torch.load(run / "best.pt", weights_only=True)
    assert data["model_config"]["model"] == "cnn" and data["split"] == "full"
    assert data["epoch"] == 1 and data["train_config"]["batch_size"] == 20
    assert data["kernels"] is None  # the CNN does not route
    assert json.loads((run / "config.json").read_text())["kernels"] is None
    model, loaded = load_model(run / "best.pt")
    assert loaded["epoch"] == 1
    x = torch.randn(3, 2, 32, 32)
    twin = TrainConfig.from_dict(data["train_config"])
    assert twin.model == ModelConfig.from_dict(data["model_config"])
    assert model(x).shape == (3, 5)
    assert resolve_checkpoint(run) == run / "best.pt"

    with pytest.raises(EmcapsError, match="already holds a run"):
        train(cnn_config(cache, run, epochs=1))


def test_split_azimuth_reports_familiar_and_novel(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=120, n_test=60)
    run = tmp_path / "run"
    train_tiny(cnn_config(cache, run, split="azimuth", validation_fraction=0.2))
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert metrics["test_familiar_error"] is not None and metrics["test_novel_error"] is not None
    config = json.loads((run / "config.json").read_text())
    assert 0 < config["images"]["test_familiar"] < config["images"]["test"] == 60
    assert config["images"]["train"] + config["images"]["validation"] < 120
    assert torch.load(run / "last.pt", weights_only=True)["split"] == "azimuth"


def test_stop_at_error_stops_after_the_epoch_that_reaches_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=60, n_test=20)
    result = train_tiny(
        cnn_config(cache, tmp_path / "run", epochs=5, split="elevation", stop_at_error=1.0)
    )
    assert result.stopped == "stop-at-error" and result.epochs_completed == 1


def test_amp_is_refused_on_cpu(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    with pytest.raises(EmcapsError, match="--amp"):
        train(cnn_config(cache, tmp_path / "run", amp=True))


# --- exact resume -----------------------------------------------------------------------------


def test_resume_after_an_epoch_matches_a_straight_run(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    common = dict(epochs=2, loss="spread", margin_epochs=1.5)
    straight = tmp_path / "straight"
    train_tiny(cnn_config(cache, straight, **common))

    split_run = tmp_path / "split"
    train_tiny(cnn_config(cache, split_run, **{**common, "epochs": 1}))
    train_tiny(resume_config(split_run, epochs=2), resume=True)
    assert_same_weights(straight / "last.pt", split_run / "last.pt")
    history = [json.loads(x) for x in (split_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2]


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    straight = tmp_path / "straight"
    train_tiny(cnn_config(cache, straight, epochs=2))

    calls = {"n": 0}

    def loss_that_signals(name: str):
        fn = get_loss(name)

        def wrapped(scores, target, margin):
            calls["n"] += 1
            if calls["n"] == 7:  # step 2 of epoch 2 (5 steps per epoch)
                signal.raise_signal(signal.SIGTERM)
            return fn(scores, target, margin)

        return wrapped

    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        train_tiny(cnn_config(cache, run, epochs=2), get_loss=loss_that_signals)
    assert info.value.signum == signal.SIGTERM
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is handler_before

    train_tiny(resume_config(run), resume=True)
    assert_same_weights(straight / "last.pt", run / "last.pt")
    ours = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    theirs = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert ours["train_error"] == theirs["train_error"]
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-9)


def test_resume_refuses_changed_options(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    run = tmp_path / "run"
    train_tiny(cnn_config(cache, run))
    with pytest.raises(EmcapsError, match="--lr"):
        resume_config(run, lr=0.1, epochs=3)
    with pytest.raises(EmcapsError, match="--batch-size"):
        train_tiny(cnn_config(cache, run, epochs=3, batch_size=7), resume=True)
    with pytest.raises(EmcapsError, match="larger --epochs"):
        train_tiny(resume_config(run), resume=True)


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.fixture
def restore_kernels():
    from emcaps_cli.routing.c import ffi

    before = routing_backend.backend()
    yield ffi
    routing_backend.set_backend(before)


def test_the_routing_kernels_are_recorded_and_a_resume_on_others_is_named(
    tmp_path: Path, restore_kernels
) -> None:
    ffi = restore_kernels
    try:
        ffi.library()
    except routing_backend.KernelsUnavailable as err:  # no C compiler on this machine
        pytest.skip(str(err))
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=10)
    capsnet = ModelConfig(model="capsnet", arch=(8, 4, 4, 4), iters=1)
    run = tmp_path / "run"

    def recorded() -> tuple[str, str]:
        config = json.loads((run / "config.json").read_text())
        return config["kernels"], torch.load(run / "last.pt", weights_only=True)["kernels"]

    routing_backend.set_backend("torch")
    train(cnn_config(cache, run, model=capsnet, batch_size=16, diagnostics=False))
    assert recorded() == ("torch", "torch")

    routing_backend.set_backend("c")
    notes = Notes()
    train(resume_config(run, epochs=2), resume=True, reporter=notes)
    assert recorded() == ("c", "c")
    (note,) = [n for n in notes.notes if "kernels" in n]
    assert "on the c routing kernels" in note and "trained on the torch kernels" in note

    # A checkpoint written before the kernels were recorded resumes without a note.
    old = load_checkpoint(run / "last.pt")
    del old["kernels"]
    save_checkpoint(run / "last.pt", old)
    routing_backend.set_backend("torch")
    notes = Notes()
    train(resume_config(run, epochs=3), resume=True, reporter=notes)
    assert recorded() == ("torch", "torch") and notes.notes == []


def test_kernels_that_cannot_run_are_refused_before_training(
    tmp_path: Path, restore_kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10)
    routing_backend.set_backend("triton")
    capsnet = ModelConfig(model="capsnet", arch=(8, 4, 4, 4), iters=1)
    with pytest.raises(EmcapsError, match="--kernels triton: "):
        train(cnn_config(cache, tmp_path / "run", model=capsnet))
    assert not (tmp_path / "run").exists()


# --- robustness -------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    reference = tmp_path / "reference"
    train_tiny(cnn_config(cache, reference, epochs=1))

    calls = {"n": 0}

    def loss_that_explodes(name: str):
        fn = get_loss(name)

        def wrapped(scores, target, margin):
            calls["n"] += 1
            loss = fn(scores, target, margin)
            return loss * float("nan") if calls["n"] == 8 else loss

        return wrapped

    run = tmp_path / "run"
    with pytest.raises(EmcapsError, match=r"non-finite training loss \(nan\) at epoch 2, step 3"):
        train_tiny(cnn_config(cache, run, epochs=3), get_loss=loss_that_explodes)
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0)
    assert_same_weights(reference / "last.pt", run / "last.pt")


class NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def losses_that_record(calls: list[tuple[float, int]], step_hook=None):
    """A `get_loss` whose loss functions append (loss, batch size) to `calls` every step and
    pass the loss through `step_hook(step, loss)` (steps counted from 1 over the run)."""

    def get(name: str):
        fn = get_loss(name)

        def wrapped(scores, target, margin):
            loss = fn(scores, target, margin)
            calls.append((loss.item(), len(target)))
            return step_hook(len(calls), loss) if step_hook else loss

        return wrapped

    return get


def test_a_non_finite_gradient_stops_the_run_at_most_readback_steps_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss and its gradient are read from the device every READBACK_STEPS steps: the run
    goes on for at most that many steps, names the bad one, and saves nothing trained since."""
    monkeypatch.setattr(loop, "READBACK_STEPS", 4)
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    reference = tmp_path / "reference"
    train_tiny(cnn_config(cache, reference, epochs=1, batch_size=8))  # 12 steps an epoch
    calls: list[tuple[float, int]] = []
    bad = 12 + 6  # epoch 2, step 6: read after steps 1, 5, 9, 12 of an epoch

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        return NanGradient.apply(loss) if step == bad else loss

    run = tmp_path / "run"
    message = r"non-finite training gradient \(nan\) at epoch 2, step 6 .*Try a smaller --lr"
    with pytest.raises(EmcapsError, match=message):
        config = cnn_config(cache, run, epochs=3, batch_size=8)
        train_tiny(config, get_loss=losses_that_record(calls, hook))
    assert bad < len(calls) <= bad + 4
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0)
    assert all(torch.isfinite(w).all() for w in saved["model_state"].values())
    assert_same_weights(reference / "last.pt", run / "last.pt")


def test_a_stop_request_after_a_non_finite_step_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "READBACK_STEPS", 50)
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 3:  # read after steps 1 and 12: the stop request comes first
            signal.raise_signal(signal.SIGTERM)
        return loss * float("nan") if step == 2 else loss

    run = tmp_path / "run"
    with pytest.raises(EmcapsError, match=r"loss \(nan\) at epoch 1, step 2 .*no checkpoint"):
        config = cnn_config(cache, run, epochs=1, batch_size=8)
        train_tiny(config, get_loss=losses_that_record([], hook))
    assert not (run / "last.pt").exists()


def test_the_epochs_loss_is_the_mean_of_its_steps_and_the_bar_shows_the_last_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "READBACK_STEPS", 3)
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    calls: list[tuple[float, int]] = []
    steps = StepLosses()
    config = cnn_config(cache, tmp_path / "run", epochs=2, batch_size=8)
    result = train_tiny(config, reporter=steps, get_loss=losses_that_record(calls))
    assert len(calls) == 24 and [n for _, n in calls[:12]] == [8] * 11 + [2]
    epoch2 = calls[12:]
    assert result.last_metrics["train_loss"] == sum(loss * n for loss, n in epoch2) / 90
    # Read after the first step, once 3 steps are pending and after the last: 1, 4, 7, 10, 12.
    shown = [1, 1, 1, 4, 4, 4, 7, 7, 7, 10, 10, 12]
    assert steps.losses[12:] == [epoch2[step - 1][0] for step in shown]


# --- capsule-health diagnostics, defaults ---------------------------------------------------


def test_capsule_runs_record_diagnostics_every_epoch(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=60, n_test=20)
    capsnet = ModelConfig(model="capsnet", arch=(8, 4, 4, 4), iters=2)
    train(cnn_config(cache, tmp_path / "on", model=capsnet, epochs=2, batch_size=16))
    lines = (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2
    for row in rows:
        assert set(row["diagnostics"]) == {
            "conv1",
            "primary_caps",
            "conv_caps1",
            "conv_caps2",
            "class_caps",
        }
        assert 0 <= row["diagnostics"]["class_caps"]["assignment_entropy"] <= 1 + 1e-6
    assert (tmp_path / "on" / "diagnostics.png").stat().st_size > 0
    off = cnn_config(cache, tmp_path / "off", model=capsnet, batch_size=16, diagnostics=False)
    train(off)
    row = json.loads((tmp_path / "off" / "metrics.jsonl").read_text())
    assert "diagnostics" not in row
    assert not (tmp_path / "off" / "diagnostics.png").exists()


def test_each_model_has_its_own_default_learning_rate() -> None:
    cnn = TrainConfig(model=ModelConfig(model="cnn")).resolved()
    capsnet = TrainConfig(model=ModelConfig(model="capsnet")).resolved()
    assert (cnn.lr, capsnet.lr) == (3e-4, 2e-2)
    assert TrainConfig(lr=1e-2).resolved().lr == 1e-2


def test_standardisation_defaults_to_the_crop_and_refuses_other_places() -> None:
    assert ModelConfig().standardize == "crop"
    with pytest.raises(EmcapsError, match="--standardize pixel"):
        ModelConfig(standardize="pixel")


def test_the_e_step_is_tempered_by_default_and_refuses_a_power_of_0() -> None:
    assert ModelConfig().likelihood_power == 0.1
    with pytest.raises(EmcapsError, match="--likelihood-power"):
        ModelConfig(likelihood_power=0.0)


@pytest.mark.parametrize("augment", [True, False])
def test_training_and_evaluation_read_crops_of_the_models_input_size(
    tmp_path: Path, augment: bool
) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=10)
    sides: set[tuple[bool, int, int]] = set()

    class Sides(TinyNet):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            sides.add((self.training, *images.shape[-2:]))
            return super().forward(images)

    config = cnn_config(cache, tmp_path / "run", model=ModelConfig(model="cnn", input_size=40))
    train(dataclasses.replace(config, augment=augment), build_model=Sides)
    assert sides == {(True, 40, 40), (False, 40, 40)}


def test_a_cache_smaller_than_the_models_input_size_is_refused_naming_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=20, n_test=10, size=28)
    with pytest.raises(EmcapsError, match=r"c\.h5: images are 28px, smaller than the 32px crop"):
        train_tiny(cnn_config(cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_without_augmentation_training_batches_are_the_centre_crops(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=40, n_test=10)
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model(ModelConfig(model="cnn"))
            self.score_kind = "logit"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(x.detach().clone())
            return self.inner(x)

    config = cnn_config(cache, tmp_path / "run", augment=False, validation_fraction=0.0)
    train(config, build_model=lambda config: Spy())
    images = torch.from_numpy(load_cache(str(cache)).train.images[:])
    order = epoch_permutation(len(images), 0, 0)
    first = eval_batch(images[order[:20]], 2)
    torch.testing.assert_close(seen[0], first)


def test_each_model_has_its_own_default_loss() -> None:
    assert (default_loss("capsnet"), default_loss("cnn")) == ("spread", "cross-entropy")
    assert TrainConfig(model=ModelConfig(model="cnn")).resolved().loss == "cross-entropy"
    assert TrainConfig(model=ModelConfig(model="capsnet")).resolved().loss == "spread"
    assert TrainConfig(loss="margin").resolved().loss == "margin"


# --- the front's learning rate ----------------------------------------------------------------


class TinyFrontNet(TinyNet):
    """TinyNet whose convolution is its "front", as conv1 and the primary capsules are the
    capsule network's."""

    def front_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())


def test_the_capsule_networks_front_is_conv1_and_the_primary_capsules() -> None:
    model = build_model(ModelConfig(arch=(8, 2, 2, 2)))
    groups = parameter_groups(model, 0.3)
    front = {id(p) for p in [*model.conv1.parameters(), *model.primary_caps.parameters()]}
    assert [g["lr_scale"] for g in groups] == [1.0, 0.3]
    assert {id(p) for p in groups[1]["params"]} == front
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())
    assert len(parameter_groups(model, 1.0)) == 1
    cnn = build_model(ModelConfig(model="cnn"))
    assert len(parameter_groups(cnn, 0.3)) == 1  # the CNN has no front


def test_the_front_learns_at_its_scale_of_the_learning_rate(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c.h5", n_train=100, n_test=20)
    config = cnn_config(cache, tmp_path / "run", front_lr_scale=1e-3, ema_decay=0.0)
    torch.manual_seed(config.seed)
    start = TinyFrontNet(config.model).state_dict()
    train(config, False, build_model=TinyFrontNet)
    end = weights(tmp_path / "run" / "last.pt")
    moved = {k: (end[k] - start[k]).abs().max().item() for k in start}
    # Adam moves a parameter by at most about 3·lr a step (β1 0.9, β2 0.999); 5 steps here.
    bound = 5 * 3.2 * config.lr
    assert max(moved["features.0.weight"], moved["features.0.bias"]) < bound * 1e-3
    assert moved["head.weight"] > bound * 1e-2


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_a_front_learning_rate_scale_that_is_not_positive_is_refused(value: float) -> None:
    with pytest.raises(EmcapsError, match="--front-lr-scale"):
        TrainConfig(front_lr_scale=value)

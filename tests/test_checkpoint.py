"""Checkpoints: a digest of the contents catches a changed byte; weights must be finite."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from emcaps_cli.checkpoint import DIGEST_KEY, load_checkpoint, load_model, save_checkpoint
from emcaps_cli.config import ModelConfig
from emcaps_cli.errors import EmcapsError
from emcaps_cli.models import build_model


def write(path: Path, **extra: object) -> Path:
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="cnn"))
    payload = {"model_config": net.config.to_dict(), "model_state": net.state_dict(), **extra}
    save_checkpoint(path, payload)
    return path


def flip_bit_in_largest_record(path: Path) -> None:
    """Flip one bit inside the biggest tensor record; the zip archive stays readable."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    start = record.header_offset + 30 + name_len + extra_len
    data[start + record.file_size // 2 + 3] ^= 0x40  # an exponent bit of a float32
    path.write_bytes(bytes(data))


def test_the_digest_round_trips_and_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = write(tmp_path / "a.pt", history=[{"epoch": 1, "lr": 3e-3}], rng=(1, 2.5, None))
    raw = torch.load(path, weights_only=True)
    assert raw[DIGEST_KEY].startswith("sha256:")
    assert load_checkpoint(path)["history"] == [{"epoch": 1, "lr": 3e-3}]


def test_a_flipped_bit_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.pt")
    flip_bit_in_largest_record(path)
    assert torch.load(path, weights_only=True)["format"] == "emcaps-checkpoint"  # still loads
    with pytest.raises(EmcapsError, match=r"a\.pt: checkpoint is damaged"):
        load_model(path)


def test_a_checkpoint_written_before_digests_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path / "a.pt")
    data = torch.load(path, weights_only=True)
    del data[DIGEST_KEY]
    torch.save(data, path)
    model, loaded = load_model(path)
    assert DIGEST_KEY not in loaded and model(torch.zeros(1, 2, 32, 32)).shape == (1, 5)


def test_non_finite_weights_are_refused_naming_the_weight(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="cnn"))
    state = net.state_dict()
    name = next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    save_checkpoint(tmp_path / "a.pt", {"model_config": net.config.to_dict(), "model_state": state})
    with pytest.raises(EmcapsError, match=rf"a\.pt: weight {name} holds inf or nan"):
        load_checkpoint(tmp_path / "a.pt")

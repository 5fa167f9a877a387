"""Checkpoints: only tensors and plain Python types, loadable with `weights_only=True`.

Layout (a dict):
    format          "emcaps-checkpoint"
    format_version  1
    model_config    dict, `ModelConfig.to_dict()`; enough to rebuild the model without flags
    model_state     the model's state_dict
    plus whatever the writer adds (train_config, epoch, optimizer_state, rng, metrics, ...),
    all tensors / dicts / lists / str / int / float / bool / None.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from emcaps_cli.atomic import atomic_path
from emcaps_cli.errors import EmcapsError

FORMAT = "emcaps-checkpoint"
BEST, LAST = "best.pt", "last.pt"  # the checkpoints of a run directory
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically write `payload` (must contain model_config and model_state)."""
    for key in ("model_config", "model_state"):
        if key not in payload:
            raise ValueError(f"checkpoint payload lacks {key!r}")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (never runs code from the file); one-line errors on bad input."""
    path = Path(path)
    if not path.is_file():
        raise EmcapsError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise EmcapsError(f"{path}: not a checkpoint (not a torch.save archive)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmcapsError(
            f"{path}: refused to load: the file holds objects other than tensors and plain "
            f"types ({first[:160]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise EmcapsError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EmcapsError(f"{path}: not an emcaps checkpoint (no '{FORMAT}' marker)")
    if data.get("format_version") != FORMAT_VERSION:
        raise EmcapsError(
            f"{path}: checkpoint format_version {data.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    for key in ("model_config", "model_state"):
        if key not in data:
            raise EmcapsError(f"{path}: checkpoint lacks {key!r}")
    return data


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint file, or a run directory -> its best.pt (or last.pt when `which="last"`,
    or when the run has no best.pt yet)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / (BEST if which == "best" else LAST)
        if not candidate.is_file() and (path / LAST).is_file():
            candidate = path / LAST
        if not candidate.is_file():
            raise EmcapsError(f"{path}: run directory has no {BEST} or {LAST}")
        return candidate
    return path


def load_model(path: str | os.PathLike, device: Any = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network a checkpoint (or a run directory's best.pt) describes, load its
    weights, move it to `device`. Returns (model in eval mode, the checkpoint dict).
    """
    from emcaps_cli.models import ModelConfig, build_model

    path = resolve_checkpoint(path)
    data = load_checkpoint(path, map_location="cpu")
    config = ModelConfig.from_dict(data["model_config"])
    model = build_model(config)
    try:
        model.load_state_dict(data["model_state"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise EmcapsError(f"{path}: weights do not fit the stored model config ({first})") from None
    return model.to(device).eval(), data

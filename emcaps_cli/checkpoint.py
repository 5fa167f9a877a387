"""Checkpoints: only tensors and plain Python types, loadable with `weights_only=True`.

Layout (a dict):
    format          "emcaps-checkpoint"
    format_version  1
    model_config    dict, `ModelConfig.to_dict()`; enough to rebuild the model without flags
    model_state     the model's state_dict
    plus whatever the writer adds (train_config, epoch, optimizer_state, rng, metrics, ...),
    all tensors / dicts / lists / str / int / float / bool / None.
    digest          "sha256:<hex>" of everything above (`payload_digest`), checked on load, so
                    a flipped bit that leaves the archive readable is still caught. Checkpoints
                    written before the digest existed load without the check.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import atomic_path

FORMAT = "emcaps-checkpoint"
BEST, LAST = "best.pt", "last.pt"  # the checkpoints of a run directory
FORMAT_VERSION = 1
DIGEST_KEY = "digest"


def _feed(digest: Any, value: Any) -> None:
    """Add `value` to `digest` in a canonical order: dict keys sorted, tensors by dtype,
    shape and bytes, plain values by type and repr."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


def payload_digest(data: dict[str, Any]) -> str:
    """sha256 of a checkpoint's contents (tensors and plain values), without its digest."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in data.items() if k != DIGEST_KEY})
    return "sha256:" + digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically write `payload` (must contain model_config and model_state)."""
    for key in ("model_config", "model_state"):
        if key not in payload:
            raise ValueError(f"checkpoint payload lacks {key!r}")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    data[DIGEST_KEY] = payload_digest(data)
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
    _check_integrity(path, data)
    return data


def _check_integrity(path: Path, data: dict[str, Any]) -> None:
    """The stored digest matches the contents, and every weight is finite."""
    stored = data.get(DIGEST_KEY)
    if stored is not None and stored != payload_digest(data):
        raise EmcapsError(
            f"{path}: checkpoint is damaged: its contents do not match the digest stored when "
            "it was written (a changed byte); use another copy"
        )
    for name, tensor in data["model_state"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                raise EmcapsError(f"{path}: weight {name} holds inf or nan values")


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
    from emcaps_cli.config import ModelConfig
    from emcaps_cli.models import build_model

    path = resolve_checkpoint(path)
    data = load_checkpoint(path, map_location="cpu")
    config = ModelConfig.from_dict(data["model_config"], str(path))
    model = build_model(config)
    try:
        model.load_state_dict(data["model_state"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise EmcapsError(f"{path}: weights do not fit the stored model config ({first})") from None
    return model.to(device).eval(), data

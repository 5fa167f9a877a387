"""The prepared HDF5 cache: raw smallNORB files -> downsampled arrays, and reading them back.

Layout (format_version 1; training and evaluation code depend on it exactly):

    attrs  format_version  1
           image_size      S (48 by default)
           source_files    JSON object {raw file name: sha256 hex of the file as read}
           downsampling    short description of the filter
    /train/images  uint8 (N, 2, S, S)   stereo pair (left, right), chunks (64, 2, S, S), gzip
    /train/labels  int64 (N,)           0 animal, 1 human, 2 airplane, 3 truck, 4 car
    /train/info    int64 (N, 4)         instance, elevation, azimuth, lighting, as in the raw files
    /test/...      the same
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from emcaps_cli.data import smallnorb
from emcaps_cli.defaults import CACHE_IMAGE_SIZE
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import atomic_path, check_output_file

FORMAT_VERSION = 1
DEFAULT_SIZE = CACHE_IMAGE_SIZE
CHUNK_RECORDS = 64  # HDF5 chunk length: a random minibatch decompresses little it does not use
READ_CHUNK = 1000  # stereo pairs per block while streaming a raw dat file (18 MB)


@dataclass
class Split:
    """One split in memory: images uint8 (N, 2, S, S), labels int64 (N,), info int64 (N, 4)."""

    images: np.ndarray
    labels: np.ndarray
    info: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Cache:
    train: Split
    test: Split
    image_size: int


# ---------------------------------------------------------------------------------------
# Downsampling


def downsample(pairs: np.ndarray, size: int) -> np.ndarray:
    """Area-average uint8 (n, 2, H, H) -> uint8 (n, 2, size, size), rounding to nearest.

    When H is a multiple of `size` (96 -> 48: 2x2 blocks) this is an exact block mean;
    otherwise PIL's BOX filter, the same area average for a fractional footprint.
    """
    n, views, height, width = pairs.shape
    if height == size and width == size:
        return pairs.copy()
    if height % size == 0 and width % size == 0:
        fy, fx = height // size, width // size
        blocks = pairs.reshape(n, views, size, fy, size, fx).astype(np.uint32)
        total = blocks.sum(axis=(3, 5))
        area = fy * fx
        return ((total + area // 2) // area).astype(np.uint8)
    out = np.empty((n, views, size, size), dtype=np.uint8)
    for i in range(n):
        for v in range(views):
            image = Image.fromarray(pairs[i, v])
            out[i, v] = np.asarray(image.resize((size, size), Image.Resampling.BOX))
    return out


def describe_downsampling(size: int) -> str:
    if smallnorb.RAW_SIZE % size == 0:
        f = smallnorb.RAW_SIZE // size
        return f"area average of {f}x{f} blocks, rounded to nearest"
    return "PIL BOX filter (area average), rounded to nearest"


# ---------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _validate_split(files: dict[tuple[str, str], Path], split: str) -> tuple[np.ndarray, ...]:
    """Headers, labels and info of one split, checked before any pixel is read."""
    count = smallnorb.read_dat_header(files[split, "dat"])
    labels = smallnorb.read_labels(files[split, "cat"])
    info = smallnorb.read_info(files[split, "info"])
    for kind, n in (("cat", len(labels)), ("info", len(info))):
        if n != count:
            raise EmcapsError(
                f"{files[split, kind]}: {n} records, but {files[split, 'dat'].name} has {count}"
            )
    return labels, info


def prepare_cache(
    raw_dir: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_SIZE,
    on_start: Callable[[str, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Convert the six raw files in `raw_dir` into the HDF5 cache `out`, atomically.

    Everything cheap (file presence, headers, sizes, labels, info, counts) is validated for
    both splits before the pixel pass. Pixels stream in blocks of READ_CHUNK pairs, so memory
    holds one block of raw 96x96 data at a time. `on_start(split, n)` and `on_progress(k)`
    (k pairs done) let a caller draw progress. An existing `out` is replaced only on success.
    """
    if not 1 <= size <= smallnorb.RAW_SIZE:
        raise EmcapsError(f"--size {size}: expected 1..{smallnorb.RAW_SIZE}")
    check_output_file(out, "--out")
    files = smallnorb.find_raw_files(raw_dir)
    checked = {split: _validate_split(files, split) for split in smallnorb.SPLITS}
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["image_size"] = size
        h5.attrs["downsampling"] = describe_downsampling(size)
        for split in smallnorb.SPLITS:
            labels, info = checked[split]
            group = h5.create_group(split)
            group.create_dataset("labels", data=labels.astype(np.int64))
            group.create_dataset("info", data=info.astype(np.int64))
            n = len(labels)
            images = group.create_dataset(
                "images",
                shape=(n, 2, size, size),
                dtype=np.uint8,
                chunks=(min(CHUNK_RECORDS, max(n, 1)), 2, size, size),
                compression="gzip",
                compression_opts=4,
                shuffle=False,
            )
            if on_start is not None:
                on_start(split, n)
            done = 0
            for block in smallnorb.iter_dat_chunks(files[split, "dat"], READ_CHUNK):
                images[done : done + len(block)] = downsample(block, size)
                done += len(block)
                if on_progress is not None:
                    on_progress(len(block))
        sources = {path.name: _sha256(path) for path in files.values()}
        h5.attrs["source_files"] = json.dumps(sources, sort_keys=True)
    return out


# ---------------------------------------------------------------------------------------
# Reading


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _unreadable(path: Path, exc: OSError) -> EmcapsError:
    """Why h5py could not open `path`: not HDF5 at all, or an HDF5 file cut short."""
    with open(path, "rb") as handle:
        signature = handle.read(len(HDF5_SIGNATURE))
    if signature != HDF5_SIGNATURE:
        return EmcapsError(f"{path}: not an HDF5 file (expected a cache from `emcaps prepare`)")
    size = path.stat().st_size
    why = "truncated" if "truncated" in str(exc) else "damaged"
    return EmcapsError(
        f"{path}: HDF5 cache is {why} ({size} bytes on disk; copy it again or re-run "
        "`emcaps prepare`)"
    )


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise EmcapsError(
            f"{path}: no such cache file (run `emcaps prepare RAW_DIR` first, or pass --data)"
        )
    if not path.is_file():
        raise EmcapsError(f"{path}: is not a file (expected a cache from `emcaps prepare`)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    version = h5.attrs.get("format_version")
    if version != FORMAT_VERSION:
        h5.close()
        raise EmcapsError(
            f"{path}: cache format_version {version}, this emcaps reads {FORMAT_VERSION} "
            "(re-run `emcaps prepare`)"
        )
    return h5


def _read_split(h5: h5py.File, path: Path, split: str) -> Split:
    arrays = {}
    size = h5.attrs.get("image_size")
    for name, dtype, tail, text in (
        ("images", np.uint8, (2, size, size), f"(N, 2, {size}, {size})"),
        ("labels", np.int64, (), "(N,)"),
        ("info", np.int64, (4,), "(N, 4)"),
    ):
        key = f"{split}/{name}"
        if key not in h5 or not isinstance(h5[key], h5py.Dataset):
            raise EmcapsError(f"{path}: missing dataset /{key} (re-run `emcaps prepare`)")
        data = h5[key]
        if data.shape[1:] != tail or data.dtype != dtype:
            raise EmcapsError(
                f"{path}: /{key} is {data.dtype} {data.shape}, expected {np.dtype(dtype)} {text}"
            )
        arrays[name] = _read_dataset(data, path, key)
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise EmcapsError(f"{path}: /{split} datasets disagree on the record count {counts}")
    smallnorb.check_labels(arrays["labels"], f"{path}: /{split}/labels")
    smallnorb.check_info(arrays["info"], f"{path}: /{split}/info")
    return Split(**arrays)


def _read_dataset(data: h5py.Dataset, path: Path, key: str) -> np.ndarray:
    """All of a dataset; a chunk that fails to decompress or read is an error naming it."""
    try:
        return data[()]
    except OSError as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "read error"
        raise EmcapsError(
            f"{path}: /{key} is corrupted ({first}); re-run `emcaps prepare`"
        ) from None


def require_image_size(path: str | os.PathLike, image_size: int, crop: int) -> None:
    """Refuse a cache whose images are smaller than the crop a model reads."""
    if image_size < crop:
        raise EmcapsError(
            f"{path}: images are {image_size}px, smaller than the {crop}px crop "
            f"(prepare the cache with --size {crop} or more)"
        )


def load_split(path: str | os.PathLike, split: str) -> Split:
    """Read one split ("train" or "test") of a cache into memory."""
    if split not in smallnorb.SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = Path(path)
    with _open(path) as h5:
        return _read_split(h5, path, split)


def load_cache(path: str | os.PathLike) -> Cache:
    """Read both splits of a cache into memory."""
    path = Path(path)
    with _open(path) as h5:
        train = _read_split(h5, path, "train")
        test = _read_split(h5, path, "test")
        size = int(h5.attrs["image_size"])
    return Cache(train=train, test=test, image_size=size)

"""The smallNORB "binary matrix" file format: a validating reader and a writer.

A file (plain or gzip) is a header followed by a row-major payload, all little-endian:

    int32 magic     0x1E3D4C55 uint8, 0x1E3D4C54 int32 (the only two smallNORB uses);
                    0x1E3D4C51 float32, 0x1E3D4C53 float64, 0x1E3D4C56 int16 are recognised
                    and rejected
    int32 ndim
    int32 dims[max(3, ndim)]   unused trailing dims are written as 1

The six official files of a smallNORB download:

    dat   uint8  (N, 2, 96, 96)  a stereo pair per record (left, right)
    cat   int32  (N,)            category: 0 animal, 1 human, 2 airplane, 3 truck, 4 car
    info  int32  (N, 4)          instance 0-9, elevation 0-8, azimuth 0,2,..,34, lighting 0-5

Every problem is an `EmcapsError` whose message names the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import atomic_path

MAGIC_UINT8 = 0x1E3D4C55
MAGIC_INT32 = 0x1E3D4C54
# Documented by the format but never used by smallNORB; recognised so the error can say so.
UNSUPPORTED_MAGICS = {
    0x1E3D4C51: "float32",
    0x1E3D4C53: "float64",
    0x1E3D4C56: "int16",
}
MAGIC_OF_DTYPE = {np.dtype(np.uint8): MAGIC_UINT8, np.dtype("<i4"): MAGIC_INT32}
DTYPE_OF_MAGIC = {v: k for k, v in MAGIC_OF_DTYPE.items()}

SPLITS = ("train", "test")
KINDS = ("dat", "cat", "info")
_SPLIT_STEM = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}

RAW_SIZE = 96
CATEGORIES = ("animal", "human", "airplane", "truck", "car")
INSTANCES = range(10)
ELEVATIONS = range(9)  # code e means 30° + 5° e
AZIMUTHS = range(0, 35, 2)  # code a means 10° a, i.e. 0°..340° in 20° steps
LIGHTINGS = range(6)
# Instances photographed for each split in the real dataset.
SPLIT_INSTANCES = {"train": (4, 6, 7, 8, 9), "test": (0, 1, 2, 3, 5)}


def file_name(split: str, kind: str, gzipped: bool = False) -> str:
    """Official file name, e.g. `smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat`."""
    return f"{_SPLIT_STEM[split]}-{kind}.mat" + (".gz" if gzipped else "")


@dataclass(frozen=True)
class Header:
    """A parsed header: element type, logical shape and the header's size in bytes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def find_raw_files(raw_dir: str | os.PathLike) -> dict[tuple[str, str], Path]:
    """Locate the six files (plain preferred, else `.gz`) -> {(split, kind): path}.

    Lists every missing file in one error.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise EmcapsError(f"{raw_dir}: not a directory (expected the six smallNORB .mat files)")
    found: dict[tuple[str, str], Path] = {}
    missing: list[str] = []
    for split in SPLITS:
        for kind in KINDS:
            plain, packed = raw_dir / file_name(split, kind), raw_dir / file_name(split, kind, True)
            if plain.is_file():
                found[split, kind] = plain
            elif packed.is_file():
                found[split, kind] = packed
            else:
                missing.append(file_name(split, kind) + "[.gz]")
    if missing:
        raise EmcapsError(f"{raw_dir}: missing {len(missing)} file(s): {', '.join(missing)}")
    return found


def is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


@contextmanager
def open_raw(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a raw file for reading, decompressing it on the fly when its name ends in `.gz`."""
    path = Path(path)
    try:
        handle: BinaryIO = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
    except OSError as exc:
        raise EmcapsError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        yield handle
    except (OSError, EOFError, zlib.error) as exc:
        # Corrupt gzip streams surface while reading; keep them one line.
        raise EmcapsError(f"{path}: unreadable ({exc})") from None
    finally:
        handle.close()


def _read_exact(handle: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise EmcapsError(f"{path}: truncated {what} ({len(data)} of {n} bytes)")
    return data


def read_header(handle: BinaryIO, path: Path) -> Header:
    """Parse magic, ndim and dims from the start of `handle`."""
    magic, ndim = struct.unpack("<ii", _read_exact(handle, 8, path, "header"))
    if magic in UNSUPPORTED_MAGICS:
        raise EmcapsError(
            f"{path}: magic 0x{magic:08X} means {UNSUPPORTED_MAGICS[magic]} matrices, "
            "which smallNORB never uses (expected uint8 0x1E3D4C55 or int32 0x1E3D4C54)"
        )
    if magic not in DTYPE_OF_MAGIC:
        raise EmcapsError(
            f"{path}: bad magic number 0x{magic & 0xFFFFFFFF:08X}, not a smallNORB "
            "binary-matrix file"
        )
    if not 1 <= ndim <= 8:
        raise EmcapsError(f"{path}: bad header, ndim = {ndim}")
    ndims_stored = max(3, ndim)
    dims = struct.unpack(f"<{ndims_stored}i", _read_exact(handle, 4 * ndims_stored, path, "header"))
    if any(d < 0 for d in dims):
        raise EmcapsError(f"{path}: bad header, negative dimension in {dims}")
    return Header(DTYPE_OF_MAGIC[magic], tuple(dims[:ndim]), 8 + 4 * ndims_stored)


def _expect_header(header: Header, path: Path, kind: str) -> int:
    """Check dtype and dims for a dat/cat/info file; return the record count N."""
    want = {"dat": (np.uint8, 4), "cat": (np.int32, 1), "info": (np.int32, 2)}[kind]
    if header.dtype != np.dtype(want[0]):
        raise EmcapsError(
            f"{path}: {kind} file holds {header.dtype} matrices, expected {np.dtype(want[0])}"
        )
    shape = header.shape
    good = len(shape) == want[1] and (
        (kind == "dat" and shape[1:] == (2, RAW_SIZE, RAW_SIZE))
        or kind == "cat"
        or (kind == "info" and shape[1:] == (4,))
    )
    if not good:
        expected = {"dat": "(N, 2, 96, 96)", "cat": "(N,)", "info": "(N, 4)"}[kind]
        raise EmcapsError(f"{path}: dims {shape}, expected {expected} for a {kind} file")
    return shape[0]


def _check_size_on_disk(path: Path, header: Header) -> None:
    """For an uncompressed file the size on disk tells truncation or trailing bytes at once."""
    if is_gzip(path):
        return
    expected = header.nbytes + header.payload_bytes
    actual = path.stat().st_size
    if actual < expected:
        raise EmcapsError(
            f"{path}: truncated payload ({actual - header.nbytes} of "
            f"{header.payload_bytes} bytes for dims {header.shape})"
        )
    if actual > expected:
        raise EmcapsError(
            f"{path}: {actual - expected} trailing bytes after the {header.shape} payload"
        )


def _expect_end(handle: BinaryIO, path: Path) -> None:
    extra = len(handle.read(1 << 16))
    if extra:
        raise EmcapsError(f"{path}: trailing bytes after the payload")


def read_matrix(path: str | os.PathLike, kind: str | None = None) -> np.ndarray:
    """Read a whole (small) matrix file; the result has the header's dtype and shape.

    With `kind` ("dat", "cat" or "info") the header must match that file's dtype and dims.
    """
    path = Path(path)
    with open_raw(path) as handle:
        header = read_header(handle, path)
        if kind is not None:
            _expect_header(header, path, kind)
        _check_size_on_disk(path, header)
        payload = _read_exact(handle, header.payload_bytes, path, "payload")
        _expect_end(handle, path)
    return np.frombuffer(payload, dtype=header.dtype).reshape(header.shape).copy()


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read and validate a cat file -> int64 (N,) categories in 0..4."""
    path = Path(path)
    labels = read_matrix(path, "cat").astype(np.int64)
    check_labels(labels, str(path))
    return labels


def check_labels(labels: np.ndarray, where: str) -> None:
    """Every category code in 0..4; else an error naming `where` and the first bad record."""
    bad = np.flatnonzero((labels < 0) | (labels >= len(CATEGORIES)))
    if bad.size:
        raise EmcapsError(
            f"{where}: label {labels[bad[0]]} at record {bad[0]} is outside 0-4 "
            f"({bad.size} bad labels)"
        )


def read_info(path: str | os.PathLike) -> np.ndarray:
    """Read and validate an info file -> int64 (N, 4) instance, elevation, azimuth, lighting."""
    path = Path(path)
    info = read_matrix(path, "info").astype(np.int64)
    check_info(info, str(path))
    return info


def check_info(info: np.ndarray, where: str) -> None:
    """Every (instance, elevation, azimuth, lighting) code on the smallNORB grid; else an error
    naming `where` and the first bad record."""
    allowed = (INSTANCES, ELEVATIONS, AZIMUTHS, LIGHTINGS)
    names = ("instance", "elevation", "azimuth", "lighting")
    ranges = ("0-9", "0-8", "even 0-34", "0-5")
    for column, (values, name, text) in enumerate(zip(allowed, names, ranges, strict=True)):
        bad = np.flatnonzero(~np.isin(info[:, column], list(values)))
        if bad.size:
            raise EmcapsError(
                f"{where}: {name} {info[bad[0], column]} at record {bad[0]} is outside "
                f"{text} ({bad.size} bad rows)"
            )


def read_dat_header(path: str | os.PathLike) -> int:
    """Validate a dat file's header (and, if uncompressed, its size); return N."""
    path = Path(path)
    with open_raw(path) as handle:
        header = read_header(handle, path)
    count = _expect_header(header, path, "dat")
    _check_size_on_disk(path, header)
    return count


def iter_dat_chunks(path: str | os.PathLike, chunk: int = 1000) -> Iterator[np.ndarray]:
    """Stream a dat file as uint8 (n, 2, 96, 96) blocks of at most `chunk` stereo pairs.

    Never holds more than one block; detects truncation and trailing bytes (also in gzip
    streams, where they can only be seen by reading to the end).
    """
    path = Path(path)
    pair_bytes = 2 * RAW_SIZE * RAW_SIZE
    with open_raw(path) as handle:
        header = read_header(handle, path)
        count = _expect_header(header, path, "dat")
        done = 0
        while done < count:
            n = min(chunk, count - done)
            data = handle.read(n * pair_bytes)
            if len(data) != n * pair_bytes:
                got = done * pair_bytes + len(data)
                raise EmcapsError(
                    f"{path}: truncated payload ({got} of {header.payload_bytes} bytes "
                    f"for dims {header.shape})"
                )
            yield np.frombuffer(data, dtype=np.uint8).reshape(n, 2, RAW_SIZE, RAW_SIZE)
            done += n
        _expect_end(handle, path)


# ---------------------------------------------------------------------------------------
# Writer


@contextmanager
def _open_for_write(path: Path, gzipped: bool) -> Iterator[BinaryIO]:
    """Atomic binary output; gzip with a fixed header (no name, mtime 0) so bytes reproduce."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        if gzipped:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz:
                yield gz
        else:
            yield raw


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    dims = list(shape) + [1] * (3 - len(shape))
    return struct.pack(f"<ii{len(dims)}i", MAGIC_OF_DTYPE[dtype], len(shape), *dims)


def write_matrix(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write `array` (uint8 or int32) as a matrix file; gzip if the name ends .gz."""
    path = Path(path)
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if dtype not in MAGIC_OF_DTYPE:
        raise ValueError(f"cannot write {array.dtype}; smallNORB files are uint8 or int32")
    with _open_for_write(path, is_gzip(path)) as out:
        out.write(_header_bytes(dtype, array.shape))
        out.write(np.ascontiguousarray(array, dtype=dtype).tobytes())


class DatWriter:
    """Write a dat file block by block: `writer.write(pairs)` with uint8 (n, 2, 96, 96)."""

    def __init__(self, out: BinaryIO, path: Path, count: int) -> None:
        self._out, self._path, self._count, self.written = out, path, count, 0

    def write(self, pairs: np.ndarray) -> None:
        if pairs.dtype != np.uint8 or pairs.shape[1:] != (2, RAW_SIZE, RAW_SIZE):
            raise ValueError(f"expected uint8 (n, 2, 96, 96), got {pairs.dtype} {pairs.shape}")
        self._out.write(np.ascontiguousarray(pairs).tobytes())
        self.written += len(pairs)


@contextmanager
def dat_writer(path: str | os.PathLike, count: int) -> Iterator[DatWriter]:
    """Atomically stream `count` stereo pairs into a dat file (gzip if the name ends .gz)."""
    path = Path(path)
    with _open_for_write(path, is_gzip(path)) as out:
        out.write(_header_bytes(np.dtype(np.uint8), (count, 2, RAW_SIZE, RAW_SIZE)))
        writer = DatWriter(out, path, count)
        yield writer
        if writer.written != count:
            raise ValueError(f"{path}: wrote {writer.written} pairs, header says {count}")

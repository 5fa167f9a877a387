"""The HDF5 cache: the agreed layout, area-average downsampling, atomic writes."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from emcaps_cli.data import cache, smallnorb
from emcaps_cli.data.cache import Split, downsample, load_cache, load_split, prepare_cache
from emcaps_cli.errors import EmcapsError

FIXTURES = Path(__file__).parent / "fixtures" / "smallnorb_fake"
TRAIN_SHA = "ec2d5e13c603ca028f069cdc3d0a7dc71fcf06d8275f1e7fec826fbe634c8517"


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    target = tmp_path / "raw"
    shutil.copytree(FIXTURES, target)
    (target / "README.md").unlink()
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def raw_pixels(split: str) -> np.ndarray:
    path = FIXTURES / smallnorb.file_name(split, "dat")
    return np.concatenate(list(smallnorb.iter_dat_chunks(path)))


def reference_area_average(pairs: np.ndarray, factor: int) -> np.ndarray:
    """Slow, obvious: mean of each factor x factor block, rounded half up."""
    n, v, h, w = pairs.shape
    out = np.zeros((n, v, h // factor, w // factor), dtype=np.uint8)
    for i in range(n):
        for j in range(v):
            for y in range(h // factor):
                for x in range(w // factor):
                    block = pairs[
                        i, j, y * factor : (y + 1) * factor, x * factor : (x + 1) * factor
                    ]
                    out[i, j, y, x] = int(np.floor(block.astype(float).mean() + 0.5))
    return out


def test_layout_matches_the_agreed_format(raw_dir: Path, tmp_path: Path) -> None:
    out = prepare_cache(raw_dir, tmp_path / "c.h5")
    with h5py.File(out, "r") as h5:
        assert h5.attrs["format_version"] == 1
        assert h5.attrs["image_size"] == 48
        sources = json.loads(h5.attrs["source_files"])
        assert len(sources) == 6
        assert sources[smallnorb.file_name("train", "dat")] == TRAIN_SHA
        for split in ("train", "test"):
            images = h5[f"{split}/images"]
            assert images.dtype == np.uint8 and images.shape == (5, 2, 48, 48)
            assert images.chunks[1:] == (2, 48, 48) and images.compression == "gzip"
            assert h5[f"{split}/labels"].dtype == np.int64
            assert h5[f"{split}/info"].dtype == np.int64 and h5[f"{split}/info"].shape == (5, 4)
        assert h5["train/labels"][()].tolist() == [0, 0, 2, 1, 2]
        assert h5["test/info"][0].tolist() == [9, 2, 12, 3]


def test_images_are_2x2_area_averages_of_the_raw_views(raw_dir: Path, tmp_path: Path) -> None:
    loaded = load_cache(prepare_cache(raw_dir, tmp_path / "c.h5"))
    for split, part in (("train", loaded.train), ("test", loaded.test)):
        np.testing.assert_array_equal(part.images, reference_area_average(raw_pixels(split), 2))


def test_downsample_integer_factor_matches_reference() -> None:
    pairs = np.random.default_rng(1).integers(0, 256, (3, 2, 96, 96), dtype=np.uint8)
    np.testing.assert_array_equal(downsample(pairs, 32), reference_area_average(pairs, 3))


def test_downsample_fractional_factor_uses_an_area_filter() -> None:
    pairs = np.full((2, 2, 96, 96), 77, dtype=np.uint8)
    pairs[:, :, :, 48:] = 177  # left half dark, right half bright
    small = downsample(pairs, 40)
    assert small.shape == (2, 2, 40, 40) and small.dtype == np.uint8
    assert small[0, 0, 5, 0] == 77 and small[0, 0, 5, 39] == 177
    assert abs(small.astype(float).mean() - 127.0) < 1.0


def test_other_sizes_are_recorded(raw_dir: Path, tmp_path: Path) -> None:
    loaded = load_cache(prepare_cache(raw_dir, tmp_path / "c.h5", size=32))
    assert loaded.image_size == 32 and loaded.train.images.shape == (5, 2, 32, 32)


def test_gzipped_raw_files_give_the_same_cache_content(raw_dir: Path, tmp_path: Path) -> None:
    plain = load_cache(prepare_cache(raw_dir, tmp_path / "plain.h5"))
    for path in list(raw_dir.iterdir()):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    packed = load_cache(prepare_cache(raw_dir, tmp_path / "gz.h5"))
    for a, b in ((plain.train, packed.train), (plain.test, packed.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.info, b.info)


def test_load_split_returns_one_split(raw_dir: Path, tmp_path: Path) -> None:
    part = load_split(prepare_cache(raw_dir, tmp_path / "c.h5"), "test")
    assert isinstance(part, Split) and len(part) == 5
    assert part.labels.tolist() == [1, 2, 4, 0, 3]
    assert part.info.dtype == np.int64 and part.images.dtype == np.uint8


def test_failed_prepare_leaves_an_existing_cache_byte_for_byte(
    raw_dir: Path, tmp_path: Path
) -> None:
    out = prepare_cache(raw_dir, tmp_path / "c.h5")
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    # Corrupt the test dat so the failure comes mid-write, after the train split.
    dat = raw_dir / smallnorb.file_name("test", "dat")
    dat.with_name(dat.name + ".gz").write_bytes(gzip.compress(dat.read_bytes()[:-5000]))
    dat.unlink()
    with pytest.raises(EmcapsError, match="truncated payload"):
        prepare_cache(raw_dir, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "raw"]  # no temp left


def test_labels_and_info_are_checked_before_any_pixel_is_read(
    raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = smallnorb.read_info(raw_dir / smallnorb.file_name("test", "info")).astype(np.int32)
    info[0, 3] = 7
    smallnorb.write_matrix(raw_dir / smallnorb.file_name("test", "info"), info)

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel pass started before validation finished")

    monkeypatch.setattr(cache.smallnorb, "iter_dat_chunks", no_pixels)
    with pytest.raises(EmcapsError, match="lighting 7 at record 0"):
        prepare_cache(raw_dir, tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


# --- reader errors ----------------------------------------------------------------------


def test_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="no such cache file"):
        load_cache(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    path.write_text("hello")
    with pytest.raises(EmcapsError, match="not an HDF5 file"):
        load_cache(path)


def make_cache(path: Path, version: int = 1, counts=(3, 3, 3), skip: str = "") -> Path:
    with h5py.File(path, "w") as h5:
        h5.attrs["format_version"] = version
        h5.attrs["image_size"] = 48
        for split in ("train", "test"):
            arrays = {
                "images": np.zeros((counts[0], 2, 48, 48), np.uint8),
                "labels": np.zeros(counts[1], np.int64),
                "info": np.zeros((counts[2], 4), np.int64),
            }
            for name, data in arrays.items():
                if f"{split}/{name}" != skip:
                    h5.create_dataset(f"{split}/{name}", data=data)
    return path


def test_minimal_valid_cache_loads(tmp_path: Path) -> None:
    loaded = load_cache(make_cache(tmp_path / "c.h5"))
    assert loaded.image_size == 48 and len(loaded.train) == 3 and len(loaded.test) == 3


def test_wrong_format_version(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="format_version 2"):
        load_cache(make_cache(tmp_path / "c.h5", version=2))


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="missing dataset /test/info"):
        load_cache(make_cache(tmp_path / "c.h5", skip="test/info"))


def test_inconsistent_counts(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="disagree on the record count"):
        load_split(make_cache(tmp_path / "c.h5", counts=(3, 4, 3)), "train")


def test_wrong_dtype(tmp_path: Path) -> None:
    path = make_cache(tmp_path / "c.h5", skip="train/labels")
    with h5py.File(path, "a") as h5:
        h5.create_dataset("train/labels", data=np.zeros(3, np.int32))
    with pytest.raises(EmcapsError, match="/train/labels is int32"):
        load_cache(path)


# --- integrity of a cache on disk ---------------------------------------------------------


def test_a_corrupted_chunk_is_an_error_naming_the_file_and_dataset(
    raw_dir: Path, tmp_path: Path
) -> None:
    out = prepare_cache(raw_dir, tmp_path / "c.h5")
    with h5py.File(out, "r") as h5:
        chunk = h5["test/images"].id.get_chunk_info(0)
    data = bytearray(out.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    data[middle : middle + 8] = b"\xff" * 8
    out.write_bytes(bytes(data))
    with pytest.raises(EmcapsError, match=r"c\.h5: /test/images is corrupted"):
        load_cache(out)


def test_a_truncated_cache_is_called_truncated(raw_dir: Path, tmp_path: Path) -> None:
    out = prepare_cache(raw_dir, tmp_path / "c.h5")
    out.write_bytes(out.read_bytes()[: out.stat().st_size * 6 // 10])
    with pytest.raises(EmcapsError, match="is truncated") as info:
        load_cache(out)
    assert "not an HDF5 file" not in str(info.value)


@pytest.mark.parametrize(
    ("dataset", "row", "value", "message"),
    [
        ("test/labels", 2, 7, r"/test/labels: label 7 at record 2 is outside 0-4"),
        ("train/labels", 0, -1, r"/train/labels: label -1 at record 0"),
        ("train/info", 1, (12, 0, 0, 0), r"/train/info: instance 12 at record 1"),
        ("test/info", 0, (0, 0, 3, 0), r"/test/info: azimuth 3 at record 0"),
    ],
)
def test_labels_and_info_out_of_range_are_refused_when_the_cache_is_opened(
    tmp_path: Path, dataset: str, row: int, value: object, message: str
) -> None:
    path = make_cache(tmp_path / "c.h5")
    with h5py.File(path, "a") as h5:
        h5[dataset][row] = value
    with pytest.raises(EmcapsError, match=message):
        load_cache(path)

"""The binary-matrix reader decodes the genuine-format fixtures and explains every corruption."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from emcaps_cli.data import smallnorb
from emcaps_cli.data.cache import prepare_cache
from emcaps_cli.errors import EmcapsError

FIXTURES = Path(__file__).parent / "fixtures" / "smallnorb_fake"
TRAIN_CAT = [0, 0, 2, 1, 2]
TRAIN_INFO = [[1, 8, 8, 0], [1, 1, 22, 2], [2, 0, 32, 2], [1, 4, 26, 5], [0, 5, 8, 1]]
TEST_CAT = [1, 2, 4, 0, 3]
TEST_INFO = [[9, 2, 12, 3], [2, 0, 26, 0], [3, 4, 30, 2], [1, 0, 12, 0], [8, 1, 28, 5]]


def fixture(split: str, kind: str) -> Path:
    return FIXTURES / smallnorb.file_name(split, kind)


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """A writable copy of the six fixture files."""
    target = tmp_path / "raw"
    target.mkdir()
    for split in smallnorb.SPLITS:
        for kind in smallnorb.KINDS:
            shutil.copyfile(fixture(split, kind), target / smallnorb.file_name(split, kind))
    return target


def gzip_copy(source: Path, target_dir: Path) -> Path:
    target = target_dir / (source.name + ".gz")
    target.write_bytes(gzip.compress(source.read_bytes()))
    return target


# --- decoding ---------------------------------------------------------------------------


def test_fixture_labels_and_info_decode_to_the_documented_values() -> None:
    assert smallnorb.read_labels(fixture("train", "cat")).tolist() == TRAIN_CAT
    assert smallnorb.read_info(fixture("train", "info")).tolist() == TRAIN_INFO
    assert smallnorb.read_labels(fixture("test", "cat")).tolist() == TEST_CAT
    assert smallnorb.read_info(fixture("test", "info")).tolist() == TEST_INFO


def test_dat_header_says_five_stereo_pairs_and_chunks_cover_the_payload() -> None:
    path = fixture("train", "dat")
    assert smallnorb.read_dat_header(path) == 5
    blocks = list(smallnorb.iter_dat_chunks(path, chunk=2))
    assert [len(b) for b in blocks] == [2, 2, 1]
    pixels = np.concatenate(blocks)
    assert pixels.shape == (5, 2, 96, 96) and pixels.dtype == np.uint8
    # Header is 24 bytes (magic, ndim=4, four dims); the payload follows row-major.
    raw = path.read_bytes()
    assert struct.unpack("<6i", raw[:24]) == (0x1E3D4C55, 4, 5, 2, 96, 96)
    assert pixels.tobytes() == raw[24:]


def test_int32_files_have_padded_three_dim_headers() -> None:
    assert struct.unpack("<5i", fixture("test", "cat").read_bytes()[:20]) == (
        0x1E3D4C54,
        1,
        5,
        1,
        1,
    )
    assert struct.unpack("<5i", fixture("test", "info").read_bytes()[:20])[1:] == (2, 5, 4, 1)


def test_gzipped_copies_decode_identically(tmp_path: Path) -> None:
    assert smallnorb.read_labels(gzip_copy(fixture("test", "cat"), tmp_path)).tolist() == TEST_CAT
    assert smallnorb.read_info(gzip_copy(fixture("test", "info"), tmp_path)).tolist() == TEST_INFO
    dat = gzip_copy(fixture("test", "dat"), tmp_path)
    assert smallnorb.read_dat_header(dat) == 5
    got = np.concatenate(list(smallnorb.iter_dat_chunks(dat, chunk=3)))
    assert got.tobytes() == fixture("test", "dat").read_bytes()[24:]


def test_find_raw_files_prefers_plain_and_accepts_gz(raw_dir: Path) -> None:
    plain = raw_dir / smallnorb.file_name("train", "cat")
    gzip_copy(plain, raw_dir)
    plain.unlink()
    found = smallnorb.find_raw_files(raw_dir)
    assert found["train", "cat"].name.endswith("training-cat.mat.gz")
    assert found["train", "dat"].name.endswith("training-dat.mat")


# --- writer -----------------------------------------------------------------------------


def test_writer_reproduces_the_fixture_bytes_exactly(tmp_path: Path) -> None:
    cat = np.array(TEST_CAT, dtype=np.int32)
    info = np.array(TEST_INFO, dtype=np.int32)
    smallnorb.write_matrix(tmp_path / "cat.mat", cat)
    smallnorb.write_matrix(tmp_path / "info.mat", info)
    assert (tmp_path / "cat.mat").read_bytes() == fixture("test", "cat").read_bytes()
    assert (tmp_path / "info.mat").read_bytes() == fixture("test", "info").read_bytes()
    pixels = np.concatenate(list(smallnorb.iter_dat_chunks(fixture("test", "dat"))))
    with smallnorb.dat_writer(tmp_path / "dat.mat", 5) as writer:
        writer.write(pixels[:3])
        writer.write(pixels[3:])
    assert (tmp_path / "dat.mat").read_bytes() == fixture("test", "dat").read_bytes()


def test_gzip_writer_is_deterministic_and_readable(tmp_path: Path) -> None:
    info = np.array(TRAIN_INFO, dtype=np.int32)
    smallnorb.write_matrix(tmp_path / "a" / "info.mat.gz", info)
    smallnorb.write_matrix(tmp_path / "b" / "info.mat.gz", info)
    first = (tmp_path / "a" / "info.mat.gz").read_bytes()
    assert first == (tmp_path / "b" / "info.mat.gz").read_bytes()
    assert gzip.decompress(first) == fixture("train", "info").read_bytes()


# --- corruptions ------------------------------------------------------------------------


def header(magic: int, ndim: int, *dims: int) -> bytes:
    return struct.pack(f"<ii{len(dims)}i", magic, ndim, *dims)


def expect_error(call, path: Path, *phrases: str) -> str:
    with pytest.raises(EmcapsError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    for phrase in phrases:
        assert phrase in message
    return message


def test_wrong_magic_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x-cat.mat"
    path.write_bytes(header(0x12345678, 1, 5, 1, 1) + bytes(20))
    expect_error(smallnorb.read_labels, path, "bad magic number 0x12345678")


@pytest.mark.parametrize(
    ("magic", "name"), [(0x1E3D4C51, "float32"), (0x1E3D4C53, "float64"), (0x1E3D4C56, "int16")]
)
def test_documented_but_unused_magics_are_rejected_by_name(
    tmp_path: Path, magic: int, name: str
) -> None:
    path = tmp_path / "x-cat.mat"
    path.write_bytes(header(magic, 1, 5, 1, 1) + bytes(20))
    expect_error(smallnorb.read_labels, path, name, "never uses")


def test_dat_with_wrong_image_dims(tmp_path: Path) -> None:
    path = tmp_path / "x-dat.mat"
    path.write_bytes(header(0x1E3D4C55, 4, 5, 2, 95, 96) + bytes(5 * 2 * 95 * 96))
    expect_error(smallnorb.read_dat_header, path, "dims (5, 2, 95, 96)", "(N, 2, 96, 96)")


def test_info_with_wrong_column_count(tmp_path: Path) -> None:
    path = tmp_path / "x-info.mat"
    path.write_bytes(header(0x1E3D4C54, 2, 5, 3, 1) + bytes(60))
    expect_error(smallnorb.read_info, path, "dims (5, 3)")


def test_labels_stored_as_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x-cat.mat"
    path.write_bytes(header(0x1E3D4C55, 1, 5, 1, 1) + bytes(5))
    expect_error(smallnorb.read_labels, path, "uint8", "expected int32")


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "x-cat.mat"
    path.write_bytes(fixture("train", "cat").read_bytes()[:10])
    expect_error(smallnorb.read_labels, path, "truncated header")


def test_truncated_payload_plain_is_caught_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "x-dat.mat"
    path.write_bytes(fixture("train", "dat").read_bytes()[:-100])
    expect_error(smallnorb.read_dat_header, path, "truncated payload", "92060 of 92160")


def test_truncated_payload_in_a_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "x-dat.mat.gz"
    path.write_bytes(gzip.compress(fixture("train", "dat").read_bytes()[:-100]))
    expect_error(lambda p: list(smallnorb.iter_dat_chunks(p, 2)), path, "truncated payload")


def test_truncated_labels(tmp_path: Path) -> None:
    path = tmp_path / "x-cat.mat"
    path.write_bytes(fixture("train", "cat").read_bytes()[:-4])
    expect_error(smallnorb.read_labels, path, "truncated payload")


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path: Path, gz: bool) -> None:
    data = fixture("train", "info").read_bytes() + b"\x00\x00\x00\x00"
    path = tmp_path / ("x-info.mat.gz" if gz else "x-info.mat")
    path.write_bytes(gzip.compress(data) if gz else data)
    expect_error(smallnorb.read_info, path, "trailing bytes")


def test_trailing_bytes_after_a_gzipped_dat(tmp_path: Path) -> None:
    path = tmp_path / "x-dat.mat.gz"
    path.write_bytes(gzip.compress(fixture("train", "dat").read_bytes() + b"extra"))
    expect_error(lambda p: list(smallnorb.iter_dat_chunks(p)), path, "trailing bytes")


def test_corrupt_gzip_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x-cat.mat.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-garbage")
    expect_error(smallnorb.read_labels, path, "unreadable")


@pytest.mark.parametrize("bad", [5, -1])
def test_labels_outside_0_to_4(tmp_path: Path, bad: int) -> None:
    path = tmp_path / "x-cat.mat"
    smallnorb.write_matrix(path, np.array([0, 1, bad, 3], dtype=np.int32))
    expect_error(smallnorb.read_labels, path, f"label {bad} at record 2", "outside 0-4")


@pytest.mark.parametrize(
    ("column", "value", "phrase"),
    [
        (0, 10, "instance 10"),
        (1, 9, "elevation 9"),
        (2, 3, "azimuth 3"),
        (2, 36, "azimuth 36"),
        (3, 6, "lighting 6"),
        (3, -1, "lighting -1"),
    ],
)
def test_info_outside_its_ranges(tmp_path: Path, column: int, value: int, phrase: str) -> None:
    info = np.array(TRAIN_INFO, dtype=np.int32)
    info[3, column] = value
    path = tmp_path / "x-info.mat"
    smallnorb.write_matrix(path, info)
    expect_error(smallnorb.read_info, path, f"{phrase} at record 3")


def test_counts_that_differ_across_a_split(raw_dir: Path) -> None:
    path = raw_dir / smallnorb.file_name("test", "cat")
    smallnorb.write_matrix(path, np.array(TEST_CAT[:4], dtype=np.int32))
    message = expect_error(lambda _: prepare_cache(raw_dir, raw_dir / "c.h5"), path, "4 records")
    assert "has 5" in message


def test_missing_files_are_listed_together(raw_dir: Path) -> None:
    (raw_dir / smallnorb.file_name("train", "info")).unlink()
    (raw_dir / smallnorb.file_name("test", "dat")).unlink()
    with pytest.raises(EmcapsError) as info:
        smallnorb.find_raw_files(raw_dir)
    message = str(info.value)
    assert "missing 2 file(s)" in message
    assert "training-info.mat" in message and "testing-dat.mat" in message


def test_raw_dir_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="not a directory"):
        smallnorb.find_raw_files(tmp_path / "nope")

"""The synthetic set: official names and format, the real split and grid, reproducible renders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emcaps_cli.data import smallnorb, synth
from emcaps_cli.data.cache import load_cache, prepare_cache
from emcaps_cli.errors import EmcapsError


@pytest.fixture(scope="module")
def two_views(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic raw set with 2 views per instance (50 stereo pairs per split)."""
    out = tmp_path_factory.mktemp("synth") / "raw"
    synth.write_synthetic(out, views=2, seed=7)
    return out


@pytest.fixture(scope="module")
def one_view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 view per instance (25 stereo pairs per split), seed 7."""
    out = tmp_path_factory.mktemp("synth") / "raw1"
    synth.write_synthetic(out, views=1, seed=7)
    return out


def read_split(raw: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = smallnorb.find_raw_files(raw)
    pixels = np.concatenate(list(smallnorb.iter_dat_chunks(files[split, "dat"])))
    labels = smallnorb.read_labels(files[split, "cat"])
    return pixels, labels, smallnorb.read_info(files[split, "info"])


# --- geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [synth.ELLIPSOID, synth.BOX, synth.CYLINDER])
def test_unit_primitives_are_hit_where_expected(kind: int) -> None:
    p = synth.Primitive(kind, np.zeros(3), np.eye(3), np.array([1.0, 2.0, 1.0]), 0.5)
    dirs = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    origins = [np.array([5.0, 0, 0]), np.array([0, 0, 5.0]), np.array([5.0, 0, 0])]
    hits = [synth._intersect(p, o, d[None])[0] for o, d in zip(origins, dirs, strict=True)]
    assert hits[0] == pytest.approx(4.0)  # the x = +1 surface
    assert hits[1] == pytest.approx(4.0)  # the z = +1 surface (top / cap)
    assert hits[2] == np.inf  # a ray that passes beside the shape


def test_a_sphere_projects_to_a_disc_of_the_perspective_radius() -> None:
    radius = 0.5
    sphere = synth.Primitive(synth.ELLIPSOID, np.zeros(3), np.eye(3), np.full(3, radius), 0.5)
    geometry = synth.render_geometry([sphere], azimuth_deg=40, elevation_deg=50)
    area = geometry.hit.sum() / synth.SUPERSAMPLE**2  # in 96x96 pixels
    angular = np.tan(np.arcsin(radius / synth.CAMERA_DISTANCE))
    expected_radius = angular / synth.HALF_FOV_TAN * synth.RAW / 2
    assert area == pytest.approx(np.pi * expected_radius**2, rel=0.03)
    # The normal at the disc centre points back at the camera.
    centre = geometry.normals.mean(axis=0)
    assert centre @ -geometry.forward / np.linalg.norm(centre) > 0.999


def test_every_object_fits_its_unit_bound() -> None:
    for category in range(5):
        for instance in range(10):
            parts = synth.build_object(category, instance)
            corners = [np.abs(p.center) + np.abs(p.rotation) @ p.half_extents for p in parts]
            assert np.linalg.norm(np.max(corners, axis=0)) <= 1.0 + 1e-9


def test_instances_differ_in_proportions_but_are_fixed_per_instance() -> None:
    a, b = synth.build_object(3, 4), synth.build_object(3, 4)
    assert [p.half_extents.tolist() for p in a] == [p.half_extents.tolist() for p in b]
    c = synth.build_object(3, 5)
    assert [p.half_extents.tolist() for p in a] != [p.half_extents.tolist() for p in c]


# --- views and images -------------------------------------------------------------------


def test_view_grid_is_the_smallnorb_grid() -> None:
    grid = synth.view_grid()
    assert grid.shape == (972, 3)
    assert len({tuple(r) for r in grid}) == 972
    assert sorted(set(grid[:, 0])) == list(range(9))
    assert sorted(set(grid[:, 1])) == list(range(0, 35, 2))
    assert sorted(set(grid[:, 2])) == list(range(6))


def test_views_change_with_azimuth_elevation_and_lighting() -> None:
    views = np.array([[2, 0, 0], [2, 18, 0], [8, 0, 0], [2, 0, 5]])
    pairs = synth.render_views(0, 4, views, seed=0).astype(float)
    background = pairs[..., :3, :3].mean()
    assert 150 < background < 215  # light grey
    objects = [pairs[i, 0] < background - 25 for i in range(4)]  # dark object pixels
    assert all(mask.sum() > 200 for mask in objects)
    assert (objects[0] ^ objects[1]).sum() > 100  # turned half way round: new silhouette
    assert (objects[0] ^ objects[2]).sum() > 100  # seen from higher up: new silhouette
    assert np.abs(pairs[0, 0] - pairs[3, 0])[objects[0]].mean() > 10  # other light
    # Stereo: the two views are similar but not the same.
    difference = np.abs(pairs[0, 0] - pairs[0, 1]).mean()
    assert 1.0 < difference < 30.0


def test_sample_grid_png(tmp_path: Path) -> None:
    path = synth.save_sample_grid(tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.mode == "L"
        assert image.size == (len(synth.SAMPLE_VIEWS) * 100 + 4, 5 * 100 + 4)


# --- files ------------------------------------------------------------------------------


def test_writes_the_six_official_files(two_views: Path) -> None:
    names = sorted(p.name for p in two_views.iterdir())
    assert names == sorted(
        smallnorb.file_name(s, k) for s in ("train", "test") for k in "dat cat info".split()
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_follow_the_real_instance_split(two_views: Path, split: str) -> None:
    pixels, labels, info = read_split(two_views, split)
    assert pixels.shape == (50, 2, 96, 96)
    assert np.bincount(labels).tolist() == [10] * 5
    assert sorted(set(info[:, 0])) == list(smallnorb.SPLIT_INSTANCES[split])
    # File order: category, instance, then (elevation, azimuth, lighting).
    keys = [tuple(r) for r in np.column_stack([labels, info[:, 0], info[:, 1:]])]
    assert keys == sorted(keys)


def test_same_seed_same_bytes_other_seed_other_views(one_view: Path, tmp_path: Path) -> None:
    synth.write_synthetic(tmp_path / "again", views=1, seed=7)
    for path in one_view.iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()
    other = synth.plan_split("train", views=1, seed=8).info
    assert not np.array_equal(other, synth.plan_split("train", views=1, seed=7).info)


@pytest.mark.slow
def test_parallel_rendering_writes_the_same_bytes(one_view: Path, tmp_path: Path) -> None:
    synth.write_synthetic(tmp_path / "par", views=1, seed=7, workers=2)
    for path in one_view.iterdir():
        assert (tmp_path / "par" / path.name).read_bytes() == path.read_bytes()


def test_gzip_option_writes_the_same_content(one_view: Path, tmp_path: Path) -> None:
    synth.write_synthetic(tmp_path / "gz", views=1, seed=7, gzipped=True)
    for path in one_view.iterdir():
        packed = tmp_path / "gz" / (path.name + ".gz")
        assert gzip.decompress(packed.read_bytes()) == path.read_bytes()


def test_views_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(EmcapsError, match="--views 973"):
        synth.write_synthetic(tmp_path, views=973)


def test_round_trip_through_prepare(two_views: Path, tmp_path: Path) -> None:
    loaded = load_cache(prepare_cache(two_views, tmp_path / "c.h5"))
    for split, part in (("train", loaded.train), ("test", loaded.test)):
        pixels, labels, info = read_split(two_views, split)
        assert part.images.shape == (50, 2, 48, 48) and part.images.dtype == np.uint8
        np.testing.assert_array_equal(part.labels, labels)
        np.testing.assert_array_equal(part.info, info)
        assert set(part.info[:, 0]) == set(smallnorb.SPLIT_INSTANCES[split])
        first = pixels[0, 0].reshape(48, 2, 48, 2).mean(axis=(1, 3))
        assert np.abs(part.images[0, 0] - first).max() <= 0.5

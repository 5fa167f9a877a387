"""A procedural stand-in for smallNORB: 3D toy objects ray-cast on the real viewpoint grid.

Objects. Five categories, each a family of analytic primitives (ellipsoids, boxes, finite
cylinders) in an object frame with x forward, y left, z up, resting on z = 0:
    0 animal    four-legged: body, neck, head, snout, ears, tail, four legs
    1 human     torso, hips, head, neck, two arms (spread by a per-instance angle), two legs
    2 airplane  fuselage, two swept wings, tailplane, fin, optional engines
    3 truck     chassis, cab, cargo box or tank, 2-3 axles of wheels
    4 car       low body (box or rounded), cabin, four wheels
Ten instances per category; the proportions of instance k come from a generator seeded by
(category, k) only, so an instance is the same object under every `--seed`. Each object is
scaled so its bounding box has half-diagonal 1 and centred on the origin.

Camera. Perspective pinhole at distance CAMERA_DISTANCE from the origin, looking at it, at
azimuth 10°·a (codes a = 0, 2, ..., 34) and elevation 30° + 5°·e (codes e = 0..8), z up.
A stereo pair is two such cameras BASELINE apart along the camera's right axis, both aimed
at the origin (left view first). Images are rendered 2x supersampled then box-averaged to
96x96 grey levels.

Lighting. Lambertian: albedo · (ambient + intensity · max(0, n·l)), with the light fixed to
the camera rig (as the lamps were in the NORB set-up, the turntable moving the object). The
six lighting codes are six (direction, intensity, ambient) settings, see LIGHTS.

Background light grey (slightly brighter for brighter lightings), Gaussian pixel noise of
NOISE_SIGMA grey levels; noise is seeded by (seed, category, instance, elevation, azimuth).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emcaps_cli.data import smallnorb
from emcaps_cli.data.viewpoints import azimuth_degrees, elevation_degrees
from emcaps_cli.defaults import ALL_VIEWS
from emcaps_cli.errors import EmcapsError
from emcaps_cli.utils.atomic import check_output_dir

RAW = smallnorb.RAW_SIZE
SUPERSAMPLE = 2
CAMERA_DISTANCE = 6.0
HALF_FOV_TAN = 0.19  # tan of half the field of view: radius 1 at distance 6 spans 88%
BASELINE = 0.25  # stereo camera separation, in object half-diagonals (~2.4° vergence)
NOISE_SIGMA = 3.0  # grey levels

# (right, up, toward-camera) direction in the camera frame, intensity, ambient.
LIGHTS = (
    ((-0.5, 0.6, 0.6), 0.85, 0.25),  # 0 upper left
    ((0.5, 0.6, 0.6), 0.85, 0.25),  # 1 upper right
    ((0.0, 1.0, 0.3), 0.95, 0.20),  # 2 overhead
    ((-0.9, 0.1, 0.3), 0.80, 0.30),  # 3 raking from the left
    ((0.9, 0.1, 0.3), 0.80, 0.30),  # 4 raking from the right
    ((0.0, 0.2, 1.0), 0.55, 0.40),  # 5 dim frontal
)
BACKGROUND = (190.0, 192.0, 198.0, 184.0, 186.0, 176.0)  # grey level per lighting code

ELLIPSOID, BOX, CYLINDER = 0, 1, 2


# ---------------------------------------------------------------------------------------
# Objects


@dataclass
class Primitive:
    """A unit sphere / cube [-1,1]^3 / cylinder (axis z, |z|<=1, radius 1) mapped to the world
    by x_world = center + rotation @ (half_extents * x_local)."""

    kind: int
    center: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns are the local axes in world coordinates
    half_extents: np.ndarray  # (3,)
    albedo: float


def _rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll), angles in degrees: Rz Ry Rx."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


class _Builder:
    def __init__(self, albedo: float, rng: np.random.Generator) -> None:
        self.parts: list[Primitive] = []
        self.albedo, self.rng = albedo, rng

    def add(self, kind: int, center, half, rotation=None, shade: float = 0.0) -> None:
        albedo = float(np.clip(self.albedo + shade + self.rng.uniform(-0.03, 0.03), 0.1, 0.95))
        rotation = np.eye(3) if rotation is None else rotation
        self.parts.append(
            Primitive(kind, np.asarray(center, float), rotation, np.asarray(half, float), albedo)
        )

    def wheel(self, x: float, y: float, radius: float, width: float) -> None:
        # Cylinder axis (local z) along world y.
        self.add(CYLINDER, (x, y, radius), (radius, radius, width / 2), _rot(roll=90), -0.25)


def _animal(b: _Builder, u: Callable[[float, float], float]) -> None:
    length, width, height = u(1.3, 2.1), u(0.45, 0.7), u(0.45, 0.7)
    leg, leg_r = u(0.45, 0.95), u(0.08, 0.14)
    body_z = leg + 0.35 * height
    b.add(ELLIPSOID, (0, 0, body_z), (length / 2, width / 2, height / 2))
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * 0.32 * length, sy * 0.28 * width
            b.add(CYLINDER, (x, y, (body_z) / 2), (leg_r, leg_r, body_z / 2), shade=-0.05)
    neck_len, neck_up = u(0.25, 0.6), u(20, 70)
    nx = length / 2 - 0.05 + 0.5 * neck_len * np.cos(np.radians(neck_up))
    nz = body_z + 0.5 * neck_len * np.sin(np.radians(neck_up))
    b.add(ELLIPSOID, (nx, 0, nz), (neck_len / 2 + 0.1, 0.14, 0.14), _rot(pitch=-neck_up))
    head = u(0.2, 0.32)
    hx = nx + 0.5 * neck_len * np.cos(np.radians(neck_up))
    hz = nz + 0.5 * neck_len * np.sin(np.radians(neck_up))
    b.add(ELLIPSOID, (hx, 0, hz), (head, head * 0.85, head * 0.85))
    snout = u(0.12, 0.3)
    b.add(ELLIPSOID, (hx + head * 0.8, 0, hz - head * 0.2), (snout, head * 0.45, head * 0.4))
    ear = u(0.08, 0.18)
    for sy in (-1, 1):
        b.add(
            ELLIPSOID, (hx - 0.05, sy * head * 0.5, hz + head * 0.8), (0.05, 0.06, ear), shade=-0.1
        )
    tail, tail_up = u(0.3, 0.8), u(-40, 50)
    tx = -length / 2 - 0.4 * tail * np.cos(np.radians(tail_up))
    tz = body_z + 0.4 * tail * np.sin(np.radians(tail_up))
    b.add(ELLIPSOID, (tx, 0, tz), (tail / 2, 0.06, 0.06), _rot(pitch=tail_up), shade=-0.1)


def _human(b: _Builder, u: Callable[[float, float], float]) -> None:
    leg, torso, shoulders = u(0.8, 1.1), u(0.6, 0.85), u(0.36, 0.5)
    depth, head = u(0.2, 0.28), u(0.13, 0.18)
    stance = u(0, 12)
    for sy in (-1, 1):
        b.add(
            CYLINDER,
            (0, sy * (0.1 + 0.5 * leg * np.sin(np.radians(stance))), leg / 2),
            (0.09, 0.1, leg / 2),
            _rot(roll=sy * stance),
            shade=-0.1,
        )
    b.add(ELLIPSOID, (0, 0, leg), (depth / 2 + 0.02, shoulders * 0.45, 0.15))
    torso_z = leg + torso / 2
    b.add(BOX, (0, 0, torso_z), (depth / 2, shoulders / 2, torso / 2))
    b.add(CYLINDER, (0, 0, leg + torso + 0.05), (0.06, 0.06, 0.07))
    b.add(ELLIPSOID, (0.02, 0, leg + torso + 0.08 + head), (head * 0.95, head * 0.85, head))
    arm = u(0.6, 0.85)
    spreads = (u(5, 80), u(5, 80)) if b.rng.uniform() < 0.5 else (u(5, 40),) * 2
    for sy, spread in zip((-1, 1), spreads, strict=True):
        sz = leg + torso - 0.06
        s = np.radians(spread)
        center = (
            0,
            sy * (shoulders / 2 + 0.06 + 0.5 * arm * np.sin(s)),
            sz - 0.5 * arm * np.cos(s),
        )
        b.add(CYLINDER, center, (0.07, 0.07, arm / 2), _rot(roll=-sy * spread), shade=0.05)


def _airplane(b: _Builder, u: Callable[[float, float], float]) -> None:
    length, radius = u(2.0, 3.0), u(0.14, 0.24)
    z = radius + u(0.05, 0.2)
    b.add(ELLIPSOID, (0, 0, z), (length / 2, radius, radius))
    span, chord, sweep = u(1.6, 2.8), u(0.3, 0.55), u(0, 35)
    wing_x, wing_z = u(-0.1, 0.2) * length, z + u(-0.6, 0.3) * radius
    for sy in (-1, 1):
        half = span / 4
        cx = wing_x - half * np.tan(np.radians(sweep))
        b.add(BOX, (cx, sy * half, wing_z), (chord / 2, half, 0.03), _rot(yaw=sy * sweep), 0.05)
    tail_span = span * u(0.25, 0.4)
    for sy in (-1, 1):
        half = tail_span / 4
        b.add(BOX, (-length / 2 + 0.15, sy * half, z), (0.14, half, 0.025), _rot(yaw=sy * 20))
    fin = u(0.3, 0.6)
    b.add(BOX, (-length / 2 + 0.2, 0, z + fin / 2), (0.2, 0.025, fin / 2), _rot(pitch=-25))
    if b.rng.uniform() < 0.6:
        for sy in (-1, 1):
            b.add(
                CYLINDER,
                (wing_x + 0.1, sy * span * 0.2, wing_z - 0.12),
                (0.08, 0.08, 0.2),
                _rot(pitch=90),
                -0.15,
            )


def _truck(b: _Builder, u: Callable[[float, float], float]) -> None:
    wheel, width = u(0.18, 0.28), u(0.75, 0.95)
    cab, cargo, cab_h, cargo_h = u(0.5, 0.8), u(1.2, 2.0), u(0.6, 0.9), u(0.8, 1.2)
    floor = wheel * 1.3
    total = cab + cargo + 0.1
    front = total / 2
    b.add(BOX, (0, 0, floor), (total / 2, width * 0.4, 0.08), shade=-0.2)
    b.add(BOX, (front - cab / 2, 0, floor + cab_h / 2), (cab / 2, width / 2, cab_h / 2), None, 0.05)
    cargo_x = front - cab - 0.1 - cargo / 2
    if b.rng.uniform() < 0.3:  # tanker
        r = min(width / 2, cargo_h / 2)
        b.add(CYLINDER, (cargo_x, 0, floor + r + 0.05), (r, r, cargo / 2), _rot(pitch=90))
    else:
        b.add(BOX, (cargo_x, 0, floor + cargo_h / 2), (cargo / 2, width / 2 + 0.03, cargo_h / 2))
    axles = [front - cab / 2, cargo_x - cargo * 0.3]
    if b.rng.uniform() < 0.5:
        axles.append(cargo_x + cargo * 0.1)
    for x in axles:
        for sy in (-1, 1):
            b.wheel(x, sy * width * 0.45, wheel, 0.16)


def _car(b: _Builder, u: Callable[[float, float], float]) -> None:
    length, width, wheel = u(1.7, 2.3), u(0.75, 0.95), u(0.16, 0.22)
    body_h, cabin_h, cabin = u(0.25, 0.4), u(0.22, 0.38), u(0.4, 0.6)
    floor = wheel * 0.9
    rounded = b.rng.uniform() < 0.5
    b.add(BOX, (0, 0, floor + body_h / 2), (length / 2, width / 2, body_h / 2))
    if rounded:  # a curved bonnet and boot over the box body
        b.add(ELLIPSOID, (0, 0, floor + body_h), (length / 2, width / 2, body_h * 0.35))
    cx = u(-0.15, 0.05) * length
    b.add(
        ELLIPSOID if rounded else BOX,
        (cx, 0, floor + body_h + cabin_h * (0.25 if rounded else 0.5)),
        (cabin * length / 2, width * 0.42, cabin_h * (1.0 if rounded else 0.5)),
        shade=-0.12,
    )
    for x in (length * 0.32, -length * 0.32):
        for sy in (-1, 1):
            b.wheel(x, sy * width * 0.45, wheel, 0.14)


_FAMILIES = (_animal, _human, _airplane, _truck, _car)


def build_object(category: int, instance: int) -> list[Primitive]:
    """The primitives of one toy, centred on the origin, bounding-box half-diagonal 1."""
    rng = np.random.default_rng([category, instance, 20180101])
    builder = _Builder(albedo=rng.uniform(0.45, 0.7), rng=rng)
    _FAMILIES[category](builder, lambda lo, hi: float(rng.uniform(lo, hi)))
    parts = builder.parts
    # World-axis half extents of each primitive's oriented box bound the object.
    lows = np.array([p.center - np.abs(p.rotation) @ p.half_extents for p in parts])
    highs = np.array([p.center + np.abs(p.rotation) @ p.half_extents for p in parts])
    lo, hi = lows.min(axis=0), highs.max(axis=0)
    middle, scale = (lo + hi) / 2, 1.0 / np.linalg.norm((hi - lo) / 2)
    for p in parts:
        p.center = (p.center - middle) * scale
        p.half_extents = p.half_extents * scale
    return parts


# ---------------------------------------------------------------------------------------
# Rendering


def camera_frame(azimuth_deg: float, elevation_deg: float, offset: float = 0.0) -> tuple:
    """(position (3,), right, up, forward) of a camera aimed at the origin.

    `offset` shifts the camera along its right axis (stereo), re-aiming it at the origin.
    """
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    position = CAMERA_DISTANCE * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    right = np.array([-np.sin(a), np.cos(a), 0.0])  # forward x z_up, normalised
    position = position + offset * right
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return position, right, up, forward


_GRID_CACHE: dict[int, np.ndarray] = {}


def _pixel_grid(n: int) -> np.ndarray:
    """(n*n, 2) image-plane coordinates (x right, y up) of pixel centres in [-1, 1]."""
    if n not in _GRID_CACHE:
        c = (np.arange(n) + 0.5) / n * 2 - 1
        ys, xs = np.meshgrid(-c, c, indexing="ij")  # row 0 is the top
        _GRID_CACHE[n] = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    return _GRID_CACHE[n]


def _intersect(p: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Ray parameter t of the first hit (inf for a miss), rays origin + t dirs, dirs (R, 3)."""
    inv = (1.0 / p.half_extents).astype(np.float32)
    o = (p.rotation.T @ (origin - p.center)).astype(np.float32) * inv  # (3,)
    d = (dirs @ p.rotation.astype(np.float32)) * inv  # (R, 3) local directions
    inf = np.float32(np.inf)
    if p.kind == ELLIPSOID:
        a = np.einsum("ij,ij->i", d, d)
        half_b = d @ o
        c = o @ o - 1
        disc = half_b * half_b - a * c
        with np.errstate(invalid="ignore"):
            t = (-half_b - np.sqrt(disc)) / a
        return np.where((disc >= 0) & (t > 0), t, inf)
    if p.kind == BOX:
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-1 - o) / d, (1 - o) / d
        near = np.minimum(t1, t2).max(axis=1)
        far = np.maximum(t1, t2).min(axis=1)
        return np.where((far >= near) & (near > 0), near, inf)
    # Cylinder: the side (x^2 + y^2 = 1 with |z| <= 1) or a cap (z = +-1 with x^2 + y^2 <= 1).
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dy * dy
    half_b = o[0] * dx + o[1] * dy
    c = o[0] ** 2 + o[1] ** 2 - 1
    disc = half_b * half_b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        side = (-half_b - np.sqrt(disc)) / a
        side = np.where((disc >= 0) & (np.abs(o[2] + side * dz) <= 1) & (side > 0), side, inf)
        cap = (-np.sign(dz) - o[2]) / dz  # the cap facing the ray
    cx, cy = o[0] + cap * dx, o[1] + cap * dy
    cap = np.where((cx * cx + cy * cy <= 1) & (cap > 0), cap, inf)
    return np.minimum(side, cap)


def _normals(p: Primitive, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Unit world normals (R, 3) at the hits origin + t dirs on `p`."""
    inv = 1.0 / p.half_extents
    local = ((origin + t[:, None] * dirs - p.center) @ p.rotation) * inv  # unit-shape coords
    if p.kind == ELLIPSOID:
        n_local = local * inv
    elif p.kind == BOX:
        axis = np.argmax(np.abs(local), axis=1)
        n_local = np.zeros_like(local)
        n_local[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
    else:
        on_cap = np.abs(local[:, 2]) > 1 - 1e-3
        n_local = np.where(on_cap[:, None], [0.0, 0.0, 1.0] * local, local * [1.0, 1.0, 0.0])
        n_local = n_local * inv
    n = n_local @ p.rotation.T
    return n / np.linalg.norm(n, axis=1, keepdims=True)


@dataclass
class Geometry:
    """One camera's view of an object at SUPERSAMPLE resolution, R = (96 SUPERSAMPLE)^2 rays."""

    hit: np.ndarray  # (R,) bool, the ray meets the object
    normals: np.ndarray  # (H, 3) float32 world unit normals of the H hit rays, in ray order
    albedo: np.ndarray  # (H,) float32
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray


def render_geometry(
    parts: list[Primitive], azimuth_deg: float, elevation_deg: float, offset: float = 0.0
) -> Geometry:
    """Ray-cast the nearest primitive per pixel (z-buffer over analytic hits).

    Only rays that pass within distance 1 of the origin can hit the object (its bounding
    box's half-diagonal is 1), so the others are dropped before testing any primitive.
    """
    n = RAW * SUPERSAMPLE
    position, right, up, forward = camera_frame(azimuth_deg, elevation_deg, offset)
    grid = _pixel_grid(n) * HALF_FOV_TAN
    dirs = forward + grid[:, :1] * right + grid[:, 1:] * up  # (R, 3)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    along = dirs @ position
    active = np.flatnonzero(position @ position - along * along < 1.0)
    rays = dirs[active].astype(np.float32)  # (A, 3)
    depth = np.full(len(rays), np.inf, dtype=np.float32)
    owner = np.full(len(rays), -1)
    for i, p in enumerate(parts):
        t = _intersect(p, position, rays)
        closer = t < depth
        depth[closer] = t[closer]
        owner[closer] = i
    hit = np.zeros(n * n, dtype=bool)
    hit[active[owner >= 0]] = True
    normals = np.zeros((len(rays), 3), dtype=np.float32)
    albedo = np.zeros(len(rays), dtype=np.float32)
    for i, p in enumerate(parts):
        mine = owner == i
        if mine.any():
            normals[mine] = _normals(p, position, rays[mine], depth[mine].astype(float))
            albedo[mine] = p.albedo
    seen = owner >= 0  # active rays are in pixel order, so these line up with hit
    return Geometry(hit, normals[seen], albedo[seen], right, up, forward)


def shade(geometry: Geometry, lighting: int) -> np.ndarray:
    """Lambertian grey levels float (96, 96) in 0..255 for one lighting code, no noise."""
    (r, u, toward), intensity, ambient = LIGHTS[lighting]
    light = r * geometry.right + u * geometry.up - toward * geometry.forward
    light /= np.linalg.norm(light)
    lambert = np.maximum(geometry.normals @ light.astype(np.float32), 0.0)
    value = np.full(geometry.hit.shape, BACKGROUND[lighting], dtype=np.float32)
    value[geometry.hit] = 255.0 * geometry.albedo * (ambient + intensity * lambert)
    return value.reshape(RAW, SUPERSAMPLE, RAW, SUPERSAMPLE).mean(axis=(1, 3))


def _to_uint8(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image + rng.normal(0.0, NOISE_SIGMA, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_views(category: int, instance: int, views: np.ndarray, seed: int) -> np.ndarray:
    """Stereo pairs uint8 (len(views), 2, 96, 96) for rows (elevation, azimuth, lighting).

    Rows sharing (elevation, azimuth) reuse one ray cast; only the shading differs.
    """
    parts = build_object(category, instance)
    out = np.empty((len(views), 2, RAW, RAW), dtype=np.uint8)
    keys = [tuple(v) for v in views[:, :2]]
    for key in dict.fromkeys(keys):
        elevation, azimuth = key
        rows = [i for i, k in enumerate(keys) if k == key]
        rng = np.random.default_rng([seed, category, instance, elevation, azimuth])
        cams = [
            render_geometry(parts, azimuth_degrees(azimuth), elevation_degrees(elevation), s)
            for s in (-BASELINE / 2, BASELINE / 2)
        ]
        for row in rows:
            for side, geometry in enumerate(cams):
                out[row, side] = _to_uint8(shade(geometry, int(views[row, 2])), rng)
    return out


# ---------------------------------------------------------------------------------------
# Data set files


def view_grid() -> np.ndarray:
    """All 972 (elevation, azimuth, lighting) code rows, sorted in that order."""
    e, a, light = np.meshgrid(
        list(smallnorb.ELEVATIONS),
        list(smallnorb.AZIMUTHS),
        list(smallnorb.LIGHTINGS),
        indexing="ij",
    )
    return np.stack([e.ravel(), a.ravel(), light.ravel()], axis=1).astype(np.int64)


def choose_views(category: int, instance: int, views: int, seed: int) -> np.ndarray:
    """`views` distinct grid rows for one instance, sorted; all 972 when views == 972."""
    grid = view_grid()
    if views == len(grid):
        return grid
    rng = np.random.default_rng([seed, category, instance, 1])
    return grid[np.sort(rng.choice(len(grid), size=views, replace=False))]


@dataclass
class SplitPlan:
    """Records of one split in file order: category, then instance, then view."""

    units: list[tuple[int, int, np.ndarray]]  # (category, instance, views (V, 3))

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.full(len(v), c, np.int32) for c, _, v in self.units])

    @property
    def info(self) -> np.ndarray:
        """int32 (N, 4) instance, elevation, azimuth, lighting."""
        rows = [np.column_stack([np.full(len(v), i), v]) for _, i, v in self.units]
        return np.concatenate(rows).astype(np.int32)


def plan_split(split: str, views: int, seed: int) -> SplitPlan:
    units = [
        (category, instance, choose_views(category, instance, views, seed))
        for category in range(len(smallnorb.CATEGORIES))
        for instance in smallnorb.SPLIT_INSTANCES[split]
    ]
    return SplitPlan(units)


def _render_unit(job: tuple[int, int, np.ndarray, int]) -> np.ndarray:
    category, instance, views, seed = job
    return render_views(category, instance, views, seed)


def write_synthetic(
    out_dir: str | os.PathLike,
    views: int = ALL_VIEWS,
    seed: int = 0,
    gzipped: bool = False,
    workers: int = 1,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write the six smallNORB-format files of a synthetic set into `out_dir`.

    Per split: 5 categories x 5 instances x `views` records. Each file is written atomically.
    The bytes depend only on (views, seed, gzipped), not on `workers`. `on_start(total)`
    announces the number of stereo pairs, `on_progress(k)` reports k more done.
    """
    if not 1 <= views <= ALL_VIEWS:
        raise EmcapsError(f"--views {views}: expected 1..{ALL_VIEWS}")
    if workers < 1:
        raise EmcapsError(f"--workers {workers}: need at least 1 render process")
    check_output_dir(out_dir, "OUT_DIR")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = {split: plan_split(split, views, seed) for split in smallnorb.SPLITS}
    if on_start is not None:
        on_start(sum(len(p.labels) for p in plans.values()))
    written = []
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        for split, plan in plans.items():
            names = {k: out_dir / smallnorb.file_name(split, k, gzipped) for k in smallnorb.KINDS}
            smallnorb.write_matrix(names["cat"], plan.labels)
            smallnorb.write_matrix(names["info"], plan.info)
            jobs = [(c, i, v, seed) for c, i, v in plan.units]
            blocks = pool.imap(_render_unit, jobs) if pool else map(_render_unit, jobs)
            with smallnorb.dat_writer(names["dat"], len(plan.labels)) as writer:
                for block in blocks:
                    writer.write(block)
                    if on_progress is not None:
                        on_progress(len(block))
            written += [names["dat"], names["cat"], names["info"]]
    finally:
        if pool is not None:
            pool.terminate()
    return written


# ---------------------------------------------------------------------------------------
# Preview


SAMPLE_VIEWS = (  # (elevation, azimuth, lighting) codes: a turn, then elevation, then lights
    (2, 0, 0),
    (2, 6, 0),
    (2, 12, 0),
    (2, 18, 0),
    (2, 24, 0),
    (2, 30, 0),
    (0, 4, 0),
    (8, 4, 0),
    (4, 4, 2),
    (4, 4, 3),
    (4, 4, 4),
    (4, 4, 5),
)


def save_sample_grid(path: str | os.PathLike, instance: int = 0, seed: int = 0) -> Path:
    """PNG grid of left views: rows = the 5 categories, columns = SAMPLE_VIEWS."""
    from PIL import Image

    from emcaps_cli.utils.atomic import atomic_path

    views = np.array(SAMPLE_VIEWS, dtype=np.int64)
    gap = 4
    rows = len(smallnorb.CATEGORIES)
    canvas = np.full((rows * (RAW + gap) + gap, len(views) * (RAW + gap) + gap), 255, np.uint8)
    for category in range(rows):
        pairs = render_views(category, instance, views, seed)
        for column, pair in enumerate(pairs):
            y, x = gap + category * (RAW + gap), gap + column * (RAW + gap)
            canvas[y : y + RAW, x : x + RAW] = pair[0]
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path

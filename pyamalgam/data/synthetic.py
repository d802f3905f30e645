"""``SyntheticScenes``: procedurally rendered indoor rooms with exact dense ground truth.

Every sample is a box-shaped room (floor, ceiling, four walls) furnished with boxes, spheres,
cylinders and tables at random poses, seen by a pinhole camera standing in the room. Each pixel's
ray (through the pixel centre) is intersected analytically with every surface, vectorised over all
pixels with NumPy in float64, which gives exact class, depth and normal ground truth. The image is
Lambertian shading from a point light (with cast shadows), procedural per-class textures, a gamma
curve and Gaussian sensor noise, so all three tasks have to be learnt from RGB.

Conventions (shared with the rest of :mod:`pyamalgam.data`):

* camera coordinates: x right, y down, z forward (OpenCV convention);
* ``depth`` is z-depth, the distance along the optical axis (not along the ray), in metres;
* ``normal`` is the unit surface normal in camera coordinates, oriented towards the camera
  (``dot(normal, X) < 0`` for the back-projected point ``X``);
* intrinsics: square pixels, horizontal field of view :data:`HFOV_DEGREES`, principal point at
  the image centre, pixel ``(u, v)`` (column, row) has its centre at ``(u + 0.5, v + 0.5)``;
  see :attr:`SyntheticScenes.intrinsics`.

World coordinates (only seen through :meth:`SyntheticScenes.scene`): z up, the floor is ``z = 0``,
the room spans ``[0, X] x [0, Y] x [0, Z]``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import (Sample, apply_transform, check_choice, check_index, check_int,
                      check_resolution, check_transform)

__all__ = ["SyntheticScenes", "SceneSpec", "Primitive", "CLASS_NAMES", "HFOV_DEGREES"]

#: Semantic classes of :class:`SyntheticScenes`, by id.
CLASS_NAMES = ("floor", "ceiling", "wall", "box", "sphere", "cylinder", "table")
FLOOR, CEILING, WALL, BOX, SPHERE, CYLINDER, TABLE = range(len(CLASS_NAMES))

#: Horizontal field of view of the synthetic camera (fixed, so depth is learnable from RGB).
HFOV_DEGREES = 60.0
#: Sensor range: pixels whose z-depth exceeds it are invalid (``mask`` False, depth 0).
MAX_DEPTH = 8.0
#: Surfaces seen more obliquely than this (angle between ray and normal) are invalid.
MAX_INCIDENCE_DEGREES = 85.0
#: Standard deviation of the additive Gaussian sensor noise on the image.
IMAGE_NOISE_STD = 0.02

_SPLIT_STREAMS = {"train": 0, "unlabelled": 1, "test": 2}
_SPLIT_ALIASES = {"unlabeled": "unlabelled"}
#: Per-split default ``size`` (labelled sets small, the unlabelled set larger, as in the paper).
DEFAULT_SIZES = {"train": 1000, "unlabelled": 5000, "test": 200}
# Bump whenever rendering changes: it is part of the cache key.
_RENDER_VERSION = 1
_EPS = 1e-9
# Screen-space / light-cone culling of ray-primitive tests; a pure speed-up (tests switch it off
# and check the output is bit-identical).
_CULLING = True


# ----------------------------------------------------------------------------------- geometry
def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _apply(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` for ``v`` of shape (3, N), written out so it is bit-reproducible (no BLAS)."""
    return np.stack([m[i, 0] * v[0] + m[i, 1] * v[1] + m[i, 2] * v[2] for i in range(3)])


def _apply_t(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m.T @ v`` for ``v`` of shape (3, N)."""
    return np.stack([m[0, j] * v[0] + m[1, j] * v[1] + m[2, j] * v[2] for j in range(3)])


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@dataclasses.dataclass(frozen=True)
class Primitive:
    """One solid in a scene.

    ``kind`` is ``"box"`` (``size`` = half extents along the local axes), ``"sphere"``
    (``size[0]`` = radius) or ``"cylinder"`` (``size[0]`` = radius, ``size[2]`` = half height,
    axis = local z). ``rotation`` maps local to world coordinates, ``center`` is in world
    coordinates (metres). ``label`` is the class id; a table is five boxes labelled ``table``.
    """

    kind: str
    label: int
    center: np.ndarray
    rotation: np.ndarray
    size: np.ndarray
    color1: np.ndarray
    color2: np.ndarray
    pattern: float  # pattern frequency / tile size, class dependent

    # -- ray casting: o (3, 1) or (3, N), d (3, N); returns t (N,), inf where missed
    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        if self.kind == "sphere":
            return self._sphere(o, d)
        ol = _apply_t(self.rotation, o - self.center[:, None])
        dl = _apply_t(self.rotation, d)
        return self._box(ol, dl) if self.kind == "box" else self._cylinder(ol, dl)

    def _box(self, ol, dl):
        h = self.size[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            t1 = (-h - ol) * inv
            t2 = (h - ol) * inv
        tnear = np.minimum(t1, t2).max(axis=0)
        tfar = np.maximum(t1, t2).min(axis=0)
        hit = (tfar >= tnear) & (tnear > _EPS)
        return np.where(hit, tnear, np.inf)

    def _sphere(self, o, d):
        oc = o - self.center[:, None]
        a = _dot(d, d)
        b = _dot(oc, d)
        c = _dot(oc, oc) - self.size[0] ** 2
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def _cylinder(self, ol, dl):
        r, hh = self.size[0], self.size[2]
        a = dl[0] * dl[0] + dl[1] * dl[1]
        b = ol[0] * dl[0] + ol[1] * dl[1]
        c = ol[0] * ol[0] + ol[1] * ol[1] - r * r
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            zs = ol[2] + ts * dl[2]
            side = (disc >= 0) & (a > 0) & (ts > _EPS) & (np.abs(zs) <= hh)
            zc = np.where(dl[2] > 0, -hh, hh)
            tc = (zc - ol[2]) / dl[2]
            xc = ol[0] + tc * dl[0]
            yc = ol[1] + tc * dl[1]
            cap = (dl[2] != 0) & (tc > _EPS) & (xc * xc + yc * yc <= r * r)
        return np.minimum(np.where(side, ts, np.inf), np.where(cap, tc, np.inf))

    @property
    def bound_radius(self) -> float:
        """Radius of a sphere about ``center`` enclosing the primitive (for culling)."""
        if self.kind == "box":
            return float(np.sqrt((self.size ** 2).sum()))
        if self.kind == "sphere":
            return float(self.size[0])
        return float(math.hypot(self.size[0], self.size[2]))

    # -- surface properties at points p (3, N) lying on the surface
    def local(self, p: np.ndarray) -> np.ndarray:
        return _apply_t(self.rotation, p - self.center[:, None])

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Outward unit normal (world coordinates) at surface points ``p``."""
        if self.kind == "sphere":
            return (p - self.center[:, None]) / self.size[0]
        pl = self.local(p)
        nl = np.zeros_like(pl)
        if self.kind == "box":
            rel = np.abs(pl) / self.size[:, None]
            axis = rel.argmax(axis=0)
            cols = np.arange(pl.shape[1])
            nl[axis, cols] = np.sign(pl[axis, cols])
        else:
            r, hh = self.size[0], self.size[2]
            rho = np.sqrt(pl[0] ** 2 + pl[1] ** 2)
            on_cap = np.abs(np.abs(pl[2]) - hh) < np.abs(rho - r)
            safe = np.maximum(rho, 1e-12)
            nl[0] = np.where(on_cap, 0.0, pl[0] / safe)
            nl[1] = np.where(on_cap, 0.0, pl[1] / safe)
            nl[2] = np.where(on_cap, np.sign(pl[2]), 0.0)
        return _apply(self.rotation, nl)

    def albedo(self, p: np.ndarray) -> np.ndarray:
        """Procedural texture (linear RGB, (3, N)) at surface points ``p``."""
        pl = self.local(p)
        if self.label == BOX:  # crate: planks with dark seams
            w = _frac((pl[0] + pl[1] + pl[2]) / self.pattern) < 0.1
            mix = np.where(w, 1.0, 0.0)
        elif self.label == SPHERE:  # beach ball: alternating sectors
            sector = np.floor((np.arctan2(pl[1], pl[0]) + math.pi) / (2 * math.pi) * 6.0)
            mix = np.mod(sector, 2.0)
        elif self.label == CYLINDER:  # rings along the axis
            mix = (_frac(pl[2] / self.pattern) < 0.5).astype(np.float64)
        else:  # table: wood grain
            mix = 0.5 + 0.5 * np.sin(self.pattern * (pl[0] + 0.15 * np.sin(9.0 * pl[1] + 3.0 * pl[2])))
        return self.color1[:, None] * (1.0 - mix) + self.color2[:, None] * mix


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _hash01(i: np.ndarray, j: np.ndarray, salt: float) -> np.ndarray:
    return _frac(np.sin(i * 12.9898 + j * 78.233 + salt) * 43758.5453)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one sample (resolution independent).

    ``room``: (X, Y, Z) extent in metres; ``camera_position`` (3,) and ``camera_rotation``
    (3, 3, camera-to-world: its columns are the camera's x-right, y-down, z-forward axes in world
    coordinates) so that a camera point ``Xc`` is at ``camera_rotation @ Xc + camera_position``;
    ``light``: point light position; ``primitives``: the furniture; ``dropouts``: invalid-depth
    blobs as (cu, cv, ru, rv) in normalised image coordinates (fractions of width/height).
    """

    room: np.ndarray
    camera_position: np.ndarray
    camera_rotation: np.ndarray
    light: np.ndarray
    light_power: float
    primitives: Tuple[Primitive, ...]
    floor_colors: Tuple[np.ndarray, np.ndarray]
    floor_tile: float
    wall_color: np.ndarray
    wall_stripe: float
    ceiling_color: np.ndarray
    dropouts: np.ndarray


def _jitter(rng: np.random.Generator, base, amount: float) -> np.ndarray:
    return np.clip(np.asarray(base, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0.02, 0.98)


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    """Draw a random room, camera, light and furniture from ``rng``."""
    room = np.array([rng.uniform(4.0, 7.0), rng.uniform(4.5, 9.0), rng.uniform(2.5, 3.2)])
    cam = np.array([rng.uniform(0.6, room[0] - 0.6), rng.uniform(0.3, 1.2), rng.uniform(1.1, 1.7)])
    yaw = math.radians(rng.uniform(-35.0, 35.0))
    pitch = math.radians(rng.uniform(3.0, 25.0))
    roll = math.radians(rng.uniform(-4.0, 4.0))
    fwd = np.array([math.cos(pitch) * math.sin(yaw), math.cos(pitch) * math.cos(yaw), -math.sin(pitch)])
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    cr, sr = math.cos(roll), math.sin(roll)
    right, down = cr * right + sr * down, -sr * right + cr * down
    cam_rot = np.stack([right, down, fwd], axis=1)
    light = np.array([rng.uniform(0.5, room[0] - 0.5), rng.uniform(0.5, room[1] - 0.5), room[2] - 0.05])
    light_power = rng.uniform(0.8, 1.2)

    prims: List[Primitive] = []
    footprints: List[Tuple[float, float, float]] = []  # (x, y, radius)

    def place(radius: float) -> Optional[Tuple[float, float]]:
        for _ in range(30):
            lo_y = min(cam[1] + 0.8, room[1] - radius - 0.05)
            x = rng.uniform(radius + 0.05, room[0] - radius - 0.05)
            y = rng.uniform(lo_y, room[1] - radius - 0.05)
            if math.hypot(x - cam[0], y - cam[1]) < radius + 0.6:
                continue
            if all(math.hypot(x - fx, y - fy) > radius + fr + 0.05 for fx, fy, fr in footprints):
                footprints.append((x, y, radius))
                return x, y
        return None

    def box(label, center, rotation, half, c1, c2, pattern):
        prims.append(Primitive("box", label, np.asarray(center, float), rotation, np.asarray(half, float),
                               c1, c2, pattern))

    n_objects = int(rng.integers(3, 9))
    n_tables = 0
    for _ in range(n_objects):
        kind = rng.choice(["box", "sphere", "cylinder", "table"], p=[0.3, 0.25, 0.25, 0.2])
        if kind == "table" and n_tables >= 2:
            kind = "box"
        if kind == "box":
            half = np.array([rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.6)])
            at = place(float(np.hypot(half[0], half[1])))
            if at is None:
                continue
            c1 = _jitter(rng, (0.72, 0.50, 0.26), 0.08)
            box(BOX, (at[0], at[1], half[2]), _rot_z(rng.uniform(0, math.pi)), half, c1, 0.45 * c1,
                rng.uniform(0.12, 0.3))
        elif kind == "sphere":
            r = rng.uniform(0.15, 0.5)
            at = place(r)
            if at is None:
                continue
            rot = _rot_z(rng.uniform(0, 2 * math.pi)) @ _rot_x(rng.uniform(0, math.pi))
            c1 = _jitter(rng, (0.85, 0.15, 0.15), 0.12) if rng.random() < 0.5 else _jitter(rng, (0.15, 0.25, 0.85), 0.12)
            prims.append(Primitive("sphere", SPHERE, np.array([at[0], at[1], r]), rot, np.array([r, r, r]),
                                   c1, _jitter(rng, (0.92, 0.92, 0.9), 0.05), 0.0))
        elif kind == "cylinder":
            r, hh = rng.uniform(0.12, 0.4), rng.uniform(0.2, 0.75)
            lying = rng.random() < 0.3
            at = place(float(math.hypot(hh, r)) if lying else r)
            if at is None:
                continue
            yaw_c = rng.uniform(0, math.pi)
            rot = _rot_z(yaw_c) @ _rot_x(math.pi / 2) if lying else _rot_z(yaw_c)
            cz = r if lying else hh
            c1 = _jitter(rng, (0.18, 0.62, 0.52), 0.1)
            prims.append(Primitive("cylinder", CYLINDER, np.array([at[0], at[1], cz]), rot, np.array([r, r, hh]),
                                   c1, 0.55 * c1 + 0.3, rng.uniform(0.1, 0.3)))
        else:
            hx, hy, height = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.65, 0.8)
            at = place(float(np.hypot(hx, hy)))
            if at is None:
                continue
            n_tables += 1
            rot = _rot_z(rng.uniform(0, math.pi))
            c1 = _jitter(rng, (0.36, 0.20, 0.10), 0.06)
            c2, grain = 0.7 * c1, rng.uniform(25.0, 45.0)
            top_h = 0.025
            center = np.array([at[0], at[1], height - top_h])
            box(TABLE, center, rot, (hx, hy, top_h), c1, c2, grain)
            leg_h = (height - 2 * top_h) / 2
            for sx in (-1, 1):
                for sy in (-1, 1):
                    off = rot @ np.array([sx * (hx - 0.07), sy * (hy - 0.07), 0.0])
                    box(TABLE, (at[0] + off[0], at[1] + off[1], leg_h), rot, (0.03, 0.03, leg_h), c1, c2, grain)
            if rng.random() < 0.6:  # something on the table
                r = rng.uniform(0.08, min(0.2, hy))
                if rng.random() < 0.5:
                    c1s = _jitter(rng, (0.85, 0.15, 0.15), 0.12)
                    prims.append(Primitive("sphere", SPHERE, np.array([at[0], at[1], height + r]), _rot_x(0.3),
                                           np.array([r, r, r]), c1s, _jitter(rng, (0.92, 0.92, 0.9), 0.05), 0.0))
                else:
                    cb = _jitter(rng, (0.72, 0.50, 0.26), 0.08)
                    box(BOX, (at[0], at[1], height + r), _rot_z(rng.uniform(0, math.pi)), (r, r, r), cb,
                        0.45 * cb, rng.uniform(0.08, 0.15))

    floor_c1 = _jitter(rng, (0.58, 0.45, 0.32), 0.08)
    n_drop = int(rng.integers(0, 4))
    dropouts = np.stack([rng.uniform(0.05, 0.95, n_drop), rng.uniform(0.05, 0.95, n_drop),
                         rng.uniform(0.02, 0.08, n_drop), rng.uniform(0.02, 0.08, n_drop)], axis=1)
    return SceneSpec(
        room=room, camera_position=cam, camera_rotation=cam_rot, light=light, light_power=float(light_power),
        primitives=tuple(prims), floor_colors=(floor_c1, 0.6 * floor_c1), floor_tile=float(rng.uniform(0.3, 0.6)),
        wall_color=_jitter(rng, (0.78, 0.74, 0.64), 0.1), wall_stripe=float(rng.uniform(0.08, 0.3)),
        ceiling_color=_jitter(rng, (0.9, 0.9, 0.88), 0.04), dropouts=dropouts)


def intrinsics_for(resolution: Tuple[int, int]) -> np.ndarray:
    """3x3 pinhole matrix for ``resolution`` (H, W): fx = fy, principal point at the centre."""
    h, w = resolution
    f = (w / 2.0) / math.tan(math.radians(HFOV_DEGREES) / 2.0)
    return np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])


def _screen_bounds(prim: Primitive, rot: np.ndarray, o: np.ndarray, k: np.ndarray,
                   resolution: Tuple[int, int]) -> Optional[np.ndarray]:
    """Flat indices of the pixels whose rays can hit ``prim`` (a conservative screen rectangle).

    Projects the 8 corners of a cube around the primitive's bounding sphere; returns ``None``
    (test every pixel) when the cube reaches behind the camera.
    """
    h, w = resolution
    c = _apply_t(rot, (prim.center - o)[:, None])[:, 0]
    r = prim.bound_radius
    if c[2] - r <= 1e-3:
        return None
    corners = c[:, None] + r * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]).T
    u = k[0, 0] * corners[0] / corners[2] + k[0, 2]
    v = k[1, 1] * corners[1] / corners[2] + k[1, 2]
    # pixel j's centre is at j + 0.5; one pixel of slack on each side
    u0, u1 = max(int(math.floor(u.min() - 0.5)) - 1, 0), min(int(math.ceil(u.max() - 0.5)) + 1, w - 1)
    v0, v1 = max(int(math.floor(v.min() - 0.5)) - 1, 0), min(int(math.ceil(v.max() - 0.5)) + 1, h - 1)
    if u0 > u1 or v0 > v1:
        return np.empty(0, dtype=np.int64)
    return (np.arange(v0, v1 + 1)[:, None] * w + np.arange(u0, u1 + 1)[None, :]).ravel()


def render(scene: SceneSpec, resolution: Tuple[int, int], noise_rng: np.random.Generator) -> Sample:
    """Ray-cast ``scene`` at ``resolution``; returns the sample dict (see :class:`SyntheticScenes`)."""
    h, w = resolution
    k = intrinsics_for(resolution)
    xs = (np.arange(w, dtype=np.float64) + 0.5 - k[0, 2]) / k[0, 0]
    ys = (np.arange(h, dtype=np.float64) + 0.5 - k[1, 2]) / k[1, 1]
    n = h * w
    dc = np.stack([np.tile(xs, h), np.repeat(ys, w), np.ones(n)])  # camera rays, z = 1
    rot, o = scene.camera_rotation, scene.camera_position
    d = _apply(rot, dc)  # world directions; t along d is the z-depth
    o1 = o[:, None]

    # room: exit point of the box [0, room] from the inside
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > 0, (scene.room[:, None] - o1) / d, np.where(d < 0, -o1 / d, np.inf))
    axis = t_axes.argmin(axis=0)
    t = t_axes.min(axis=0)
    which = np.full(n, -1, dtype=np.int64)
    for i, prim in enumerate(scene.primitives):
        idx = _screen_bounds(prim, rot, o, k, resolution) if _CULLING else None
        if idx is None:
            ti = prim.intersect(o1, d)
            closer = ti < t
            t = np.where(closer, ti, t)
            which[closer] = i
        elif idx.size:
            ti = prim.intersect(o1, d[:, idx])
            closer = ti < t[idx]
            t[idx[closer]] = ti[closer]
            which[idx[closer]] = i

    p = o1 + t * d
    normal = np.zeros((3, n))
    label = np.empty(n, dtype=np.int64)
    albedo = np.empty((3, n))
    room_px = which < 0
    cols = np.nonzero(room_px)[0]
    ax = axis[room_px]
    normal[ax, cols] = -np.sign(d[ax, cols])
    label[room_px] = np.where(ax == 2, np.where(d[2, room_px] < 0, FLOOR, CEILING), WALL)
    _room_albedo(scene, p[:, room_px], label[room_px], ax, albedo, room_px)
    for i, prim in enumerate(scene.primitives):
        sel = which == i
        if sel.any():
            normal[:, sel] = prim.normal(p[:, sel])
            label[sel] = prim.label
            albedo[:, sel] = prim.albedo(p[:, sel])
    facing = _dot(normal, d) > 0  # orient towards the camera
    normal[:, facing] *= -1.0

    # shading: Lambert + point light with cast shadows + ambient
    lvec = scene.light[:, None] - p
    dist = np.sqrt(_dot(lvec, lvec))
    ldir = lvec / dist
    ndotl = np.maximum(_dot(normal, ldir), 0.0)
    lit = np.nonzero(ndotl > 0)[0]
    if lit.size and scene.primitives:
        origin = p[:, lit] + 1e-6 * normal[:, lit]
        blocked = np.zeros(lit.size, dtype=bool)
        towards = -ldir[:, lit]  # light -> point
        for prim in scene.primitives:
            # cull: only rays whose light->point direction lies in the cone around the bounding sphere
            vc = prim.center - scene.light
            dc = float(np.sqrt(vc @ vc))
            r = prim.bound_radius
            if dc > r and _CULLING:
                cand = (_dot(towards, (vc / dc)[:, None]) >= math.sqrt(1.0 - (r / dc) ** 2) - 1e-9) & \
                       (dist[lit] > dc - r)
                cand = np.nonzero(cand)[0]
                if cand.size:
                    blocked[cand] |= prim.intersect(origin[:, cand], ldir[:, lit[cand]]) < dist[lit[cand]]
            else:
                blocked |= prim.intersect(origin, ldir[:, lit]) < dist[lit]
        ndotl[lit[blocked]] = 0.0
    ambient = 0.22 + 0.08 * normal[2]  # sky-ish fill: upward surfaces a little brighter
    radiance = ambient + scene.light_power * 1.6 * ndotl / (1.0 + (dist / 3.5) ** 2)
    linear = albedo * radiance
    image = np.power(np.clip(linear, 0.0, None).astype(np.float32), np.float32(1.0 / 2.2)).reshape(3, h, w)
    image += noise_rng.standard_normal((3, h, w), dtype=np.float32) * np.float32(IMAGE_NOISE_STD)
    np.clip(image, 0.0, 1.0, out=image)

    # validity: sensor range, grazing incidence, dropout blobs
    depth = t
    cos_inc = -_dot(normal, d) / np.sqrt(_dot(d, d))
    valid = (depth <= MAX_DEPTH) & (cos_inc >= math.cos(math.radians(MAX_INCIDENCE_DEGREES)))
    if len(scene.dropouts):
        un = (np.tile(np.arange(w), h) + 0.5) / w
        vn = (np.repeat(np.arange(h), w) + 0.5) / h
        for cu, cv, ru, rv in scene.dropouts:
            valid &= ((un - cu) / ru) ** 2 + ((vn - cv) / rv) ** 2 >= 1.0
    normal_cam = _apply_t(rot, normal)
    normal_cam /= np.sqrt(_dot(normal_cam, normal_cam))  # exact unit length after rotation round-off
    depth = np.where(valid, depth, 0.0).astype(np.float32).reshape(h, w)
    normal_cam = np.where(valid, normal_cam, 0.0).astype(np.float32).reshape(3, h, w)
    return {
        "image": torch.from_numpy(image),
        "seg": torch.from_numpy(label.reshape(h, w)),
        "depth": torch.from_numpy(depth),
        "normal": torch.from_numpy(np.ascontiguousarray(normal_cam)),
        "mask": torch.from_numpy(valid.reshape(h, w)),
    }


def _room_albedo(scene: SceneSpec, p, label, axis, out, where) -> None:
    alb = np.empty_like(p)
    floor = label == FLOOR
    if floor.any():
        q = p[:, floor]
        i, j = np.floor(q[0] / scene.floor_tile), np.floor(q[1] / scene.floor_tile)
        check = np.mod(i + j, 2.0)
        shade = 0.9 + 0.2 * _hash01(i, j, 1.0)
        c1, c2 = scene.floor_colors
        alb[:, floor] = (c1[:, None] * (1 - check) + c2[:, None] * check) * shade
    ceil = label == CEILING
    if ceil.any():
        q = p[:, ceil]
        seam = (_frac(q[0] / 0.6) < 0.04) | (_frac(q[1] / 0.6) < 0.04)
        alb[:, ceil] = scene.ceiling_color[:, None] * np.where(seam, 0.7, 1.0)
    wall = label == WALL
    if wall.any():
        q = p[:, wall]
        u = np.where(axis[wall] == 0, q[1], q[0])  # coordinate along the wall
        stripe = 1.0 + 0.12 * np.sign(np.sin(2 * math.pi * u / scene.wall_stripe))
        base = np.where(q[2] < 0.1, 0.35, stripe)  # dark skirting board
        alb[:, wall] = scene.wall_color[:, None] * base
    out[:, where] = alb


# ------------------------------------------------------------------------------------ data set
class SyntheticScenes(Dataset):
    """Procedurally rendered indoor rooms with exact segmentation, depth and normal ground truth.

    Args:
        split: ``"train"``, ``"unlabelled"`` (``"unlabeled"`` accepted) or ``"test"``. Each split
            draws from its own seed stream, so splits never share a scene. All splits carry full
            ground truth; the ``"unlabelled"`` split is meant to be used without it (the student
            in knowledge amalgamation learns from teachers only).
        size: number of samples (``len``); default :data:`DEFAULT_SIZES` [split].
        resolution: ``(H, W)`` (an int ``n`` means ``(n, n)``), any size; the scene of an index
            does not depend on the resolution, only the pixel sampling and the image noise do.
        seed: non-negative int; sample ``i`` is a pure function of ``(seed, split, i,
            resolution)`` and is bit-identical across calls, processes and DataLoader workers.
        cache_dir: optional folder in which rendered samples are cached (one ``.pt`` file per
            sample, written atomically, keyed by render version, split, seed and resolution).
        transform: optional callable applied to each sample dict.

    Each sample is a dict of tensors (the contract shared by :mod:`pyamalgam.data`):

    * ``"image"``: float32 (3, H, W) in [0, 1];
    * ``"seg"``: int64 (H, W) class ids in ``[0, num_classes)`` (synthetic labels are complete:
      ``ignore_index`` never occurs);
    * ``"depth"``: float32 (H, W) z-depth in metres (distance along the optical axis), 0 where
      invalid;
    * ``"normal"``: float32 (3, H, W) unit normals in camera coordinates (x right, y down,
      z forward), facing the camera, zeros where invalid;
    * ``"mask"``: bool (H, W), True where depth and normal are valid. Invalid pixels mimic a depth
      sensor: z-depth beyond :data:`MAX_DEPTH`, incidence beyond :data:`MAX_INCIDENCE_DEGREES`,
      and random elliptical dropout blobs.

    Example::

        >>> ds = SyntheticScenes("train", size=100, resolution=(64, 80))
        >>> s = ds[0]; s["image"].shape, s["seg"].dtype
        (torch.Size([3, 64, 80]), torch.int64)
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = 255
    max_depth = MAX_DEPTH
    #: Tasks with ground truth in this data set.
    tasks = ("seg", "depth", "normal")

    def __init__(self, split: str = "train", size: Optional[int] = None,
                 resolution: Union[int, Tuple[int, int]] = (240, 320), seed: int = 0,
                 cache_dir: Optional[Union[str, os.PathLike]] = None,
                 transform: Optional[Callable[[Sample], Sample]] = None) -> None:
        split = _SPLIT_ALIASES.get(split, split) if isinstance(split, str) else split
        self.split = check_choice("split", split, tuple(_SPLIT_STREAMS))
        self.size = DEFAULT_SIZES[self.split] if size is None else check_int("size", size, minimum=0)
        self.resolution = check_resolution("resolution", resolution)
        self.seed = check_int("seed", seed, minimum=0)
        check_transform(transform)
        self.transform = transform
        if cache_dir is not None:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, "
                                f"got {type(cache_dir).__name__}")
            cache_dir = Path(cache_dir)
            if cache_dir.exists() and not cache_dir.is_dir():
                raise NotADirectoryError(f"cache_dir {str(cache_dir)!r} exists and is not a directory")
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        h, w = self.resolution
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, resolution=({h}, {w}), "
                f"seed={self.seed}, cache_dir={None if self.cache_dir is None else str(self.cache_dir)!r})")

    @property
    def intrinsics(self) -> torch.Tensor:
        """3x3 float64 camera matrix ``K`` at this data set's resolution (pixel centres at +0.5)."""
        return torch.from_numpy(intrinsics_for(self.resolution))

    def _streams(self, index: int):
        ss = np.random.SeedSequence([self.seed, _SPLIT_STREAMS[self.split], index])
        scene_ss, noise_ss = ss.spawn(2)
        return np.random.default_rng(scene_ss), np.random.default_rng(noise_ss)

    def scene(self, index: int) -> SceneSpec:
        """The :class:`SceneSpec` (room, camera pose, light, furniture) of sample ``index``."""
        i = check_index(index, self.size, "SyntheticScenes")
        return sample_scene(self._streams(i)[0])

    def _cache_path(self, index: int) -> Path:
        h, w = self.resolution
        return (self.cache_dir / f"v{_RENDER_VERSION}-{self.split}-seed{self.seed}-{h}x{w}"
                / f"{index:08d}.pt")

    def _render(self, index: int) -> Sample:
        scene_rng, noise_rng = self._streams(index)
        return render(sample_scene(scene_rng), self.resolution, noise_rng)

    def __getitem__(self, index) -> Sample:
        i = check_index(index, self.size, "SyntheticScenes")
        if self.cache_dir is None:
            sample = self._render(i)
        else:
            sample = self._cached(i)
        return apply_transform(sample, self.transform)

    def _cached(self, index: int) -> Sample:
        path = self._cache_path(index)
        if path.is_file():
            try:
                sample = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(sample, dict) and set(sample) == {"image", "seg", "depth", "normal", "mask"}:
                    return sample
            except Exception:  # truncated/corrupt file from elsewhere: re-render and overwrite
                pass
        sample = self._render(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(sample, f)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return sample

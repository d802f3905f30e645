"""The solids of a synthetic scene (box, sphere, cylinder): exact ray intersection, normals, textures.

Vectors are (3, N) float64 NumPy arrays; every product is written out component by component so
results are bit-reproducible (no BLAS, whose summation order may differ between machines).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import materials as mat

#: Semantic classes of :class:`~pyamalgam.data.SyntheticScenes`, by id.
CLASS_NAMES = ("floor", "ceiling", "wall", "box", "sphere", "cylinder", "table")
FLOOR, CEILING, WALL, BOX, SPHERE, CYLINDER, TABLE = range(len(CLASS_NAMES))

#: A ray hit counts only beyond this distance (metres) from the ray's origin.
_EPS = 1e-9
#: Radial distances below this are treated as on the cylinder's axis (no division by zero).
_AXIS_EPS = 1e-12


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


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


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
            safe = np.maximum(rho, _AXIS_EPS)
            nl[0] = np.where(on_cap, 0.0, pl[0] / safe)
            nl[1] = np.where(on_cap, 0.0, pl[1] / safe)
            nl[2] = np.where(on_cap, np.sign(pl[2]), 0.0)
        return _apply(self.rotation, nl)

    def albedo(self, p: np.ndarray) -> np.ndarray:
        """Procedural texture (linear RGB, (3, N)) at surface points ``p``."""
        pl = self.local(p)
        if self.label == BOX:  # crate: planks with dark seams
            w = _frac((pl[0] + pl[1] + pl[2]) / self.pattern) < mat.CRATE_SEAM_FRACTION
            mix = np.where(w, 1.0, 0.0)
        elif self.label == SPHERE:  # beach ball: alternating sectors
            sector = np.floor((np.arctan2(pl[1], pl[0]) + math.pi) / (2 * math.pi) * mat.BALL_SECTORS)
            mix = np.mod(sector, 2.0)
        elif self.label == CYLINDER:  # rings along the axis
            mix = (_frac(pl[2] / self.pattern) < mat.RING_DUTY).astype(np.float64)
        else:  # table: wood grain
            fy, fz = mat.WOOD_WARP_FREQUENCIES
            mix = 0.5 + 0.5 * np.sin(self.pattern * (pl[0] + mat.WOOD_WARP_AMPLITUDE * np.sin(fy * pl[1] + fz * pl[2])))
        return self.color1[:, None] * (1.0 - mix) + self.color2[:, None] * mix

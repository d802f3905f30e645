"""Two more exact targets of a :class:`~.scenes.SceneSpec`: occlusion/semantic edges and key-points.

Both tasks are columns of SD-MTCNN's Table 1 (seed 002, "Key Abs." and "Edge Abs."); the seed
uses Mini-Taskonomy's maps and does not define them, so these definitions are ours, chosen to be
exact from the renderer's geometry (see docs/data.md, "Edges and key-points"):

* ``"edges"`` (:func:`edge_map`): float32 (H, W) in {0, 1}. Two 4-neighbouring pixels are
  separated by a boundary when their rays (through the pixel centres) hit surfaces of different
  classes (a **semantic** edge) or of different solids (an **occlusion** edge: a box in front
  of another box, a table leg behind the table top). Both pixels of such a pair are marked, so
  lines are two pixels thick. In these scenes a change of solid between two rays of one class is
  always a depth discontinuity: every solid is convex, the room is a convex box seen from
  inside, and two solids of one class never touch (footprints keep ``WALL_CLEARANCE`` apart; a
  table's legs touch its top only on the top's underside, which a camera at 1.1-1.7 m never
  sees over a table of at most 0.8 m). Creases inside one solid or one room (two walls, two
  faces of a box) are not edges.
* ``"keypoints"`` (:func:`keypoints_2d`, :func:`keypoint_heatmap`): the 3-D corners of every box
  (crates and the five boxes of a table) and the 8 corners of the room, projected with the
  intrinsics and kept when they fall inside the image and are visible: the analytic ray cast
  from the camera towards the corner hits nothing before it (up to :data:`VISIBILITY_TOLERANCE`
  of the distance). The map is ``max_k exp(-|c - x_k|^2 / (2 sigma^2))`` over the kept points
  ``x_k``, ``c`` the pixel centre, ``sigma`` = :data:`KEYPOINT_SIGMA` pixels: float32 in [0, 1].

No random draw is made here: samples without these targets stay bit-identical, and a sample's
edges and key-points are a pure function of its scene and resolution.
"""
from __future__ import annotations

import numpy as np

from .primitives import CEILING, FLOOR, WALL, _apply, _apply_t
from .rendering import _camera_rays, _trace_furniture, _trace_room, intrinsics_for
from .scenes import SceneSpec

__all__ = ["KEYPOINT_SIGMA", "TARGETS", "VISIBILITY_TOLERANCE", "annotate", "edge_map", "keypoint_heatmap",
           "keypoints_2d", "keypoints_3d", "surface_ids"]

#: Names of the extra targets, in the order a sample holds them.
TARGETS = ("edges", "keypoints")
#: Standard deviation (pixels, at the sample's resolution) of each key-point's Gaussian.
KEYPOINT_SIGMA = 2.0
#: A corner is visible when nothing is hit before (1 - this) of the way from the camera to it
#: (relative, i.e. ~3 nm at 3 m: far above float64 round-off, far below any real occluder).
VISIBILITY_TOLERANCE = 1e-9
#: Corners closer than this to the camera plane (metres) are not projected.
_NEAR_PLANE = 1e-6
#: The Gaussians are evaluated within this many sigmas of their centre (exp(-4.5^2/2) < 4e-5).
_TRUNCATE = 4.5


def surface_ids(scene: SceneSpec, resolution: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(class id, solid id) per pixel, both int64 (H, W): the solid is the primitive's index in
    ``scene.primitives``, -1 for the room. The class ids are those of the sample's ``"seg"``."""
    h, w = resolution
    k = intrinsics_for(resolution)
    d = _camera_rays(scene, k, resolution)
    t, axis = _trace_room(scene, d)
    _, which = _trace_furniture(scene, d, t, k, resolution)
    room = np.where(axis == 2, np.where(d[2] < 0, FLOOR, CEILING), WALL)
    labels = np.array([p.label for p in scene.primitives] + [0], dtype=np.int64)  # [-1] -> unused 0
    label = np.where(which < 0, room, labels[which])
    return label.reshape(h, w), which.reshape(h, w)


def edge_map(scene: SceneSpec, resolution: tuple[int, int]) -> np.ndarray:
    """The ``"edges"`` target (see the module docstring): float32 (H, W) in {0, 1}."""
    label, solid = surface_ids(scene, resolution)
    edge = np.zeros(label.shape, dtype=bool)
    across = (label[:, 1:] != label[:, :-1]) | (solid[:, 1:] != solid[:, :-1])  # between columns j, j+1
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = (label[1:] != label[:-1]) | (solid[1:] != solid[:-1])  # between rows i, i+1
    edge[1:] |= down
    edge[:-1] |= down
    return edge.astype(np.float32)


def keypoints_3d(scene: SceneSpec) -> np.ndarray:
    """World coordinates (3, K) of every candidate corner: the room's 8, then 8 per box."""
    signs = np.array([[sx, sy, sz] for sx in (-1.0, 1.0) for sy in (-1.0, 1.0) for sz in (-1.0, 1.0)]).T
    room = scene.room[:, None] * (signs + 1.0) / 2.0  # 0 or X, 0 or Y, 0 or Z
    corners = [room]
    for prim in scene.primitives:
        if prim.kind == "box":
            local = prim.size[:, None] * signs
            corners.append(_apply(prim.rotation, local) + prim.center[:, None])  # no BLAS: bit-reproducible
    return np.concatenate(corners, axis=1)


def keypoints_2d(scene: SceneSpec, resolution: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates (K, 2) float64 ``(u, v)`` (column, row; pixel ``(j, i)`` spans
    ``[j, j+1) x [i, i+1)``) of the corners that are inside the image and visible."""
    h, w = resolution
    k = intrinsics_for(resolution)
    x = keypoints_3d(scene)
    o = scene.camera_position[:, None]
    xc = _apply_t(scene.camera_rotation, x - o)  # camera coordinates
    front = xc[2] > _NEAR_PLANE
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * xc[0] / xc[2] + k[0, 2]
        v = k[1, 1] * xc[1] / xc[2] + k[1, 2]
    keep = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    keep[keep] = _visible(scene, x[:, keep] - o)
    return np.stack([u[keep], v[keep]], axis=1)


def _visible(scene: SceneSpec, d: np.ndarray) -> np.ndarray:
    """Whether the ray ``camera + t d`` meets nothing before ``t = 1`` (the corner) (N,) bool."""
    if d.shape[1] == 0:
        return np.zeros(0, dtype=bool)
    t, _ = _trace_room(scene, d)  # the room's corners are where the rays leave it: t = 1
    o = scene.camera_position[:, None]
    for prim in scene.primitives:  # no screen culling: these rays are not the pixel grid
        t = np.minimum(t, prim.intersect(o, d))
    return t >= 1.0 - VISIBILITY_TOLERANCE


def keypoint_heatmap(points: np.ndarray, resolution: tuple[int, int], sigma: float = KEYPOINT_SIGMA) -> np.ndarray:
    """``max_k exp(-|c - x_k|^2 / (2 sigma^2))`` at every pixel centre ``c``: float32 (H, W).

    ``points``: (K, 2) ``(u, v)`` pixel coordinates (K may be 0: an all-zero map). Each Gaussian
    is evaluated within ``4.5 sigma`` of its centre (beyond, it is below 4e-5 and set to 0).
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (pixels), got {sigma!r}")
    h, w = resolution
    heat = np.zeros((h, w))
    cu, cv = np.arange(w) + 0.5, np.arange(h) + 0.5
    reach = _TRUNCATE * sigma
    for u, v in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        j0, j1 = max(int(np.floor(u - reach)), 0), min(int(np.ceil(u + reach)), w)
        i0, i1 = max(int(np.floor(v - reach)), 0), min(int(np.ceil(v + reach)), h)
        if j0 >= j1 or i0 >= i1:
            continue
        gu = np.exp(-((cu[j0:j1] - u) ** 2) / (2 * sigma**2))
        gv = np.exp(-((cv[i0:i1] - v) ** 2) / (2 * sigma**2))
        np.maximum(heat[i0:i1, j0:j1], gv[:, None] * gu[None, :], out=heat[i0:i1, j0:j1])
    return heat.astype(np.float32)


def annotate(scene: SceneSpec, resolution: tuple[int, int], targets=TARGETS) -> dict[str, np.ndarray]:
    """The requested extra targets of ``scene`` at ``resolution``: name -> float32 (H, W)."""
    out = {}
    for name in targets:
        if name == "edges":
            out[name] = edge_map(scene, resolution)
        elif name == "keypoints":
            out[name] = keypoint_heatmap(keypoints_2d(scene, resolution), resolution)
        else:
            raise ValueError(f"unknown target {name!r}; expected one of {list(TARGETS)}")
    return out

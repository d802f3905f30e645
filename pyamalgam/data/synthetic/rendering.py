"""Ray casting a :class:`~.scenes.SceneSpec` into a sample (image, seg, depth, normal, mask).

:func:`render` runs the steps below in order: camera rays, the room box, the furniture, surface
properties, shading with cast shadows, exposure (gamma + sensor noise), validity, camera normals.
All geometry is float64 NumPy, vectorised over pixels; the only random draws are the image noise.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._common import Sample
from . import materials as mat
from .primitives import CEILING, FLOOR, WALL, Primitive, _apply, _apply_t, _dot, _frac
from .scenes import SceneSpec

#: Horizontal field of view of the synthetic camera (fixed, so depth is learnable from RGB).
HFOV_DEGREES = 60.0
#: Sensor range: pixels whose z-depth exceeds it are invalid (``mask`` False, depth 0).
MAX_DEPTH = 8.0
#: Surfaces seen more obliquely than this (angle between ray and normal) are invalid.
MAX_INCIDENCE_DEGREES = 85.0

# Screen-space / light-cone culling of ray-primitive tests; a pure speed-up (tests switch it off
# and check the output is bit-identical).
_CULLING = True
#: Primitives reaching closer than this to the camera plane (metres) are not screen-culled.
_NEAR_PLANE = 1e-3
#: Slack of the light-cone culling test (cosine).
_CONE_SLACK = 1e-9
#: The classic shader hash ``frac(sin(i * a + j * b + salt) * c)``.
_HASH_I, _HASH_J, _HASH_SCALE = 12.9898, 78.233, 43758.5453


def intrinsics_for(resolution: tuple[int, int]) -> np.ndarray:
    """3x3 pinhole matrix for ``resolution`` (H, W): fx = fy, principal point at the centre."""
    h, w = resolution
    f = (w / 2.0) / math.tan(math.radians(HFOV_DEGREES) / 2.0)
    return np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])


def render(scene: SceneSpec, resolution: tuple[int, int], noise_rng: np.random.Generator, *,
           geometry: dict | None = None) -> Sample:
    """Ray-cast ``scene`` at ``resolution``; returns the sample dict (see :class:`SyntheticScenes`).

    ``geometry``: optional dict, filled (for :mod:`.motion`'s exact flow) with the float64 ray
    geometry of every pixel, flat in row-major pixel order, valid or not: ``"d"`` (3, N) world ray
    directions scaled to camera z = 1, ``"t"`` (N,) z-depth of the hit, ``"point"`` (3, N) world
    hit points, ``"normal"`` (3, N) world normals facing the camera, ``"label"`` (N,) class ids.
    """
    h, w = resolution
    k = intrinsics_for(resolution)
    d = _camera_rays(scene, k, resolution)  # world directions; t along d is the z-depth
    t, axis = _trace_room(scene, d)
    t, which = _trace_furniture(scene, d, t, k, resolution)
    p = scene.camera_position[:, None] + t * d
    normal, label, albedo = _surfaces(scene, p, d, axis, which)
    if geometry is not None:
        geometry.update(d=d, t=t, point=p, normal=normal, label=label)
    radiance = _shade(scene, p, normal)
    image = _expose(albedo * radiance, resolution, noise_rng)
    valid = _valid_pixels(scene, t, normal, d, resolution)
    normal_cam = _camera_normals(scene, normal)
    depth = np.where(valid, t, 0.0).astype(np.float32).reshape(h, w)
    normal_cam = np.where(valid, normal_cam, 0.0).astype(np.float32).reshape(3, h, w)
    return {
        "image": torch.from_numpy(image),
        "seg": torch.from_numpy(label.reshape(h, w)),
        "depth": torch.from_numpy(depth),
        "normal": torch.from_numpy(np.ascontiguousarray(normal_cam)),
        "mask": torch.from_numpy(valid.reshape(h, w)),
    }


def _camera_rays(scene: SceneSpec, k: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """World directions (3, H*W) of the rays through the pixel centres, scaled to camera z = 1."""
    h, w = resolution
    xs = (np.arange(w, dtype=np.float64) + 0.5 - k[0, 2]) / k[0, 0]
    ys = (np.arange(h, dtype=np.float64) + 0.5 - k[1, 2]) / k[1, 1]
    dc = np.stack([np.tile(xs, h), np.repeat(ys, w), np.ones(h * w)])
    return _apply(scene.camera_rotation, dc)


def _trace_room(scene: SceneSpec, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each ray leaves the room box ``[0, room]``: (t, index of the axis of the wall hit)."""
    o1 = scene.camera_position[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > 0, (scene.room[:, None] - o1) / d, np.where(d < 0, -o1 / d, np.inf))
    return t_axes.min(axis=0), t_axes.argmin(axis=0)


def _trace_furniture(scene: SceneSpec, d: np.ndarray, t: np.ndarray, k: np.ndarray,
                     resolution: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hits over the room's ``t``: (t, index of the primitive hit or -1 for the room)."""
    rot, o = scene.camera_rotation, scene.camera_position
    o1 = o[:, None]
    which = np.full(t.shape[0], -1, dtype=np.int64)
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
    return t, which


def _screen_bounds(prim: Primitive, rot: np.ndarray, o: np.ndarray, k: np.ndarray,
                   resolution: tuple[int, int]) -> np.ndarray | None:
    """Flat indices of the pixels whose rays can hit ``prim`` (a conservative screen rectangle).

    Projects the 8 corners of a cube around the primitive's bounding sphere; returns ``None``
    (test every pixel) when the cube reaches behind the camera.
    """
    h, w = resolution
    c = _apply_t(rot, (prim.center - o)[:, None])[:, 0]
    r = prim.bound_radius
    if c[2] - r <= _NEAR_PLANE:
        return None
    corners = c[:, None] + r * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]).T
    u = k[0, 0] * corners[0] / corners[2] + k[0, 2]
    v = k[1, 1] * corners[1] / corners[2] + k[1, 2]
    # pixel j's centre is at j + 0.5; one pixel of slack on each side
    u0, u1 = max(math.floor(u.min() - 0.5) - 1, 0), min(math.ceil(u.max() - 0.5) + 1, w - 1)
    v0, v1 = max(math.floor(v.min() - 0.5) - 1, 0), min(math.ceil(v.max() - 0.5) + 1, h - 1)
    if u0 > u1 or v0 > v1:
        return np.empty(0, dtype=np.int64)
    return (np.arange(v0, v1 + 1)[:, None] * w + np.arange(u0, u1 + 1)[None, :]).ravel()


def _surfaces(scene: SceneSpec, p: np.ndarray, d: np.ndarray, axis: np.ndarray,
              which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal facing the camera, class id, albedo) at the hit points ``p`` (3, N)."""
    n = p.shape[1]
    normal = np.zeros((3, n))
    label = np.empty(n, dtype=np.int64)
    albedo = np.empty((3, n))
    room_px = which < 0
    cols = np.nonzero(room_px)[0]
    ax = axis[room_px]
    normal[ax, cols] = -np.sign(d[ax, cols])
    label[room_px] = np.where(ax == 2, np.where(d[2, room_px] < 0, FLOOR, CEILING), WALL)
    albedo[:, room_px] = _room_albedo(scene, p[:, room_px], label[room_px], ax)
    for i, prim in enumerate(scene.primitives):
        sel = which == i
        if sel.any():
            normal[:, sel] = prim.normal(p[:, sel])
            label[sel] = prim.label
            albedo[:, sel] = prim.albedo(p[:, sel])
    facing = _dot(normal, d) > 0  # orient towards the camera
    normal[:, facing] *= -1.0
    return normal, label, albedo


def _room_albedo(scene: SceneSpec, p: np.ndarray, label: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Checkered floor tiles, ceiling panels, striped wallpaper with a skirting board."""
    alb = np.empty_like(p)
    floor = label == FLOOR
    if floor.any():
        q = p[:, floor]
        i, j = np.floor(q[0] / scene.floor_tile), np.floor(q[1] / scene.floor_tile)
        check = np.mod(i + j, 2.0)
        shade = mat.FLOOR_TILE_BRIGHTNESS[0] + mat.FLOOR_TILE_BRIGHTNESS[1] * _hash01(i, j, mat.FLOOR_TILE_HASH_SALT)
        c1, c2 = scene.floor_colors
        alb[:, floor] = (c1[:, None] * (1 - check) + c2[:, None] * check) * shade
    ceil = label == CEILING
    if ceil.any():
        q = p[:, ceil]
        seam = ((_frac(q[0] / mat.CEILING_PANEL_SIZE) < mat.CEILING_SEAM_FRACTION)
                | (_frac(q[1] / mat.CEILING_PANEL_SIZE) < mat.CEILING_SEAM_FRACTION))
        alb[:, ceil] = scene.ceiling_color[:, None] * np.where(seam, mat.CEILING_SEAM_SHADE, 1.0)
    wall = label == WALL
    if wall.any():
        q = p[:, wall]
        u = np.where(axis[wall] == 0, q[1], q[0])  # coordinate along the wall
        stripe = 1.0 + mat.WALL_STRIPE_CONTRAST * np.sign(np.sin(2 * math.pi * u / scene.wall_stripe))
        base = np.where(q[2] < mat.SKIRTING_HEIGHT, mat.SKIRTING_SHADE, stripe)
        alb[:, wall] = scene.wall_color[:, None] * base
    return alb


def _hash01(i: np.ndarray, j: np.ndarray, salt: float) -> np.ndarray:
    return _frac(np.sin(i * _HASH_I + j * _HASH_J + salt) * _HASH_SCALE)


def _shade(scene: SceneSpec, p: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Radiance (N,): Lambert from the point light with distance fall-off and cast shadows, plus ambient."""
    lvec = scene.light[:, None] - p
    dist = np.sqrt(_dot(lvec, lvec))
    ldir = lvec / dist
    ndotl = np.maximum(_dot(normal, ldir), 0.0)
    _cast_shadows(scene, p, normal, ldir, dist, ndotl)
    ambient = mat.AMBIENT + mat.AMBIENT_SKY * normal[2]
    return ambient + scene.light_power * mat.LIGHT_GAIN * ndotl / (1.0 + (dist / mat.LIGHT_FALLOFF) ** 2)


def _cast_shadows(scene: SceneSpec, p: np.ndarray, normal: np.ndarray, ldir: np.ndarray, dist: np.ndarray,
                  ndotl: np.ndarray) -> None:
    """Zero ``ndotl`` (in place) where a primitive lies between the point and the light."""
    lit = np.nonzero(ndotl > 0)[0]
    if not (lit.size and scene.primitives):
        return
    origin = p[:, lit] + mat.SHADOW_BIAS * normal[:, lit]
    blocked = np.zeros(lit.size, dtype=bool)
    towards = -ldir[:, lit]  # light -> point
    for prim in scene.primitives:
        # cull: only rays whose light->point direction lies in the cone around the bounding sphere
        vc = prim.center - scene.light
        dc = float(np.sqrt(vc @ vc))
        r = prim.bound_radius
        if dc > r and _CULLING:
            cand = (_dot(towards, (vc / dc)[:, None]) >= math.sqrt(1.0 - (r / dc) ** 2) - _CONE_SLACK) & \
                   (dist[lit] > dc - r)
            cand = np.nonzero(cand)[0]
            if cand.size:
                blocked[cand] |= prim.intersect(origin[:, cand], ldir[:, lit[cand]]) < dist[lit[cand]]
        else:
            blocked |= prim.intersect(origin, ldir[:, lit]) < dist[lit]
    ndotl[lit[blocked]] = 0.0


def _expose(linear: np.ndarray, resolution: tuple[int, int], noise_rng: np.random.Generator) -> np.ndarray:
    """The float32 (3, H, W) image in [0, 1]: gamma, then additive Gaussian sensor noise."""
    h, w = resolution
    image = np.power(np.clip(linear, 0.0, None).astype(np.float32), np.float32(1.0 / mat.GAMMA)).reshape(3, h, w)
    image += noise_rng.standard_normal((3, h, w), dtype=np.float32) * np.float32(mat.IMAGE_NOISE_STD)
    np.clip(image, 0.0, 1.0, out=image)
    return image


def _valid_pixels(scene: SceneSpec, depth: np.ndarray, normal: np.ndarray, d: np.ndarray,
                  resolution: tuple[int, int]) -> np.ndarray:
    """Like a depth sensor: within range, not grazing, outside the dropout blobs (N,) bool."""
    h, w = resolution
    cos_inc = -_dot(normal, d) / np.sqrt(_dot(d, d))
    valid = (depth <= MAX_DEPTH) & (cos_inc >= math.cos(math.radians(MAX_INCIDENCE_DEGREES)))
    if len(scene.dropouts):
        un = (np.tile(np.arange(w), h) + 0.5) / w
        vn = (np.repeat(np.arange(h), w) + 0.5) / h
        for cu, cv, ru, rv in scene.dropouts:
            valid &= ((un - cu) / ru) ** 2 + ((vn - cv) / rv) ** 2 >= 1.0
    return valid


def _camera_normals(scene: SceneSpec, normal: np.ndarray) -> np.ndarray:
    """World normals rotated into camera coordinates, renormalised (exact unit length after round-off)."""
    normal_cam = _apply_t(scene.camera_rotation, normal)
    normal_cam /= np.sqrt(_dot(normal_cam, normal_cam))
    return normal_cam

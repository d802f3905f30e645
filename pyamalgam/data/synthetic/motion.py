"""Camera motion through a static synthetic room, and the exact optical flow between two frames.

A clip is one :class:`~.scenes.SceneSpec` seen from a camera trajectory (:func:`draw_trajectory`):
constant per-frame translation and yaw / pitch rates, drawn from the clip's own generator, so the
motion is smooth and frame ``t`` of a clip does not depend on the clip's length. The room,
furniture and light never move (no object motion: see ``docs/data.md``, "Video"), and shading is
Lambertian, hence view independent: the only thing that differs between two frames at the same
scene point is the sensor noise.

Flow (:func:`exact_flow`) follows :mod:`pyamalgam._flow`: from frame t to frame t+k, pixels, x then
y. For the pixel ``(u, v)`` of frame t, its scene point ``X`` (the exact hit of the renderer's
ray, float64) is projected with the pinhole ``K`` of frame t+k:

    ``x' = R'^T (X - o')``,  ``(u', v') = (fx x'_0 / x'_2 + cx, fy x'_1 / x'_2 + cy)``,
    ``flow = (u' - (u + 0.5), v' - (v + 0.5))``

(``R'``, ``o'``: camera-to-world rotation and position of frame t+k). ``X`` is visible in frame
t+k (``flow_valid``) when all of the following hold:

* in front of the camera and in view: ``x'_2 > 0`` and ``(u', v')`` inside ``[0, W] x [0, H]``;
* not back-facing: ``dot(n, o' - X) > 0`` for its surface normal ``n`` (facing camera t);
* not occluded: the ray from ``o'`` towards ``X``, intersected analytically with the room and
  every solid exactly as the renderer does, hits nothing before ``X`` (relative tolerance
  :data:`VISIBILITY_RTOL`).

Visibility is geometric: it ignores the sensor validity ``mask`` (range, incidence, dropouts),
which belongs to the depth and normal targets, not to the motion.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .primitives import _apply, _apply_t, _dot, _rot_x, _rot_z
from .rendering import _trace_room
from .scenes import SceneSpec

#: Camera speed per frame (metres), in a horizontal direction drawn uniformly.
SPEED = (0.0, 0.06)
#: Vertical camera speed per frame (metres).
CLIMB = (-0.01, 0.01)
#: Yaw (about world z) and pitch (about the camera's x axis) rates, degrees per frame.
YAW_RATE = (-1.5, 1.5)
PITCH_RATE = (-0.75, 0.75)
#: The camera keeps this far from the walls, floor and ceiling (metres)...
ROOM_MARGIN = 0.25
#: ...and this far outside every solid's bounding sphere; a trajectory that would come closer has
#: its translation halved (up to :data:`_SHRINK_STEPS` times, then it only turns).
OBJECT_MARGIN = 0.1
_SHRINK_STEPS = 4
#: ``X`` counts as hidden in frame t+k when the ray from camera t+k hits something this much
#: (relative to the depth of ``X``) in front of it; float64 round-off is ~1e-13.
VISIBILITY_RTOL = 1e-7
#: Points closer than this to the camera plane (metres) count as behind the camera.
_NEAR = 1e-6


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Per-frame camera motion: ``velocity`` (3,) world metres per frame, ``yaw_rate`` and
    ``pitch_rate`` radians per frame. Frame ``t`` of a clip is :meth:`pose` ``(scene, t)``."""

    velocity: np.ndarray
    yaw_rate: float
    pitch_rate: float

    def pose(self, scene: SceneSpec, t: int) -> SceneSpec:
        """``scene`` seen from the camera at frame ``t`` (frame 0 is the scene's own camera)."""
        # written-out products (no BLAS), so that a clip is bit-identical on every machine
        rotation = _apply(_rot_z(self.yaw_rate * t), _apply(scene.camera_rotation, _rot_x(self.pitch_rate * t)))
        return dataclasses.replace(scene, camera_position=scene.camera_position + t * self.velocity,
                                   camera_rotation=rotation)


def draw_trajectory(rng: np.random.Generator, scene: SceneSpec, frames: int) -> Trajectory:
    """Draw a smooth camera motion for a clip of ``frames`` frames of ``scene`` (5 draws, in order:
    speed, heading, climb, yaw rate, pitch rate), kept clear of the walls and the furniture."""
    speed, heading = rng.uniform(*SPEED), rng.uniform(0.0, 2.0 * math.pi)
    climb = rng.uniform(*CLIMB)
    yaw, pitch = math.radians(rng.uniform(*YAW_RATE)), math.radians(rng.uniform(*PITCH_RATE))
    velocity = np.array([speed * math.cos(heading), speed * math.sin(heading), climb])
    for _ in range(_SHRINK_STEPS):
        if _clear(scene, velocity, frames):
            break
        velocity = velocity / 2.0
    else:
        velocity = np.zeros(3)
    return Trajectory(velocity=velocity, yaw_rate=yaw, pitch_rate=pitch)


def _clear(scene: SceneSpec, velocity: np.ndarray, frames: int) -> bool:
    """Whether every camera position of the clip keeps its margins to the room and the solids."""
    for t in range(frames):
        c = scene.camera_position + t * velocity
        if np.any(c < ROOM_MARGIN) or np.any(c > scene.room - ROOM_MARGIN):
            return False
        for prim in scene.primitives:
            if float(np.linalg.norm(c - prim.center)) < prim.bound_radius + OBJECT_MARGIN:
                return False
    return True


def exact_flow(geometry: dict, target: SceneSpec, k: np.ndarray,
               resolution: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flow from a frame to the frame ``target`` and where it is valid (module docstring).

    Args:
        geometry: the source frame's ray geometry, as filled by ``render(..., geometry=...)``.
        target: the scene posed at the target frame (same room and solids).
        k: the 3x3 intrinsics of both frames; ``resolution``: (H, W).

    Returns:
        ``flow`` float32 (2, H, W) (0 where the point is behind the target camera) and
        ``valid`` bool (H, W).
    """
    h, w = resolution
    x = geometry["point"]
    xc = _apply_t(target.camera_rotation, x - target.camera_position[:, None])
    front = xc[2] > _NEAR
    z = np.where(front, xc[2], 1.0)
    u = np.where(front, k[0, 0] * xc[0] / z + k[0, 2], 0.0)
    v = np.where(front, k[1, 1] * xc[1] / z + k[1, 2], 0.0)
    us, vs = np.tile(np.arange(w) + 0.5, h), np.repeat(np.arange(h) + 0.5, w)
    flow = np.where(front, np.stack([u - us, v - vs]), 0.0)
    valid = front & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
    valid &= _dot(geometry["normal"], target.camera_position[:, None] - x) > 0
    idx = np.nonzero(valid)[0]
    if idx.size:
        valid[idx] = _unoccluded(target, x[:, idx], z[idx])
    return flow.astype(np.float32).reshape(2, h, w), valid.reshape(h, w)


def _unoccluded(scene: SceneSpec, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Whether the segment from ``scene``'s camera to each point ``x`` (3, N) at camera depth ``z``
    is free: the nearest analytic hit (room and solids, no screen culling: these rays do not go
    through pixel centres) lies at ``x`` itself, up to :data:`VISIBILITY_RTOL`."""
    o1 = scene.camera_position[:, None]
    d = (x - o1) / z  # scaled to camera z = 1, so ``t`` along d is the z-depth and x is at t = z
    t, _ = _trace_room(scene, d)
    for prim in scene.primitives:
        t = np.minimum(t, prim.intersect(o1, d))
    return t >= z * (1.0 - VISIBILITY_RTOL)


def project(scene: SceneSpec, points: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (2, N) (pixel-edge coordinates: the centre of pixel ``u`` is at ``u + 0.5``)
    and camera depths (N,) of world ``points`` (3, N) seen from ``scene``'s camera."""
    xc = _apply_t(scene.camera_rotation, points - scene.camera_position[:, None])
    return np.stack([k[0, 0] * xc[0] / xc[2] + k[0, 2], k[1, 1] * xc[1] / xc[2] + k[1, 2]]), xc[2]


def back_project(scene: SceneSpec, depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    """World points (3, H*W) of a z-depth map (H, W) seen from ``scene``'s camera (pixel centres)."""
    h, w = depth.shape
    xs = (np.tile(np.arange(w, dtype=np.float64), h) + 0.5 - k[0, 2]) / k[0, 0]
    ys = (np.repeat(np.arange(h, dtype=np.float64), w) + 0.5 - k[1, 2]) / k[1, 1]
    z = depth.reshape(-1).astype(np.float64)
    return _apply(scene.camera_rotation, np.stack([xs * z, ys * z, z])) + scene.camera_position[:, None]

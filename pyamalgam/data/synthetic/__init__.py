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

Modules: :mod:`.scenes` draws a :class:`SceneSpec` (the random draws, in order),
:mod:`.primitives` intersects and textures the solids, :mod:`.rendering` ray-casts a scene into a
sample, :mod:`.materials` names every colour, texture and shading constant, :mod:`.dataset` holds
the data set and its cache, :mod:`.annotations` the edge and key-point targets, :mod:`.motion` and
:mod:`.clips` the video clips with exact flow.
"""
from .dataset import DEFAULT_SIZES, SyntheticScenes
from .materials import IMAGE_NOISE_STD
from .primitives import (
    BOX,
    CEILING,
    CLASS_NAMES,
    CYLINDER,
    FLOOR,
    SPHERE,
    TABLE,
    WALL,
    Primitive,
)
from .rendering import (
    HFOV_DEGREES,
    MAX_DEPTH,
    MAX_INCIDENCE_DEGREES,
    intrinsics_for,
    render,
)
from .scenes import SceneSpec, sample_scene
from .clips import CLIP_KEYS, DEFAULT_CLIP_SIZES, SyntheticClips
from .motion import Trajectory, draw_trajectory, exact_flow
from .annotations import KEYPOINT_SIGMA, TARGETS as ANNOTATION_TARGETS, edge_map, keypoint_heatmap, keypoints_2d

__all__ = [
    "BOX", "CEILING", "CLASS_NAMES", "CYLINDER", "DEFAULT_SIZES", "FLOOR", "HFOV_DEGREES", "IMAGE_NOISE_STD",
    "MAX_DEPTH", "MAX_INCIDENCE_DEGREES", "SPHERE", "TABLE", "WALL", "Primitive", "SceneSpec", "SyntheticScenes",
    "intrinsics_for", "render", "sample_scene",
]
__all__ += ["CLIP_KEYS", "DEFAULT_CLIP_SIZES", "SyntheticClips", "Trajectory", "draw_trajectory", "exact_flow"]
__all__ += ["ANNOTATION_TARGETS", "KEYPOINT_SIGMA", "edge_map", "keypoint_heatmap", "keypoints_2d"]

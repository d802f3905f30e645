"""Drawing one random scene: room, camera, light, furniture, room surfaces and depth dropouts.

:func:`sample_scene` calls the ``_draw_*`` steps below in a fixed order, and each step draws from
the generator in a fixed order: that sequence of draws defines the data set (sample ``i`` of a
seed is the same scene everywhere), so reordering any draw changes every scene.

World coordinates: z up, the floor is ``z = 0``, the room spans ``[0, X] x [0, Y] x [0, Z]``.
Lengths are metres, angles degrees; ``(lo, hi)`` pairs are uniform ranges.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from . import materials as mat
from .primitives import BOX, CYLINDER, SPHERE, TABLE, Primitive, _rot_x, _rot_z

# ------------------------------------------------------------------------- room and camera
ROOM_SIZE = ((4.0, 7.0), (4.5, 9.0), (2.5, 3.2))  # X, Y, Z
CAMERA_SIDE_MARGIN = 0.6  # from the side walls (x)
CAMERA_WALL_DISTANCE = (0.3, 1.2)  # from the wall at y = 0, looking into the room (+y)
CAMERA_HEIGHT = (1.1, 1.7)
CAMERA_YAW = (-35.0, 35.0)
CAMERA_PITCH = (3.0, 25.0)  # downwards
CAMERA_ROLL = (-4.0, 4.0)
LIGHT_WALL_MARGIN = 0.5
LIGHT_BELOW_CEILING = 0.05

# ------------------------------------------------------------------------------- furniture
FURNITURE_COUNT = (3, 9)  # integers in [lo, hi)
FURNITURE_KINDS = ("box", "sphere", "cylinder", "table")
FURNITURE_PROBABILITIES = (0.3, 0.25, 0.25, 0.2)
MAX_TABLES = 2  # further tables become boxes
PLACEMENT_TRIES = 30  # a piece that finds no free spot in this many tries is left out
WALL_CLEARANCE = 0.05  # between a footprint and a wall, and between two footprints
CAMERA_CLEARANCE = 0.6  # between a footprint and the camera
MIN_DISTANCE_AHEAD = 0.8  # footprints start this far in front of the camera (in y)
BOX_HALF_EXTENTS = ((0.15, 0.5), (0.15, 0.5), (0.15, 0.6))
SPHERE_RADIUS = (0.15, 0.5)
CYLINDER_RADIUS = (0.12, 0.4)
CYLINDER_HALF_HEIGHT = (0.2, 0.75)
CYLINDER_LYING_PROBABILITY = 0.3
TABLE_HALF_LENGTH = (0.4, 0.8)
TABLE_HALF_WIDTH = (0.3, 0.5)
TABLE_HEIGHT = (0.65, 0.8)
TABLE_TOP_HALF_THICKNESS = 0.025
TABLE_LEG_HALF_WIDTH = 0.03
TABLE_LEG_INSET = 0.07  # leg centres from the top's edges
TABLE_ITEM_PROBABILITY = 0.6  # a sphere or a box on the table...
TABLE_ITEM_RADIUS = (0.08, 0.2)  # ...this big (at most the table's half width)...
TABLE_BALL_PROBABILITY = 0.5  # ...a (red) ball this often, else a small crate
TABLE_BALL_TILT = 0.3  # radians
RED_BALL_PROBABILITY = 0.5  # spheres on the floor: red or blue

# --------------------------------------------------------------------------- depth dropouts
DROPOUT_COUNT = (0, 4)  # integers in [lo, hi)
DROPOUT_CENTER = (0.05, 0.95)  # fractions of the image width / height
DROPOUT_RADIUS = (0.02, 0.08)


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
    primitives: tuple[Primitive, ...]
    floor_colors: tuple[np.ndarray, np.ndarray]
    floor_tile: float
    wall_color: np.ndarray
    wall_stripe: float
    ceiling_color: np.ndarray
    dropouts: np.ndarray


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    """Draw a random room, camera, light and furniture from ``rng``."""
    room = _draw_room(rng)
    camera_position, camera_rotation = _draw_camera(rng, room)
    light, light_power = _draw_light(rng, room)
    primitives = _draw_furniture(rng, room, camera_position)
    floor_color = _jitter(rng, mat.FLOOR_PAINT)
    dropouts = _draw_dropouts(rng)
    return SceneSpec(room=room, camera_position=camera_position, camera_rotation=camera_rotation, light=light,
                     light_power=light_power, primitives=tuple(primitives), dropouts=dropouts,
                     **_draw_room_surfaces(rng, floor_color))


def _jitter(rng: np.random.Generator, paint: mat.Paint) -> np.ndarray:
    """One object's colour: ``paint.base`` plus uniform per-channel jitter (3 draws)."""
    return np.clip(np.asarray(paint.base, dtype=np.float64) + rng.uniform(-paint.jitter, paint.jitter, 3),
                   *mat.PAINT_RANGE)


# ---------------------------------------------------------------------- room, camera, light
def _draw_room(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(*ROOM_SIZE[0]), rng.uniform(*ROOM_SIZE[1]), rng.uniform(*ROOM_SIZE[2])])


def _draw_camera(rng: np.random.Generator, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position near the wall y = 0, and the camera-to-world rotation (yaw, pitch down, roll)."""
    position = np.array([rng.uniform(CAMERA_SIDE_MARGIN, room[0] - CAMERA_SIDE_MARGIN),
                         rng.uniform(*CAMERA_WALL_DISTANCE), rng.uniform(*CAMERA_HEIGHT)])
    yaw = math.radians(rng.uniform(*CAMERA_YAW))
    pitch = math.radians(rng.uniform(*CAMERA_PITCH))
    roll = math.radians(rng.uniform(*CAMERA_ROLL))
    return position, _camera_rotation(yaw, pitch, roll)


def _camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Columns: the camera's x-right, y-down and z-forward axes in world coordinates."""
    fwd = np.array([math.cos(pitch) * math.sin(yaw), math.cos(pitch) * math.cos(yaw), -math.sin(pitch)])
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    cr, sr = math.cos(roll), math.sin(roll)
    right, down = cr * right + sr * down, -sr * right + cr * down
    return np.stack([right, down, fwd], axis=1)


def _draw_light(rng: np.random.Generator, room: np.ndarray) -> tuple[np.ndarray, float]:
    """A point light just under the ceiling, and its power."""
    light = np.array([rng.uniform(LIGHT_WALL_MARGIN, room[0] - LIGHT_WALL_MARGIN),
                      rng.uniform(LIGHT_WALL_MARGIN, room[1] - LIGHT_WALL_MARGIN), room[2] - LIGHT_BELOW_CEILING])
    return light, float(rng.uniform(*mat.LIGHT_POWER))


def _draw_room_surfaces(rng: np.random.Generator, floor_color: np.ndarray) -> dict[str, object]:
    """Floor tiles, wallpaper and ceiling (the :class:`SceneSpec` fields of the same names)."""
    return {"floor_colors": (floor_color, mat.FLOOR_TILE_SCALE * floor_color),
            "floor_tile": float(rng.uniform(*mat.FLOOR_TILE_SIZE)),
            "wall_color": _jitter(rng, mat.WALL_PAINT), "wall_stripe": float(rng.uniform(*mat.WALL_STRIPE_PERIOD)),
            "ceiling_color": _jitter(rng, mat.CEILING_PAINT)}


def _draw_dropouts(rng: np.random.Generator) -> np.ndarray:
    """Elliptical invalid-depth blobs, (n, 4): centre (cu, cv) and radii (ru, rv) in image fractions."""
    n = int(rng.integers(*DROPOUT_COUNT))
    return np.stack([rng.uniform(*DROPOUT_CENTER, n), rng.uniform(*DROPOUT_CENTER, n),
                     rng.uniform(*DROPOUT_RADIUS, n), rng.uniform(*DROPOUT_RADIUS, n)], axis=1)


# ------------------------------------------------------------------------------- furniture
class _FloorPlan:
    """Where furniture may stand: in front of the camera, clear of the walls, the camera and the
    footprints (discs) of the pieces placed so far."""

    def __init__(self, rng: np.random.Generator, room: np.ndarray, camera: np.ndarray) -> None:
        self.rng, self.room, self.camera = rng, room, camera
        self.footprints: list[tuple[float, float, float]] = []  # (x, y, radius)

    def place(self, radius: float) -> tuple[float, float] | None:
        """A free spot (x, y) for a footprint of ``radius`` (now taken), or None (no room)."""
        rng, room, cam = self.rng, self.room, self.camera
        for _ in range(PLACEMENT_TRIES):
            lo_y = min(cam[1] + MIN_DISTANCE_AHEAD, room[1] - radius - WALL_CLEARANCE)
            x = rng.uniform(radius + WALL_CLEARANCE, room[0] - radius - WALL_CLEARANCE)
            y = rng.uniform(lo_y, room[1] - radius - WALL_CLEARANCE)
            if math.hypot(x - cam[0], y - cam[1]) < radius + CAMERA_CLEARANCE:
                continue
            if all(math.hypot(x - fx, y - fy) > radius + fr + WALL_CLEARANCE for fx, fy, fr in self.footprints):
                self.footprints.append((x, y, radius))
                return x, y
        return None


def _draw_furniture(rng: np.random.Generator, room: np.ndarray, camera: np.ndarray) -> list[Primitive]:
    """3-8 pieces of furniture standing on the floor (a piece that does not fit is left out)."""
    plan = _FloorPlan(rng, room, camera)
    prims: list[Primitive] = []
    n_tables = 0
    for _ in range(int(rng.integers(*FURNITURE_COUNT))):
        kind = rng.choice(list(FURNITURE_KINDS), p=list(FURNITURE_PROBABILITIES))
        if kind == "table" and n_tables >= MAX_TABLES:
            kind = "box"
        parts = _DRAW_PIECE[kind](rng, plan)
        if kind == "table" and parts:
            n_tables += 1
        prims.extend(parts)
    return prims


def _box(label: int, center, rotation: np.ndarray, half, color1: np.ndarray, color2: np.ndarray,
         pattern: float) -> Primitive:
    return Primitive("box", label, np.asarray(center, float), rotation, np.asarray(half, float), color1, color2,
                     pattern)


def _ball(center: np.ndarray, rotation: np.ndarray, radius: float, color: np.ndarray,
          rng: np.random.Generator) -> Primitive:
    """A beach ball of ``color`` and (drawn here) white sectors."""
    return Primitive("sphere", SPHERE, center, rotation, np.array([radius, radius, radius]), color,
                     _jitter(rng, mat.BALL_WHITE_PAINT), 0.0)


def _draw_box(rng: np.random.Generator, plan: _FloorPlan) -> list[Primitive]:
    """A crate standing on the floor, turned about z."""
    half = np.array([rng.uniform(*BOX_HALF_EXTENTS[0]), rng.uniform(*BOX_HALF_EXTENTS[1]),
                     rng.uniform(*BOX_HALF_EXTENTS[2])])
    at = plan.place(float(np.hypot(half[0], half[1])))
    if at is None:
        return []
    c1 = _jitter(rng, mat.CRATE_PAINT)
    return [_box(BOX, (at[0], at[1], half[2]), _rot_z(rng.uniform(0, math.pi)), half, c1, mat.CRATE_SEAM_SCALE * c1,
                 rng.uniform(*mat.CRATE_PLANK_WIDTH))]


def _draw_sphere(rng: np.random.Generator, plan: _FloorPlan) -> list[Primitive]:
    """A red or blue beach ball lying on the floor, in a random orientation."""
    r = rng.uniform(*SPHERE_RADIUS)
    at = plan.place(r)
    if at is None:
        return []
    rot = _rot_z(rng.uniform(0, 2 * math.pi)) @ _rot_x(rng.uniform(0, math.pi))
    c1 = _jitter(rng, mat.RED_BALL_PAINT) if rng.random() < RED_BALL_PROBABILITY else _jitter(rng, mat.BLUE_BALL_PAINT)
    return [_ball(np.array([at[0], at[1], r]), rot, r, c1, rng)]


def _draw_cylinder(rng: np.random.Generator, plan: _FloorPlan) -> list[Primitive]:
    """A ringed cylinder, upright or lying on its side."""
    r, hh = rng.uniform(*CYLINDER_RADIUS), rng.uniform(*CYLINDER_HALF_HEIGHT)
    lying = rng.random() < CYLINDER_LYING_PROBABILITY
    at = plan.place(float(math.hypot(hh, r)) if lying else r)
    if at is None:
        return []
    yaw = rng.uniform(0, math.pi)
    rot = _rot_z(yaw) @ _rot_x(math.pi / 2) if lying else _rot_z(yaw)
    cz = r if lying else hh
    c1 = _jitter(rng, mat.CYLINDER_PAINT)
    return [Primitive("cylinder", CYLINDER, np.array([at[0], at[1], cz]), rot, np.array([r, r, hh]), c1,
                      mat.CYLINDER_RING_SCALE * c1 + mat.CYLINDER_RING_LIFT, rng.uniform(*mat.RING_PITCH))]


def _draw_table(rng: np.random.Generator, plan: _FloorPlan) -> list[Primitive]:
    """A wooden table (a top and four legs), sometimes with a ball or a crate on it."""
    hx, hy, height = rng.uniform(*TABLE_HALF_LENGTH), rng.uniform(*TABLE_HALF_WIDTH), rng.uniform(*TABLE_HEIGHT)
    at = plan.place(float(np.hypot(hx, hy)))
    if at is None:
        return []
    rot = _rot_z(rng.uniform(0, math.pi))
    c1 = _jitter(rng, mat.WOOD_PAINT)
    c2, grain = mat.WOOD_GRAIN_SCALE * c1, rng.uniform(*mat.WOOD_GRAIN_FREQUENCY)
    parts = _table_parts(at, rot, hx, hy, height, c1, c2, grain)
    if rng.random() < TABLE_ITEM_PROBABILITY:
        parts.append(_draw_table_item(rng, at, height, hy))
    return parts


def _table_parts(at: tuple[float, float], rot: np.ndarray, hx: float, hy: float, height: float,
                 c1: np.ndarray, c2: np.ndarray, grain: float) -> list[Primitive]:
    """The top and the four legs of a table (no random draws)."""
    top_h = TABLE_TOP_HALF_THICKNESS
    parts = [_box(TABLE, np.array([at[0], at[1], height - top_h]), rot, (hx, hy, top_h), c1, c2, grain)]
    leg_h = (height - 2 * top_h) / 2
    for sx in (-1, 1):
        for sy in (-1, 1):
            off = rot @ np.array([sx * (hx - TABLE_LEG_INSET), sy * (hy - TABLE_LEG_INSET), 0.0])
            parts.append(_box(TABLE, (at[0] + off[0], at[1] + off[1], leg_h), rot,
                              (TABLE_LEG_HALF_WIDTH, TABLE_LEG_HALF_WIDTH, leg_h), c1, c2, grain))
    return parts


def _draw_table_item(rng: np.random.Generator, at: tuple[float, float], height: float, hy: float) -> Primitive:
    """A red ball or a small crate standing in the middle of a table top."""
    r = rng.uniform(TABLE_ITEM_RADIUS[0], min(TABLE_ITEM_RADIUS[1], hy))
    if rng.random() < TABLE_BALL_PROBABILITY:
        return _ball(np.array([at[0], at[1], height + r]), _rot_x(TABLE_BALL_TILT), r,
                     _jitter(rng, mat.RED_BALL_PAINT), rng)
    c1 = _jitter(rng, mat.CRATE_PAINT)
    return _box(BOX, (at[0], at[1], height + r), _rot_z(rng.uniform(0, math.pi)), (r, r, r), c1,
                mat.CRATE_SEAM_SCALE * c1, rng.uniform(*mat.SMALL_CRATE_PLANK_WIDTH))


_DRAW_PIECE: dict[str, Callable[[np.random.Generator, _FloorPlan], list[Primitive]]] = {
    "box": _draw_box, "sphere": _draw_sphere, "cylinder": _draw_cylinder, "table": _draw_table}

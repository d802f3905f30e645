"""How the synthetic scenes look: paint colours, texture patterns and the shading model.

Every appearance constant of :class:`~pyamalgam.data.SyntheticScenes` is named here once; colours
are linear RGB in [0, 1]. Changing any value changes the rendered images (bump the render version
in :mod:`.dataset` then: it is part of the cache key).
"""
from __future__ import annotations

from typing import NamedTuple


class Paint(NamedTuple):
    """A base colour and the per-object jitter (uniform, per channel) drawn around it."""

    base: tuple[float, float, float]
    jitter: float


# ------------------------------------------------------------------------------ paints
CRATE_PAINT = Paint((0.72, 0.50, 0.26), 0.08)  # boxes (and small boxes on tables)
RED_BALL_PAINT = Paint((0.85, 0.15, 0.15), 0.12)  # spheres: red or blue sectors, alternating with white
BLUE_BALL_PAINT = Paint((0.15, 0.25, 0.85), 0.12)
BALL_WHITE_PAINT = Paint((0.92, 0.92, 0.9), 0.05)
CYLINDER_PAINT = Paint((0.18, 0.62, 0.52), 0.1)
WOOD_PAINT = Paint((0.36, 0.20, 0.10), 0.06)  # tables
FLOOR_PAINT = Paint((0.58, 0.45, 0.32), 0.08)
WALL_PAINT = Paint((0.78, 0.74, 0.64), 0.1)
CEILING_PAINT = Paint((0.9, 0.9, 0.88), 0.04)
#: A jittered colour is clipped to this range per channel.
PAINT_RANGE = (0.02, 0.98)

#: The second colour of a material, from its first: ``scale * colour (+ lift)``.
CRATE_SEAM_SCALE = 0.45
CYLINDER_RING_SCALE, CYLINDER_RING_LIFT = 0.55, 0.3
WOOD_GRAIN_SCALE = 0.7
FLOOR_TILE_SCALE = 0.6

# ---------------------------------------------------------------- texture patterns (metres)
CRATE_PLANK_WIDTH = (0.12, 0.3)  # per box, uniform range
SMALL_CRATE_PLANK_WIDTH = (0.08, 0.15)  # boxes standing on a table
CRATE_SEAM_FRACTION = 0.1  # of a plank's width
BALL_SECTORS = 6.0  # alternating colour sectors around a sphere
RING_PITCH = (0.1, 0.3)  # cylinder rings along the axis, uniform range
RING_DUTY = 0.5  # fraction of a ring period in the first colour
WOOD_GRAIN_FREQUENCY = (25.0, 45.0)  # rad/m, uniform range
WOOD_WARP_AMPLITUDE = 0.15  # metres of sideways wobble of the grain...
WOOD_WARP_FREQUENCIES = (9.0, 3.0)  # ...as sin(f_y * y + f_z * z)
FLOOR_TILE_SIZE = (0.3, 0.6)  # uniform range
FLOOR_TILE_BRIGHTNESS = (0.9, 0.2)  # base + spread * hash(tile): every tile a little different
FLOOR_TILE_HASH_SALT = 1.0
CEILING_PANEL_SIZE = 0.6
CEILING_SEAM_FRACTION = 0.04
CEILING_SEAM_SHADE = 0.7
WALL_STRIPE_PERIOD = (0.08, 0.3)  # uniform range
WALL_STRIPE_CONTRAST = 0.12  # stripes are 1 +- contrast times the wall colour
SKIRTING_HEIGHT = 0.1
SKIRTING_SHADE = 0.35

# ------------------------------------------------------------------------------ shading
#: Ambient light: ``AMBIENT + AMBIENT_SKY * n_z`` (upward-facing surfaces a little brighter).
AMBIENT, AMBIENT_SKY = 0.22, 0.08
#: The point light: ``power * LIGHT_GAIN * max(n . l, 0) / (1 + (distance / LIGHT_FALLOFF) ** 2)``.
LIGHT_GAIN = 1.6
LIGHT_FALLOFF = 3.5
LIGHT_POWER = (0.8, 1.2)  # per scene, uniform range
#: Shadow rays start this far off the surface (metres), along its normal.
SHADOW_BIAS = 1e-6
#: The image is ``linear ** (1 / GAMMA)``, then sensor noise (``IMAGE_NOISE_STD``) is added.
GAMMA = 2.2
#: Standard deviation of the additive Gaussian sensor noise on the image.
IMAGE_NOISE_STD = 0.02

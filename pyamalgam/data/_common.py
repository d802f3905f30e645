"""Helpers shared by the data sets: argument checks, the sample contract, resizing.

Private to :mod:`pyamalgam.data`; imports nothing else from pyamalgam.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

#: Keys every data set in :mod:`pyamalgam.data` yields, in this order.
SAMPLE_KEYS = ("image", "seg", "depth", "normal", "mask")

from .._checks import check_int  # noqa: F401  (the loaders import it from here)

Sample = Dict[str, torch.Tensor]


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        want = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {want}, got {value!r}")
    return value


def check_resolution(name: str, value, allow_none: bool = False) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of positive ints (an int ``n`` means ``(n, n)``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (int,)) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (H, W) of positive ints, got {value!r}")
    try:
        h, w = (check_int(name, v, minimum=1) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}") from None
    return (h, w)


def check_index(index, length: int, owner: str) -> int:
    """Python-sequence indexing: ints (and numpy/torch integer scalars), negatives count from the end."""
    if isinstance(index, bool):
        raise TypeError(f"{owner} indices must be integers, got bool")
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"{owner} indices must be integers, got {type(index).__name__}") from None
    if not -length <= i < length:
        raise IndexError(f"{owner} index {i} is out of range for a data set of size {length} "
                         f"(valid: 0..{length - 1}, or negative from the end)" if length else
                         f"{owner} index {i} is out of range: the data set is empty")
    return i % length


def resize_sample(sample: Sample, resolution: Tuple[int, int]) -> Sample:
    """Resize a sample to ``resolution``: bilinear (antialiased) image, nearest for everything else.

    Nearest-neighbour for depth/normal/mask keeps invalid pixels invalid (no blending with zeros);
    the mask is re-derived from the resized mask, never interpolated.
    """
    h, w = sample["seg"].shape
    if (h, w) == tuple(resolution):
        return sample
    out = dict(sample)
    out["image"] = F.interpolate(sample["image"][None], size=resolution, mode="bilinear",
                                 align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)

    def nearest(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None].float(), size=resolution, mode="nearest-exact")[0]

    out["seg"] = nearest(sample["seg"][None])[0].to(torch.int64)
    out["depth"] = nearest(sample["depth"][None])[0]
    out["normal"] = nearest(sample["normal"])
    out["mask"] = nearest(sample["mask"][None])[0] > 0.5
    return out


def apply_transform(sample: Sample, transform: Optional[Callable[[Sample], Sample]]) -> Sample:
    if transform is None:
        return sample
    out = transform(sample)
    if not isinstance(out, dict):
        raise TypeError(f"transform must return the sample dict, got {type(out).__name__}")
    return out


def check_transform(transform) -> None:
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (sample dict -> sample dict) or None, "
                        f"got {type(transform).__name__}")

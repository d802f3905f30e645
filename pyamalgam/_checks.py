"""Argument checks that every floor of the package may use (imports nothing from pyamalgam)."""
from __future__ import annotations

import math
import numbers
import operator


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An int (numpy/torch integer scalars too, bool not), optionally ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (numpy/torch integer scalars too, bool
    not), else None: for a check that raises its own error, e.g. a ValueError naming a range."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_real(value) -> float | None:
    """``value`` as a float when it is a real number (int, float, numpy scalars; bool not), else
    None. Finiteness and range are the caller's, so that its message can name them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_float(name: str, value, positive: bool = False) -> float:
    """A real number (int, float, numpy scalars too; bool and tensors not) as a float; with
    ``positive``, also finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if positive and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_map(name: str, t, min_channels: int = 1) -> None:
    """``t`` is a floating-point (B, C, H, W) torch.Tensor with at least ``min_channels``
    channels: the input check of the loss terms and the critic (an error naming ``name``)."""
    import torch  # here, not at the top: this module loads no third-party package

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape[1] < min_channels:
        raise ValueError(f"{name} must have at least {min_channels} channels, got shape {tuple(t.shape)}")


def frame_list(name: str, frames, unit: str = "frame") -> list:
    """``frames``, one (B, T, C, H, W) tensor or a sequence of T (B, C, H, W) maps, as a
    non-empty list of the T maps (each map is the caller's to check; ``unit``: what a map is
    called in the error)."""
    import torch

    if isinstance(frames, torch.Tensor):
        if frames.dim() != 5:
            raise ValueError(f"{name} must be (B, T, C, H, W) or a sequence of (B, C, H, W), got shape "
                             f"{tuple(frames.shape)}")
        frames = frames.unbind(1)
    frames = list(frames)
    if not frames:
        raise ValueError(f"{name} must hold at least one {unit}")
    return frames

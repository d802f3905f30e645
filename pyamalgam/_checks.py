"""Argument checks that every floor of the package may use (imports nothing from pyamalgam)."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
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

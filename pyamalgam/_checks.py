"""Argument checks that every floor of the package may use (imports nothing from pyamalgam)."""
from __future__ import annotations

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

"""Helpers shared by the data sets: argument checks, the sample contract, resizing.

Private to :mod:`pyamalgam.data`; imports nothing else from pyamalgam but :mod:`pyamalgam._checks`.
"""
from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Keys every data set in :mod:`pyamalgam.data` yields, in this order.
SAMPLE_KEYS = ("image", "seg", "depth", "normal", "mask")

from .._checks import check_int  # the loaders import it from here

Sample = dict[str, torch.Tensor]


class DataFileError(OSError, ValueError):
    """A data file that cannot be read, or whose contents a loader cannot use; the message names
    the file (``path`` holds it).

    Both an ``OSError`` (the file is unreadable) and a ``ValueError`` (its values are wrong), so
    code that catches either keeps working; the CLI maps it to exit code 2. It takes the message
    as its only positional argument, which is what a DataLoader worker needs to re-raise it in
    the main process with its type intact.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)

    def __str__(self) -> str:  # OSError's own __str__ would print an errno-style tuple
        return str(self.args[0]) if self.args else ""


#: numpy dtype kinds by what a file may hold: "f" float, "u"/"i" integers.
_KIND_NAMES = {"f": "float", "u": "unsigned int", "i": "int", "b": "bool", "c": "complex"}


def read_npy(path: Path, what: str, kinds: str, ndims: tuple[int, ...]) -> np.ndarray:
    """Load a ``.npy`` file after checking its header: format, dtype kind (one of ``kinds``),
    number of dimensions (one of ``ndims``), no empty axis, and that the file really holds the
    bytes the header promises. ``what`` starts every message ("NYUv2 image").

    Checking the header first turns a bogus header (a shape of 10^12 pixels, a pickled object,
    a truncated file) into a :class:`DataFileError` naming the file, instead of a MemoryError,
    an EOFError or a reshape error without a name.
    """
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _npy_header(f, path, what)
            _check_npy_layout(path, what, shape, dtype, kinds, ndims)
            need = math.prod(shape) * dtype.itemsize
            have = os.fstat(f.fileno()).st_size - f.tell()
            if have < need:
                raise DataFileError(f"{what} {str(path)!r} is truncated: its header promises shape {shape} "
                                    f"{dtype} ({need} bytes of data), the file holds {have}", path)
            data = np.fromfile(f, dtype=dtype, count=math.prod(shape))
    except FileNotFoundError:
        raise  # the caller says what a missing file means
    except DataFileError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:
        raise DataFileError(f"{what} {str(path)!r} could not be read as a .npy array ({type(e).__name__}: {e})",
                            path) from e
    return data.reshape(shape, order="F" if fortran else "C")


def _npy_header(f, path: Path, what: str) -> tuple:
    """(shape, fortran_order, dtype) from the header of an open ``.npy`` file."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except (ValueError, EOFError) as e:  # empty file, not a .npy file, a header numpy refuses
        raise DataFileError(f"{what} {str(path)!r} is not a readable .npy file ({e})", path) from None
    # version 3.0 only adds utf-8 field names, i.e. structured arrays, which no loader reads
    raise DataFileError(f"{what} {str(path)!r}: .npy format version {version[0]}.{version[1]} is not supported "
                        f"(save it with numpy.save)", path)


def _check_npy_layout(path, what, shape, dtype, kinds, ndims) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in kinds:
        want = " or ".join(_KIND_NAMES.get(k, k) for k in kinds)
        raise DataFileError(f"{what} {str(path)!r} must hold {want} values, got dtype {dtype}", path)
    if len(shape) not in ndims:
        raise DataFileError(f"{what} {str(path)!r} must have {' or '.join(map(str, ndims))} dimensions, "
                            f"got shape {shape}", path)
    if 0 in shape:
        raise DataFileError(f"{what} {str(path)!r} is empty: shape {shape}", path)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        want = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {want}, got {value!r}")
    return value


def check_resolution(name: str, value, allow_none: bool = False) -> tuple[int, int] | None:
    """``(H, W)`` of positive ints (an int ``n`` means ``(n, n)``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
        try:
            n = check_int(name, value)
        except TypeError:
            raise TypeError(f"{name} must be a pair (H, W) of positive ints, got {value!r}") from None
        value = (n, n)
    if len(value) != 2:
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


def resize_sample(sample: Sample, resolution: tuple[int, int]) -> Sample:
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


def apply_transform(sample: Sample, transform: Callable[[Sample], Sample] | None) -> Sample:
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

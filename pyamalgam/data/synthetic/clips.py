"""The :class:`SyntheticClips` data set: short videos of one synthetic room with exact optical flow."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .._common import Sample, apply_transform, check_choice, check_index, check_int, check_resolution, check_transform
from .motion import Trajectory, draw_trajectory, exact_flow
from .primitives import CLASS_NAMES
from .rendering import MAX_DEPTH, intrinsics_for, render
from .scenes import SceneSpec, sample_scene

# Seed streams of the clips' splits: distinct from SyntheticScenes' (0, 1, 2), so a clip is never
# one of the still samples and the still data set is untouched.
_SPLIT_STREAMS = {"train": 10, "unlabelled": 11, "test": 12}
_SPLIT_ALIASES = {"unlabeled": "unlabelled"}
#: Per-split default ``size`` (clips).
DEFAULT_CLIP_SIZES = {"train": 200, "unlabelled": 1000, "test": 50}
#: Keys of a clip, in this order.
CLIP_KEYS = ("image", "seg", "depth", "normal", "mask", "flow", "flow_valid")


class SyntheticClips(Dataset):
    """Clips of ``frames`` consecutive frames of one synthetic room, the camera moving smoothly.

    Args:
        split: ``"train"``, ``"unlabelled"`` (``"unlabeled"`` accepted) or ``"test"``, each its own
            seed stream (and none shared with :class:`~.SyntheticScenes`).
        size: number of clips; default :data:`DEFAULT_CLIP_SIZES` [split].
        frames: frames per clip (``T >= 2``). Frame ``t`` does not depend on ``frames``: a longer
            clip of the same index extends a shorter one.
        resolution: ``(H, W)`` (an int ``n`` means ``(n, n)``).
        seed: non-negative int; clip ``i`` is a pure function of ``(seed, split, i, resolution)``
            (and of ``frames`` only through its length).
        transform: optional callable applied to each clip dict.

    Each clip is a dict of tensors, the still contract of :mod:`pyamalgam.data` with a leading
    time axis ``T``, plus the motion:

    * ``"image"`` float32 (T, 3, H, W); ``"seg"`` int64 (T, H, W); ``"depth"`` float32 (T, H, W);
      ``"normal"`` float32 (T, 3, H, W); ``"mask"`` bool (T, H, W): per frame exactly as in
      :class:`~.SyntheticScenes` (depth and normals in that frame's camera coordinates);
    * ``"flow"`` float32 (T-1, 2, H, W): the exact flow from frame t to frame t+1, in pixels, x
      then y (the convention of :mod:`pyamalgam._flow`: ``warp(x[t+1], flow[t])`` reproduces
      ``x[t]``);
    * ``"flow_valid"`` bool (T-1, H, W): the scene point of the pixel in frame t is visible in
      frame t+1 (in view, not occluded, not back-facing; :mod:`.motion`). It ignores ``mask``.

    :meth:`flow` gives the flow between any two frames of a clip (e.g. t -> t+k).
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = 255
    max_depth = MAX_DEPTH
    tasks = ("seg", "depth", "normal")

    def __init__(self, split: str = "train", size: int | None = None, frames: int = 4,
                 resolution: int | tuple[int, int] = (240, 320), seed: int = 0,
                 transform: Callable[[Sample], Sample] | None = None) -> None:
        split = _SPLIT_ALIASES.get(split, split) if isinstance(split, str) else split
        self.split = check_choice("split", split, tuple(_SPLIT_STREAMS))
        self.size = DEFAULT_CLIP_SIZES[self.split] if size is None else check_int("size", size, minimum=0)
        self.frames = check_int("frames", frames, minimum=2)
        self.resolution = check_resolution("resolution", resolution)
        self.seed = check_int("seed", seed, minimum=0)
        check_transform(transform)
        self.transform = transform

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        h, w = self.resolution
        return (f"SyntheticClips(split={self.split!r}, size={self.size}, frames={self.frames}, "
                f"resolution=({h}, {w}), seed={self.seed})")

    @property
    def intrinsics(self) -> torch.Tensor:
        """3x3 float64 camera matrix ``K`` of every frame (pixel centres at +0.5)."""
        return torch.from_numpy(intrinsics_for(self.resolution))

    def _streams(self, index: int):
        scene_ss, motion_ss, noise_ss = np.random.SeedSequence(
            [self.seed, _SPLIT_STREAMS[self.split], index]).spawn(3)
        noise = [np.random.default_rng(s) for s in noise_ss.spawn(self.frames)]
        return np.random.default_rng(scene_ss), np.random.default_rng(motion_ss), noise

    def trajectory(self, index: int) -> tuple[SceneSpec, Trajectory]:
        """The room (posed at frame 0) and the camera trajectory of clip ``index``."""
        i = check_index(index, self.size, "SyntheticClips")
        scene_rng, motion_rng, _ = self._streams(i)
        scene = sample_scene(scene_rng)
        return scene, draw_trajectory(motion_rng, scene, self.frames)

    def scenes(self, index: int) -> list[SceneSpec]:
        """The :class:`SceneSpec` of every frame of clip ``index`` (same room, moving camera)."""
        scene, traj = self.trajectory(index)
        return [traj.pose(scene, t) for t in range(self.frames)]

    def flow(self, index: int, source: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact flow (2, H, W) from frame ``source`` to frame ``target`` of clip ``index``, and
        where it is valid (H, W) (the pixel's point is visible in frame ``target``)."""
        poses = self.scenes(index)
        s = check_index(source, self.frames, "SyntheticClips frame")
        t = check_index(target, self.frames, "SyntheticClips frame")
        geometry: dict = {}
        render(poses[s], self.resolution, np.random.default_rng(0), geometry=geometry)
        flow, valid = exact_flow(geometry, poses[t], intrinsics_for(self.resolution), self.resolution)
        return torch.from_numpy(flow), torch.from_numpy(valid)

    def __getitem__(self, index) -> Sample:
        i = check_index(index, self.size, "SyntheticClips")
        scene_rng, motion_rng, noise = self._streams(i)
        scene = sample_scene(scene_rng)
        traj = draw_trajectory(motion_rng, scene, self.frames)
        k = intrinsics_for(self.resolution)
        frames, flows, valids = [], [], []
        poses = [traj.pose(scene, t) for t in range(self.frames)]
        for t, pose in enumerate(poses):
            geometry: dict = {}
            frames.append(render(pose, self.resolution, noise[t], geometry=geometry))
            if t + 1 < self.frames:
                flow, valid = exact_flow(geometry, poses[t + 1], k, self.resolution)
                flows.append(torch.from_numpy(flow))
                valids.append(torch.from_numpy(valid))
        clip = {key: torch.stack([f[key] for f in frames]) for key in ("image", "seg", "depth", "normal", "mask")}
        clip["flow"], clip["flow_valid"] = torch.stack(flows), torch.stack(valids)
        return apply_transform(clip, self.transform)

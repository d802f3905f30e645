"""The synthetic scenes of the table, rendered once and held in memory (every run reads the
same tensors instead of rendering per epoch)."""
from __future__ import annotations

import inspect

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import SyntheticScenes

__all__ = ["Rendered", "render_split", "EXTRA_TARGETS"]

#: tasks whose labels SyntheticScenes renders only when asked (its ``targets=``).
EXTRA_TARGETS = ("edges", "keypoints")


class Rendered(Dataset):
    """A rendered split: ``tensors`` key -> (n, ...) and the source's attributes."""

    def __init__(self, tensors: dict, source, tasks):
        self.tensors = tensors
        self.images = tensors["image"]
        self.num_classes, self.ignore_index = source.num_classes, source.ignore_index
        self.max_depth, self.class_names, self.tasks = source.max_depth, source.class_names, tuple(tasks)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def render_split(split: str, size: int, resolution, tasks, seed: int = 0, progress: bool = True) -> Rendered:
    """Render ``size`` synthetic scenes of ``split`` with the labels of ``tasks``."""
    extra = tuple(t for t in tasks if t in EXTRA_TARGETS)
    kwargs = {}
    if extra:
        if "targets" not in inspect.signature(SyntheticScenes).parameters:
            raise ValueError(f"tasks {list(extra)} need SyntheticScenes(..., targets=...), which this pyamalgam "
                             f"does not have")
        kwargs["targets"] = extra
    ds = SyntheticScenes(split, size=size, resolution=tuple(resolution), seed=seed, **kwargs)
    parts: dict = {}
    for batch in tqdm(DataLoader(ds, batch_size=32), desc=f"render {split}", disable=not progress, leave=False):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return Rendered({k: torch.cat(v) for k, v in parts.items()}, ds, tasks)

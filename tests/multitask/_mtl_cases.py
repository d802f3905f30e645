"""Shared pieces of the multi-task tests (also imported by their child processes): a labelled
toy data set with every task's ground truth and tiny multi-task networks with fixed seeds."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pyamalgam._testing import TensorItems
from pyamalgam.models.multitask import MultiTaskNet

H, W, K, BINS = 16, 24, 4, 8
TASKS = ("seg", "depth", "normal")


def tiny_mtl(tasks=TASKS, seed=0, decoder="unpool", shallow=False, depth=2):
    torch.manual_seed(seed)
    return MultiTaskNet(tasks, width=1 / 16, depth=depth, decoder=decoder, num_classes=K, num_bins=BINS,
                        max_depth=10.0, shallow=shallow)


class Labelled(TensorItems):
    """``n`` random images with random seg / depth / normal / mask labels; ``delay`` seconds per
    item slow a run down to be killed."""

    num_classes, ignore_index, max_depth, tasks, class_names = K, 255, 10.0, TASKS, tuple("abcd")

    def __init__(self, n=8, seed=0, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.rand(n, 3, H, W, generator=g)
        self.seg = torch.randint(0, K, (n, H, W), generator=g)
        self.seg[:, :2] = 255
        self.depth = 0.5 + 9 * torch.rand(n, H, W, generator=g)
        self.normal = F.normalize(torch.randn(n, 3, H, W, generator=g), dim=1)
        self.mask = torch.rand(n, H, W, generator=g) > 0.2
        super().__init__({"image": self.image, "seg": self.seg, "depth": self.depth, "normal": self.normal,
                          "mask": self.mask}, delay)


def loader(n=8, batch=4, seed=0, delay=0.0, distributed=False):
    """Shuffled batches, by a generator of their own (a DistributedSampler when ``distributed``)."""
    data = Labelled(n, seed, delay)
    if distributed:
        return DataLoader(data, batch_size=batch, sampler=torch.utils.data.DistributedSampler(data, seed=seed + 1))
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))


def digest(tr) -> str:
    from pyamalgam._testing import state_digest

    return state_digest(tr.step_module)

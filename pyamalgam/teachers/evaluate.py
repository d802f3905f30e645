"""Test metrics of a single-task teacher on a labelled data set (:mod:`pyamalgam.metrics`)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .._checks import check_int
from ..metrics import (DepthMetric, EdgeMetric, KeypointMetric, NormalCosineMetric, NormalMetric,
                       SegmentationMetric)

__all__ = ["evaluate_teacher"]


def _metrics(task: str, dataset) -> dict:
    if task == "seg":
        return {"": SegmentationMetric(dataset.num_classes, getattr(dataset, "ignore_index", 255))}
    if task == "depth":
        return {"": DepthMetric()}
    if task == "normal":
        return {"": NormalMetric(median_bins=180_000), "cosine": NormalCosineMetric()}
    return {"": EdgeMetric() if task == "edges" else KeypointMetric()}


@torch.no_grad()
def evaluate_teacher(net, dataset, task: str | None = None, *, batch_size: int = 16, device=None) -> dict:
    """The test metrics of ``net`` (a single-task teacher) on ``dataset``: name -> float.

    ``task`` defaults to the network's own (``net.task.name``). Segmentation: pixel accuracy,
    mIoU, mean class accuracy; depth: :class:`~pyamalgam.metrics.DepthMetric`'s keys; normals:
    :class:`~pyamalgam.metrics.NormalMetric`'s angles and ``cosine`` (seed 002's "SN CS");
    edges: :class:`~pyamalgam.metrics.EdgeMetric` (``abs`` is seed 002's "Edge Abs."); key-points:
    :class:`~pyamalgam.metrics.KeypointMetric` (``abs`` is "Key Abs."). Depth and normals are
    scored on the sample's ``"mask"``, the others on every labelled pixel.
    """
    from . import canonical_task  # the package imports this module

    task = canonical_task(task if task is not None else net.task.name)
    if task not in getattr(dataset, "tasks", (task,)):
        raise ValueError(f"the data set {type(dataset).__name__} has no ground truth for {task!r} "
                         f"(it has {list(dataset.tasks)})")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    metrics = _metrics(task, dataset)
    was_training = net.training
    net.eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pred = net(batch["image"].to(device)).float()
            target = batch[task].to(device)
            mask = batch["mask"].to(device) if task in ("depth", "normal") else None
            for m in metrics.values():
                if task == "seg":
                    m.update(pred, target)
                else:
                    m.update(pred, target, mask)
    finally:
        net.train(was_training)
    out = {}
    for prefix, m in metrics.items():
        out.update({(k if not prefix else prefix): float(v) for k, v in m.compute().items()})
    return out

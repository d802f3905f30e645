"""Test metrics of every network (§6.1) and the sample predictions of the figures."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..metrics import DepthMetric, NormalMetric, SegmentationMetric

__all__ = ["evaluate", "predict_samples"]


@torch.no_grad()
def evaluate(model, dataset, tasks, *, device="cpu", batch_size: int = 16) -> dict:
    """Test metrics of ``model`` for ``tasks`` (§6.1): output name -> metric dict (:mod:`pyamalgam.metrics`).

    ``model(images)`` may return one tensor (a single-task teacher: ``tasks`` has one entry) or
    a dict output name -> prediction (a TargetNet).
    """
    model.eval()
    metrics = {"seg": SegmentationMetric(dataset.num_classes, dataset.ignore_index), "depth": DepthMetric(),
               "normal": NormalMetric(median_bins=180_000)}
    metrics = {t: metrics[t] for t in tasks}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        out = model(batch["image"].to(device))
        if not isinstance(out, dict):
            out = {tasks[0]: out}
        for t, m in metrics.items():
            pred = out[t].float()
            if t == "seg":
                m.update(pred, batch["seg"].to(device))
            else:
                m.update(pred, batch[t].to(device), batch["mask"].to(device))
    return {t: {k: float(v) for k, v in m.compute().items()} for t, m in metrics.items()}


@torch.no_grad()
def predict_samples(pairs: dict, dataset, n: int, device) -> dict:
    """The first ``n`` test images, their ground truth, and per task the teacher's and the
    student's predictions (``pairs``: task -> ((name, net), (name, net))), on the CPU, for Figs. 5-6."""
    n = min(n, len(dataset))
    batch = {k: torch.stack([dataset[i][k] for i in range(n)]) for k in ("image", "seg", "depth", "normal", "mask")}
    images = batch["image"].to(device)
    predictions = {}
    for task, roles in pairs.items():
        predictions[task] = {}
        for role, (name, net) in zip(("teacher", "student"), roles):
            out = net.eval()(images)
            out = out[task] if isinstance(out, dict) else out
            predictions[task][role] = (name, (out.argmax(1) if task == "seg" else out).float().cpu())
    depth = batch["depth"][batch["mask"] & (batch["depth"] > 0)]
    return {"inputs": batch, "predictions": predictions, "class_names": list(dataset.class_names),
            "ignore_index": dataset.ignore_index,
            "depth_range": (0.0, float(depth.max()) if depth.numel() else float(dataset.max_depth))}

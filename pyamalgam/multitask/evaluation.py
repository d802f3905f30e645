"""Test metrics of a network for the table's tasks, through the task registry (:mod:`.tasks`)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .tasks import task_spec

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(net, dataset, tasks, device="cpu", *, path: str = "T", batch_size: int = 16) -> dict:
    """Column -> value (:data:`~pyamalgam.multitask.COLUMNS`) of ``net`` on ``dataset``.

    ``net(images)`` may return a dict task -> prediction (a MultiTaskNet, a TargetNet) or one
    tensor (a single-task network: ``tasks`` has one entry). ``path="S"``: a MultiTaskNet's
    shallow path (:meth:`~pyamalgam.models.multitask.MultiTaskNet.forward_shallow`).
    """
    if path not in ("T", "S"):
        raise ValueError(f"path must be 'T' or 'S', got {path!r}")
    net.eval()
    specs = {t: task_spec(t) for t in tasks}
    metrics = {t: spec.metric(dataset) for t, spec in specs.items()}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = net.forward_shallow(batch["image"]) if path == "S" else net(batch["image"])
        if not isinstance(out, dict):
            out = {tasks[0]: out}
        for t, spec in specs.items():
            spec.update(metrics[t], out[t], batch)
    result = {}
    for t, spec in specs.items():
        result.update({k: float(v) for k, v in spec.summary(metrics[t].compute()).items()})
    return result

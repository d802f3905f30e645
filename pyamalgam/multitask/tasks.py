"""The task registry of the multi-task trainer: per task, its label loss, its distillation loss
and its streaming metric with the columns of seed 002's Table 1.

A :class:`TaskSpec` is looked up by the task's output name (``"seg"``, ``"depth"``,
``"normal"``, and ``"edges"``, ``"keypoints"`` where pyamalgam knows those tasks); a new task
joins with :func:`register_task`. The networks build the task's head from the same name
(:func:`pyamalgam.models.multitask.resolve_tasks`), so the three stay in step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..losses.distillation import pixel_wise_loss
from ..teachers import teacher_loss

__all__ = ["TaskSpec", "register_task", "task_spec", "known_tasks", "COLUMNS"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How the multi-task trainer treats one task.

    label_loss(prediction, batch, ignore_index) -> scalar: the supervised loss (>= 0, so that
        the uncertainty and DWA weightings see a positive loss).
    kd_loss(student, teacher) -> scalar: a distillation side (see
        :func:`pyamalgam.models.multitask.head_outputs`) against a detached teacher's; 0 when
        the two agree.
    metric(dataset) -> a streaming metric; update(metric, prediction, batch); summary(computed)
        -> column name -> value, in the order of :data:`COLUMNS`.
    """

    name: str
    label_loss: Callable
    kd_loss: Callable
    metric: Callable
    update: Callable
    summary: Callable


_REGISTRY: dict = {}

#: column -> (task, label in the table, higher is better); the seed's Table 1 columns.
COLUMNS = {
    "seg/pixel_acc": ("seg", "Seg. pixel acc ↑", True),
    "seg/miou": ("seg", "mIoU ↑", True),
    "depth/abs": ("depth", "Depth abs ↓", False),
    "depth/rel": ("depth", "Depth rel ↓", False),
    "normal/cos": ("normal", "SN cos ↑", True),
    "keypoints/abs": ("keypoints", "Key abs ↓", False),
    "edges/abs": ("edges", "Edge abs ↓", False),
}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make ``spec`` the multi-task trainer's treatment of ``spec.name``."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task needs a TaskSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"task {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def known_tasks() -> tuple:
    return tuple(_REGISTRY)


def task_spec(name: str) -> TaskSpec:
    """The registered :class:`TaskSpec` of output name ``name``; a ValueError listing the known ones."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"the multi-task trainer knows no task {name!r}; known: {list(_REGISTRY)} "
                         f"(register one with pyamalgam.multitask.register_task)")
    return spec


# ---------------------------------------------------------------- the built-in tasks


def _kl(student, teacher):
    # Thesis Eq. 3.1 at T = 1 in Hinton's order (the teacher's soft targets), on class or depth-bin logits.
    return pixel_wise_loss(student, teacher.detach(), 1.0, order="teacher")


def _one_minus_cos(student, teacher):
    cos = torch.nn.functional.cosine_similarity(student.float(), teacher.detach().float(), dim=1, eps=1e-8)
    return 1.0 - cos.mean()


def _l1(student, teacher):
    return (student.float() - teacher.detach().float()).abs().mean()


def _label(name, offset=0.0):
    def loss(prediction, batch, ignore_index):
        return teacher_loss(name, prediction, batch, ignore_index) + offset
    return loss


def _seg_metric(ds):
    from ..metrics import SegmentationMetric
    return SegmentationMetric(ds.num_classes, ds.ignore_index)


def _depth_metric(ds):
    from ..metrics import DepthMetric
    return DepthMetric()


class _Cosine:
    """Mean cosine between predicted and true normals over valid pixels (float64 sums); the
    stand-in while pyamalgam.metrics has no NormalCosineMetric."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, pred, target, mask=None):
        valid = target.abs().sum(dim=1) > 0
        valid = valid if mask is None else valid & mask
        cos = torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=1, eps=1e-12)
        self.total += float(cos[valid].sum())
        self.count += int(valid.sum())

    def compute(self):
        return {"cosine": self.total / self.count if self.count else float("nan")}


def _normal_metric(ds):
    from .. import metrics

    cls = getattr(metrics, "NormalCosineMetric", None)
    return cls() if cls is not None else _Cosine()


def _masked_update(metric, pred, batch, key):
    metric.update(pred.float(), batch[key], batch["mask"])


def _abs_metric(kind):
    def make(ds):
        from .. import metrics

        return getattr(metrics, kind)()
    return make


register_task(TaskSpec(
    "seg", _label("seg"), _kl, _seg_metric, lambda m, p, b: m.update(p.float(), b["seg"]),
    lambda r: {"seg/pixel_acc": r["pixel_acc"], "seg/miou": r["miou"]}))
register_task(TaskSpec(
    "depth", _label("depth"), _kl, _depth_metric, lambda m, p, b: _masked_update(m, p, b, "depth"),
    lambda r: {"depth/abs": r["mae"], "depth/rel": r["abs_rel"]}))
# Eq. 4 is -mean cos; shifted by 1 (same gradient) so that the loss is >= 0 for the weightings.
register_task(TaskSpec(
    "normal", _label("normal", 1.0), _one_minus_cos, _normal_metric, lambda m, p, b: _masked_update(m, p, b, "normal"),
    lambda r: {"normal/cos": r["cosine"]}))
# The seed's key-point and edge columns are mean absolute errors: L1 is their distillation loss.
register_task(TaskSpec(
    "edges", _label("edges"), _l1, _abs_metric("EdgeMetric"), lambda m, p, b: m.update(p.float(), b["edges"]),
    lambda r: {"edges/abs": r["abs"]}))
register_task(TaskSpec(
    "keypoints", _label("keypoints"), _l1, _abs_metric("KeypointMetric"),
    lambda m, p, b: m.update(p.float(), b["keypoints"]), lambda r: {"keypoints/abs": r["abs"]}))

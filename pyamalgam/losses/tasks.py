"""Task losses of paper 001 (§4) and the task objects teachers declare.

During amalgamation no label is read: a teacher's own prediction, turned into supervision by
:meth:`Task.target`, plays the ground truth of Eq. 1, 3 and 4 (Eq. 6 / 8 / 9 of §5). A task is
therefore a pair (how a prediction becomes a target, how a prediction is scored against one).
Predictions reach the losses in float32 whatever autocast produced, so the bf16 option changes
the networks' arithmetic and not the objective.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import si_depth_loss

__all__ = [
    "Task",
    "SegmentationTask",
    "DepthTask",
    "NormalTask",
    "LossTask",
    "get_task",
    "segmentation_loss",
    "depth_loss",
    "normal_loss",
]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Eq. 1 without the L2 term: mean pixel-wise cross-entropy of (B, K, H, W) logits.

    ``target`` holds class indices (B, H, W): cross-entropy against the one-hot coding of the
    teacher's argmax is exactly cross-entropy against that index. The ``lambda R(theta)`` term of
    Eq. 1 is the optimiser's weight decay.
    """
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def depth_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 3, the scale-invariant loss over valid pixels, via :func:`pyamalgam.ops.si_depth_loss`."""
    return si_depth_loss(pred.float(), target.float(), mask)


def normal_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 4: ``-(1/N) sum_i M_i . M_i^gt`` over the N valid pixels of (B, 3, H, W) unit normals."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred and target must both be (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    dot = (pred.float() * target.float()).sum(dim=1)
    if mask is None:
        return -dot.mean()
    if mask.shape != dot.shape:
        raise ValueError(f"mask must be (B, H, W) = {tuple(dot.shape)}, got {tuple(mask.shape)}")
    # where() rather than a product so that a NaN normal at a masked pixel cannot leak in.
    dot = torch.where(mask, dot, torch.zeros_like(dot))
    return -dot.sum() / mask.sum().clamp_min(1)


class Task:
    """A prediction task: how a teacher's prediction supervises a student's (no labels).

    Subclasses set ``name`` and implement :meth:`loss`; :meth:`target` defaults to the detached
    prediction itself.
    """

    name: str = "task"

    def target(self, prediction: torch.Tensor) -> torch.Tensor:
        """Turn a teacher prediction into the supervision of :meth:`loss`."""
        return prediction.detach()

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SegmentationTask(Task):
    """Scene parsing, Eq. 1: the teacher's logits become its arg-max labels (one-hot coding)."""

    def __init__(self, name: str = "seg"):
        self.name = name

    def target(self, prediction):
        return prediction.detach().argmax(dim=1)

    def loss(self, prediction, target):
        return segmentation_loss(prediction, target)


class DepthTask(Task):
    """Depth estimation, Eq. 3 on metric depth already decoded by Eq. 2 (the depth head does it)."""

    def __init__(self, name: str = "depth"):
        self.name = name

    def loss(self, prediction, target):
        return depth_loss(prediction, target)


class NormalTask(Task):
    """Surface normals, Eq. 4 on unit normals (B, 3, H, W)."""

    def __init__(self, name: str = "normal"):
        self.name = name

    def loss(self, prediction, target):
        return normal_loss(prediction, target)


class LossTask(Task):
    """A user task: any ``loss_fn(prediction, target) -> scalar`` on a teacher's prediction.

    Args:
        loss_fn: the loss; it receives the student-side prediction and the teacher's target.
        name: output name of the task.
        target_fn: turns the teacher's prediction into the target (default: detach it).
    """

    def __init__(self, loss_fn: Callable, name: str = "task", target_fn: Optional[Callable] = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.name = name
        self.loss_fn = loss_fn
        self.target_fn = target_fn

    def target(self, prediction):
        return prediction.detach() if self.target_fn is None else self.target_fn(prediction.detach())

    def loss(self, prediction, target):
        return self.loss_fn(prediction, target)


_ALIASES = {
    "seg": SegmentationTask, "segmentation": SegmentationTask, "parsing": SegmentationTask,
    "depth": DepthTask,
    "normal": NormalTask, "normals": NormalTask, "surface_normals": NormalTask,
}


def get_task(spec, name: Optional[str] = None) -> Task:
    """A :class:`Task` from a name ("segmentation", "depth", "normals"), a Task, or a loss callable.

    ``name`` renames the task's output (defaults: "seg", "depth", "normal", "task").
    """
    if isinstance(spec, Task):
        if name is not None and name != spec.name:
            raise ValueError(f"task {spec!r} is named {spec.name!r}, not {name!r}")
        return spec
    if isinstance(spec, str):
        cls = _ALIASES.get(spec.lower())
        if cls is None:
            raise ValueError(f"unknown task {spec!r}; expected one of {sorted(_ALIASES)}, a Task, or a loss callable")
        return cls() if name is None else cls(name)
    if callable(spec):
        return LossTask(spec, name or "task")
    raise TypeError(f"task must be a name, a Task or a loss callable, got {type(spec).__name__}")

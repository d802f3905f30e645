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
    "EdgeTask",
    "KeypointTask",
    "LossTask",
    "get_task",
    "segmentation_loss",
    "depth_loss",
    "normal_loss",
    "edge_loss",
    "keypoint_loss",
    "EDGE_MIN_FRACTION",
]

#: The edge fraction rho of :func:`edge_loss` is clamped to [this, 1 - this], so that an image
#: without edges (or all edge) still weighs both classes (HED's beta would give one weight 0).
EDGE_MIN_FRACTION = 0.01


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


def _map_pair(fn: str, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]):
    """(pred, target, mask) as (B, H, W) tensors (a singleton channel dim is dropped); float64
    stays float64 (gradcheck), anything else is computed in float32."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
    pred, target = (t.squeeze(1) if t.dim() == 4 and t.shape[1] == 1 else t for t in (pred, target))
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"{fn}: pred and target must both be (B, H, W) or (B, 1, H, W) maps of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    if not pred.is_floating_point() or not target.is_floating_point():
        raise TypeError(f"{fn}: pred and target must be floating point, got {pred.dtype} and {target.dtype}")
    if mask is not None:
        mask = mask.squeeze(1) if mask.dim() == 4 and mask.shape[1] == 1 else mask
        if mask.dtype != torch.bool or mask.shape != pred.shape:
            raise ValueError(f"{fn}: mask must be a bool (B, H, W) = {tuple(pred.shape)} tensor, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return pred.to(dtype), target.to(dtype), mask


def edge_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
              balanced: bool = True) -> torch.Tensor:
    """Class-balanced binary cross-entropy of an edge map (HED, Xie & Tu 2015, Eq. 2), normalised.

    ``pred``: edge probabilities in [0, 1] (:class:`~pyamalgam.models.EdgeHead`), ``target``: the
    edge map (binary labels, or a teacher's probabilities), both (B, H, W) or (B, 1, H, W); ``mask``
    (B, H, W) bool, True = valid. Per image b, ``rho_b`` is the mean target over its valid pixels,
    clamped to [:data:`EDGE_MIN_FRACTION`, 1 - EDGE_MIN_FRACTION], and::

        w_bi = (1 - rho_b) y_bi + rho_b (1 - y_bi)
        L    = sum_bi m_bi w_bi BCE(p_bi, y_bi) / sum_bi m_bi w_bi,   BCE(p, y) = -y log p - (1-y) log(1-p)

    With binary labels this is HED's class-balanced loss (positives weigh beta = |Y-|/|Y| =
    1 - rho, negatives 1 - beta); with a teacher's soft map each pixel's term is still minimised
    at p = y (the student copies the teacher, it does not push the teacher's map further towards
    edges), weighted by how much edge the teacher sees there. Deviations from HED, for a loss
    whose size depends neither on the image size nor on the edge density: the weighted mean
    instead of HED's sum, and the clamp of rho (an image without edges would give the negatives
    weight 0). The seed (002) scores edges by mean absolute error and names no loss; a plain L1
    loss on a map that is ~90 % zeros is minimised by predicting no edge at all, which is why we
    train with this one and report the seed's abs error as a metric. The weights depend on the
    target only (no gradient flows into ``target``); ``p`` and ``1 - p`` are clamped to the dtype's
    smallest normal number inside the logs, so p = 0 or 1 gives finite values and gradients.

    ``balanced=False`` drops the class weights (w = 1, plain mean BCE): calibrated probabilities,
    so a lower abs error (the seed's metric), but thin edges are learnt later. With the default,
    predictions lean towards edges (high recall), which costs abs error.
    """
    pred, target, mask = _map_pair("edge_loss", pred, target, mask)
    if mask is not None:  # what lies under the mask is never read, not even by the range check
        target = torch.where(mask, target, torch.zeros_like(target))
    outside = ((pred < 0) | (pred > 1)).any() | ((target < 0) | (target > 1)).any()  # NaN passes: the engine reports it
    if outside:
        raise ValueError(f"edge_loss: pred and target must lie in [0, 1] (probabilities, e.g. EdgeHead's output), got "
                         f"pred in [{pred.min().item():g}, {pred.max().item():g}] and target in "
                         f"[{target.min().item():g}, {target.max().item():g}]")
    with torch.no_grad():
        m = torch.ones_like(target) if mask is None else mask.to(target.dtype)
        rho = (target * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)
        rho = rho.clamp(EDGE_MIN_FRACTION, 1 - EDGE_MIN_FRACTION)[:, None, None]
        weight = m * ((1 - rho) * target + rho * (1 - target)) if balanced else m
    # log of p clamped to the smallest normal number: finite values and finite gradients at p = 0 or 1
    tiny = torch.finfo(pred.dtype).tiny
    bce = -(target * torch.log(pred.clamp_min(tiny)) + (1 - target) * torch.log((1 - pred).clamp_min(tiny)))
    if mask is not None:  # where(): a NaN prediction at a masked pixel cannot leak in
        bce = torch.where(mask, bce, torch.zeros_like(bce))
    return (weight * bce).sum() / weight.sum().clamp_min(tiny)


def keypoint_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error of a key-point heat-map over the valid pixels (the heat-map regression of
    Tompson et al. 2014 / Newell et al. 2016). The seed (002) names no loss; it scores key-points
    by mean absolute error, which we report as the metric. Shapes as in :func:`edge_loss`."""
    pred, target, mask = _map_pair("keypoint_loss", pred, target, mask)
    sq = (pred - target) ** 2
    if mask is None:
        return sq.mean()
    # where() rather than a product so that a NaN prediction at a masked pixel cannot leak in.
    return torch.where(mask, sq, torch.zeros_like(sq)).sum() / mask.sum().clamp_min(1)


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


class EdgeTask(Task):
    """Occlusion/semantic edges (seed 002's "Edge" column): :func:`edge_loss` on (B, H, W)
    probabilities. A teacher's probabilities are the student's soft target (not thresholded:
    the soft map carries the teacher's confidence, as the soft labels of knowledge distillation)."""

    def __init__(self, name: str = "edges", balanced: bool = True):
        self.name = name
        self.balanced = bool(balanced)  # not kept by model files: it only matters for training

    def loss(self, prediction, target):
        return edge_loss(prediction, target, balanced=self.balanced)


class KeypointTask(Task):
    """Key-point heat-maps (seed 002's "Key" column): :func:`keypoint_loss` (MSE) on (B, H, W)
    maps; a teacher's heat-map is the student's target as it is."""

    def __init__(self, name: str = "keypoints"):
        self.name = name

    def loss(self, prediction, target):
        return keypoint_loss(prediction, target)


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
    "edges": EdgeTask, "edge": EdgeTask,
    "keypoints": KeypointTask, "keypoint": KeypointTask, "key_points": KeypointTask,
}


def get_task(spec, name: Optional[str] = None) -> Task:
    """A :class:`Task` from a name ("segmentation", "depth", "normals", "edges", "keypoints"), a
    Task, or a loss callable.

    ``name`` renames the task's output (defaults: "seg", "depth", "normal", "edges", "keypoints",
    "task").
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

"""One distillation step's pieces: the student's side (the module the engine trains), the task
loss on labels, and the images of a batch."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import batch_images
from ..losses import DepthTask, NormalTask, SegmentationTask, depth_loss, normal_loss
from ..models.protocol import check_input

__all__ = ["DistillStep", "LabelLoss", "default_task_loss", "batch_image"]


class DistillStep(nn.Module):
    """The student's side of a step: the student and the terms' loss modules (a connector of
    channel-wise distillation lives in its loss and trains with the student). The engine trains
    this module's parameters and wraps it in DDP under torchrun, so the student's forward and
    every term that has parameters run inside :meth:`forward`, where DDP sees them.

    ``forward(image, teacher_output, teacher_features) -> (student_output, {term: value})``:
    the unweighted value of each non-holistic term on this batch.
    """

    def __init__(self, student: nn.Module, runner, specs, losses: Mapping[str, nn.Module]):
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(dict(losses))
        self._runner = runner  # not a module: its network is self.student, registered once
        self._specs = [s for s in specs if not s.holistic]

    def forward(self, image, teacher_output, teacher_features):
        output, features = self._runner.run(image)
        values = {}
        for spec in self._specs:
            ys = output if spec.student.kind == "output" else features[spec.student.key]
            yt = teacher_output if spec.teacher.kind == "output" else teacher_features[spec.teacher.key]
            values[spec.name] = check_scalar(spec.name, self.losses[spec.name](ys, yt))
        return output, values


def check_scalar(name: str, value, what: Optional[str] = None) -> torch.Tensor:
    """``value`` as a 0-dim tensor, or a TypeError naming the term (``what``) that returned it."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{what or f'terms[{name!r}]'} must return a floating-point scalar tensor, got {got}")
    return value.reshape(())


class LabelLoss:
    """l_mc of thesis Eq. 3.4 from the labels of a dict batch (the student's own task loss,
    paper 001 Eq. 1, 3, 4), or None where the batch has no labels for it.

    * segmentation: cross-entropy over the pixels whose label is not ``ignore_index`` (their
      mean; 0 when a batch has none, never NaN);
    * depth: the scale-invariant loss over ``batch["mask"]`` and depth > 0;
    * normals: the negative mean cosine over ``batch["mask"]`` and non-zero normals.
    """

    def __init__(self, task, ignore_index: int = 255):
        self.kind = ("seg" if isinstance(task, SegmentationTask) else "depth" if isinstance(task, DepthTask)
                     else "normal")
        self.key, self.ignore_index = task.name, ignore_index

    def __call__(self, output: torch.Tensor, batch) -> Optional[torch.Tensor]:
        if not isinstance(batch, Mapping) or self.key not in batch:
            return None
        target = batch[self.key].to(output.device, non_blocking=True)
        if self.kind == "seg":
            valid = target != self.ignore_index
            ce = F.cross_entropy(output.float(), target, ignore_index=self.ignore_index, reduction="sum")
            return ce / valid.sum().clamp_min(1)
        mask = _mask(batch, target, output.device)
        if self.kind == "depth":
            mask = mask & (target > 0)
            return depth_loss(output, target.reshape(output.shape), mask.reshape(output.shape))
        mask = mask & (target.abs().sum(dim=1) > 0)
        return normal_loss(output, target, mask)

    def __repr__(self) -> str:
        return f"LabelLoss({self.kind}, batch[{self.key!r}], ignore_index={self.ignore_index})"


def _mask(batch, target, device) -> torch.Tensor:
    if "mask" in batch:
        return batch["mask"].to(device, non_blocking=True).bool()
    shape = target.shape if target.dim() == 3 else (target.shape[0], *target.shape[2:])
    return torch.ones(shape, dtype=torch.bool, device=device)


def default_task_loss(student: nn.Module, ignore_index: int) -> Optional[LabelLoss]:
    """The label loss of the student's one declared task (segmentation, depth or normals), or
    None (a student of another task, or that declares none, learns from the teacher only)."""
    tasks = getattr(student, "tasks", None)
    if not isinstance(tasks, Mapping) or len(tasks) != 1:
        return None
    task = next(iter(tasks.values()))
    if not isinstance(task, (SegmentationTask, DepthTask, NormalTask)):
        return None
    return LabelLoss(task, ignore_index)


def batch_image(batch, student: nn.Module, device, channels_last: bool) -> torch.Tensor:
    """The images of a batch (a dict's "image", a tuple's first element, or a tensor), checked
    against the student (channels, divisibility of H and W) and moved to ``device``."""
    x, name = batch_images(batch, strict=True)
    check_input(x, getattr(student, "in_chans", x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 3),
                getattr(student, "size_divisor", 1), name)
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

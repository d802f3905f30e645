"""Streaming semantic-segmentation metrics from a confusion matrix."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .._checks import check_int

__all__ = ["SegmentationMetric"]


# ---------------------------------------------------------------- argument checks (shared)
def _check_tensor(name: str, t, floating: Optional[bool] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_mask(mask, shape: torch.Size, target_name: str = "target") -> Optional[torch.Tensor]:
    """``mask`` must be bool with the (channel-squeezed) target shape, or None."""
    if mask is None:
        return None
    _check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = evaluate the pixel), got {mask.dtype}")
    if mask.dim() == len(shape) + 1 and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of {target_name} {tuple(shape)} "
                         f"(or with a singleton channel dim), got {tuple(mask.shape)}")
    return mask


class SegmentationMetric:
    """Pixel accuracy, mean IoU and mean class accuracy, accumulated over batches.

    Args:
        num_classes: number of classes ``K``; labels are ``0..K-1``.
        ignore_index: target label to skip (default 255, the :mod:`pyamalgam.data` convention),
            or ``None``. It may also be a real class id (e.g. 0 for "unlabelled"): pixels whose
            target is ``ignore_index`` are skipped, and if ``0 <= ignore_index < K`` that class is
            excluded from the per-class means as well.

    :meth:`update` takes ``pred`` as logits/scores ``(B, K, H, W)`` (floating; argmax over dim 1)
    or labels ``(B, H, W)`` (integer), ``target`` ``(B, H, W)`` integer labels, and an optional
    bool ``mask`` ``(B, H, W)`` (False = skip the pixel). Any number of spatial dims works as long
    as pred and target agree (labels: same shape; logits: target shape with K inserted at dim 1).

    The confusion matrix (:attr:`confusion_matrix`, int64 ``(K, K)``, rows = target, columns =
    prediction) is the whole state, so streaming over batches gives exactly the numbers of one
    computation over the whole data set. :meth:`compute` returns

    * ``pixel_acc``: correctly classified pixels / evaluated pixels;
    * ``miou``: mean over classes *present* (in the target or in the prediction, over the data
      seen so far) of ``TP / (TP + FP + FN)``. Classes absent from both are left out rather than
      counted as 0 or 1 (a class that is predicted but never present has IoU 0 and counts);
    * ``mean_acc``: mean over classes present in the target of ``TP / (TP + FN)``.

    All are fractions in [0, 1] (``nan`` when no pixel has been evaluated yet). Calling
    :meth:`compute` before any :meth:`update` raises ``RuntimeError``.
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.ignore_index = None if ignore_index is None else check_int("ignore_index", ignore_index)
        self.reset()

    def __repr__(self) -> str:
        return f"SegmentationMetric(num_classes={self.num_classes}, ignore_index={self.ignore_index})"

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._cm: Optional[torch.Tensor] = None

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """int64 ``(K, K)`` counts, rows = target class, columns = predicted class (a copy)."""
        if self._cm is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self._cm.clone()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Accumulate one batch (see the class docstring for shapes)."""
        _check_tensor("pred", pred)
        _check_tensor("target", target)
        k = self.num_classes
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must be an integer label tensor, got {target.dtype}")
        if target.dim() < 1:
            raise ValueError("target must have a batch dimension, e.g. (B, H, W); got a scalar")
        if pred.is_floating_point():
            want = (target.shape[0], k) + tuple(target.shape[1:])
            if tuple(pred.shape) != want:
                raise ValueError(f"pred is floating point, so it must be logits/scores of shape {want} "
                                 f"(B, num_classes={k}, *spatial) for target {tuple(target.shape)}, "
                                 f"got {tuple(pred.shape)}; integer pred is read as labels")
            labels = pred.argmax(dim=1)
        elif pred.dtype == torch.bool or pred.is_complex():
            raise TypeError(f"pred must be floating logits or integer labels, got {pred.dtype}")
        else:
            if pred.shape != target.shape:
                raise ValueError(f"pred labels must have the shape of target {tuple(target.shape)}, "
                                 f"got {tuple(pred.shape)} (logits need a class dim at position 1)")
            labels = pred
        if labels.device != target.device:
            raise ValueError(f"pred and target must be on the same device, got {labels.device} and {target.device}")
        mask = _check_mask(mask, target.shape)

        t = target.reshape(-1).to(torch.int64)
        p = labels.reshape(-1).to(torch.int64)
        valid = torch.ones_like(t, dtype=torch.bool) if self.ignore_index is None else t != self.ignore_index
        if mask is not None:
            valid &= mask.reshape(-1).to(t.device)
        t, p = t[valid], p[valid]
        bad = (t < 0) | (t >= k)
        if bad.any():
            raise ValueError(f"target holds label {int(t[bad][0])} outside 0..{k - 1} "
                             f"(and it is not ignore_index={self.ignore_index})")
        bad = (p < 0) | (p >= k)
        if bad.any():
            raise ValueError(f"pred holds label {int(p[bad][0])} outside 0..{k - 1}")
        counts = torch.bincount(t * k + p, minlength=k * k).view(k, k)
        if self._cm is None:
            self._cm = counts
        else:
            self._cm += counts.to(self._cm.device)

    def iou_per_class(self) -> torch.Tensor:
        """float64 ``(K,)`` IoU per class; ``nan`` for classes absent from target and prediction
        (and for ``ignore_index`` when it is a class id)."""
        cm = self._state().double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            iou[self.ignore_index] = math.nan
        return iou.cpu()

    def _state(self) -> torch.Tensor:
        if self._cm is None:
            raise RuntimeError("SegmentationMetric.compute() called before any update()")
        return self._cm

    def compute(self) -> Dict[str, float]:
        """``{"pixel_acc", "miou", "mean_acc"}`` over everything seen since the last reset."""
        cm = self._state().double()
        total = cm.sum()
        pixel_acc = (cm.diagonal().sum() / total).item() if total > 0 else math.nan
        iou = self.iou_per_class()
        present = ~torch.isnan(iou)
        miou = iou[present].mean().item() if present.any() else math.nan
        rows = cm.sum(1).cpu()
        acc_present = rows > 0
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            acc_present[self.ignore_index] = False
        acc = cm.diagonal().cpu()[acc_present] / rows[acc_present]
        mean_acc = acc.mean().item() if acc.numel() else math.nan
        return {"pixel_acc": float(pixel_acc), "miou": float(miou), "mean_acc": float(mean_acc)}

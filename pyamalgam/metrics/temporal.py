"""Temporal consistency (TC) of video segmentation: agreement of flow-warped neighbouring predictions."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .._checks import check_int
from .._flow import warp
from .segmentation import SegmentationMetric, _check_mask, _check_tensor

__all__ = ["TemporalConsistency"]


class TemporalConsistency:
    """Temporal consistency (thesis 003, ch. 5, "Evaluation metrics", following its ref. [63],
    Lai et al., ECCV 2018): the mIoU between the prediction at frame t and the prediction at frame
    t+k warped back to frame t with the optical flow, accumulated over pairs of frames.

    Lai et al. measure the *flow warping error* ``E = 1/M sum_i M_i ||V_t^i - warp(V_{t+k})^i||^2``
    over non-occluded pixels ``M``; the thesis replaces the squared error by the mIoU score
    ("we use the mIoU score instead of the mean square error"), so a higher TC is better. The
    thesis does not say how the IoU is pooled; we pool it like :class:`SegmentationMetric` (one
    confusion matrix over every pair and pixel seen, rows = the prediction at t, columns = the
    warped prediction at t+k), which is what the thesis authors' evaluation script does, too.

    Choices where the thesis is silent (documented in ``docs/metrics.md``):

    * labels are compared, not probabilities: logits are reduced with argmax *before* warping and
      the labels are warped with ``mode="nearest"`` (no blending of class ids);
    * only pixels whose flow lands inside frame t+k (:func:`pyamalgam._flow.warp`'s ``in_bounds``)
      and, if given, where ``mask`` is True (e.g. the exact ``flow_valid`` of
      :class:`~pyamalgam.data.SyntheticClips`, or an occlusion mask from a forward-backward
      check) are counted. Lai et al. use a non-occlusion mask; the authors' script uses none;
    * the mIoU averages the classes that occur (in either prediction) at least once, like
      :class:`SegmentationMetric`.

    Args:
        num_classes: number of classes ``K``.

    :meth:`update` takes ``pred_t`` and ``pred_tk``, each logits ``(B, K, H, W)`` (floating) or
    labels ``(B, H, W)`` (integer), ``flow`` ``(B, 2, H, W)`` from frame t to frame t+k (the
    convention of :mod:`pyamalgam._flow`: pixels, x then y), and an optional bool ``mask``
    ``(B, H, W)``. A whole clip's predictions ``p`` (T, ...) with its flows ``f`` (T-1, 2, H, W)
    are one call: ``update(p[:-1], p[1:], f, mask)``. With real video, ``flow`` comes from any
    flow estimator (e.g. ``flow = net(frame_t, frame_tk)``).

    :meth:`compute` returns ``{"tc": mIoU, "agreement": fraction of counted pixels whose labels
    agree, "pixels": number of counted pixels}`` (``nan`` when no pixel has been counted);
    calling it before any :meth:`update` raises ``RuntimeError``.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self._seg = SegmentationMetric(self.num_classes, ignore_index=None)

    def __repr__(self) -> str:
        return f"TemporalConsistency(num_classes={self.num_classes})"

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._seg.reset()

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """int64 ``(K, K)``: rows = label at t, columns = warped label from t+k (a copy)."""
        return self._seg.confusion_matrix

    @torch.no_grad()
    def update(self, pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> None:
        """Accumulate one batch of frame pairs (see the class docstring for shapes)."""
        labels_t = self._labels("pred_t", pred_t)
        labels_tk = self._labels("pred_tk", pred_tk)
        if labels_t.shape != labels_tk.shape:
            raise ValueError(f"pred_t and pred_tk must have the same shape, got labels {tuple(labels_t.shape)} "
                             f"and {tuple(labels_tk.shape)}")
        _check_tensor("flow", flow, floating=True)
        if flow.dim() != 4 or flow.shape[1] != 2 or (flow.shape[0],) + tuple(flow.shape[2:]) != labels_t.shape:
            b, h, w = labels_t.shape
            raise ValueError(f"flow must be (B, 2, H, W) = {(b, 2, h, w)} for predictions of {(b, h, w)}, "
                             f"got {tuple(flow.shape)}")
        mask = _check_mask(mask, labels_t.shape, "pred_t's labels")
        warped, inside = warp(labels_tk, flow.to(labels_tk.device), mode="nearest")
        if mask is not None:
            inside &= mask.to(inside.device)
        self._seg.update(warped, labels_t.to(warped.device), inside)

    def _labels(self, name: str, pred) -> torch.Tensor:
        _check_tensor(name, pred)
        if pred.is_floating_point():
            if pred.dim() != 4 or pred.shape[1] != self.num_classes:
                raise ValueError(f"{name} is floating point, so it must be logits (B, num_classes={self.num_classes}, "
                                 f"H, W), got {tuple(pred.shape)}; integer {name} is read as labels (B, H, W)")
            return pred.argmax(dim=1)
        if pred.dtype == torch.bool or pred.is_complex():
            raise TypeError(f"{name} must be floating logits or integer labels, got {pred.dtype}")
        if pred.dim() != 3:
            raise ValueError(f"{name} labels must be (B, H, W), got {tuple(pred.shape)}")
        bad = (pred < 0) | (pred >= self.num_classes)
        if bad.any():
            raise ValueError(f"{name} holds label {int(pred[bad][0])} outside 0..{self.num_classes - 1}")
        return pred

    def compute(self) -> Dict[str, float]:
        """``{"tc", "agreement", "pixels"}`` over everything seen since the last reset."""
        try:
            r = self._seg.compute()
        except RuntimeError:
            raise RuntimeError("TemporalConsistency.compute() called before any update()") from None
        return {"tc": r["miou"], "agreement": r["pixel_acc"], "pixels": float(self._seg.confusion_matrix.sum())}

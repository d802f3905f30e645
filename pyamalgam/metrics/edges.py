"""Streaming edge-map metrics: the mean absolute error of seed 002's Table 1 ("Edge Abs."), and
pixel-exact precision / recall / F1 at a threshold."""
from __future__ import annotations

import math

import torch

from .segmentation import _check_mask, _check_tensor

__all__ = ["EdgeMetric"]

_KEYS = ("abs", "mse", "precision", "recall", "f1")


def _map_batch(name: str, pred, target, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluated pixels of a (B, H, W) or (B, 1, H, W) map pair, as float64 vectors (pred, target).

    A pixel is evaluated where ``mask`` (if given) is True and ``target`` is finite; a non-finite
    prediction at an evaluated pixel is an error (the metric would silently turn into nan)."""
    _check_tensor("pred", pred, floating=True)
    _check_tensor("target", target, floating=True)
    pred, target = (t.squeeze(1) if t.dim() == 4 and t.shape[1] == 1 else t for t in (pred, target))
    if target.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"{name}: pred and target must both be (B, H, W) or (B, 1, H, W) maps of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    mask = _check_mask(mask, target.shape)
    valid = torch.isfinite(target)
    if mask is not None:
        valid &= mask.to(valid.device)
    p, t = pred.double()[valid], target.double()[valid]
    if not torch.isfinite(p).all():
        raise ValueError(f"pred holds {int((~torch.isfinite(p)).sum())} non-finite value(s) at evaluated pixels")
    return p, t


class _MapErrors:
    """What the edge and key-point metrics share: float64 sums of |p - t| and (p - t)^2 over the
    evaluated pixels, and int64 counts whose first is the number of those pixels."""

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums: torch.Tensor | None = None  # float64: sum |d|, sum d^2
        self._counts: torch.Tensor | None = None  # int64: pixels, then the metric's own counts

    @property
    def num_pixels(self) -> int:
        """Number of pixels evaluated so far."""
        return 0 if self._counts is None else int(self._counts[0])

    def _add(self, p: torch.Tensor, t: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch: its evaluated pixels ``p``, ``t`` (:func:`_map_batch`) and its ``counts``."""
        d = p - t
        sums = torch.stack([d.abs().sum(), (d * d).sum()])
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)


class EdgeMetric(_MapErrors):
    """Mean absolute / squared error of an edge map, and precision, recall, F1 of its pixels.

    Args:
        threshold: a pixel is a predicted edge where ``pred >= threshold``, a true edge where
            ``target >= threshold`` (default 0.5; the synthetic targets are 0 or 1).

    :meth:`update` takes ``pred`` (probabilities, e.g. :class:`~pyamalgam.models.EdgeHead`'s) and
    ``target`` of shape (B, H, W) or (B, 1, H, W) and an optional bool ``mask``. Pixel-pooled over
    the data set (float64 sums, int64 counts): batches do not change the result.

    :meth:`compute` returns ``abs`` = mean |p - t| (the seed's "Edge Abs." column), ``mse`` =
    mean (p - t)^2, and ``precision``, ``recall``, ``f1`` of the thresholded maps, pixel for pixel
    (no distance tolerance, unlike the BSDS benchmark's matching; 0 when undefined, e.g. recall
    with no true edge, F1 = 2PR / (P + R)); all ``nan`` when no pixel was evaluated.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.reset()

    def __repr__(self) -> str:
        return f"EdgeMetric(threshold={self.threshold})"

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch (see the class docstring)."""
        p, t = _map_batch("EdgeMetric", pred, target, mask)
        pe, te = p >= self.threshold, t >= self.threshold
        # counts: pixels, true positives, predicted, true
        self._add(p, t, torch.stack([torch.tensor(p.numel(), device=p.device), (pe & te).sum(), pe.sum(), te.sum()]))

    def compute(self) -> dict[str, float]:
        """Pixel-pooled metrics over everything seen since the last reset."""
        if self._sums is None:
            raise RuntimeError("EdgeMetric.compute() called before any update()")
        n, tp, predicted, true = self._counts.tolist()
        if n == 0:
            return {k: math.nan for k in _KEYS}
        s = (self._sums / n).tolist()
        precision = tp / predicted if predicted else 0.0
        recall = tp / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"abs": s[0], "mse": s[1], "precision": precision, "recall": recall, "f1": f1}

"""Streaming key-point heat-map metrics: the mean absolute error of seed 002's Table 1 ("Key
Abs."), the mean squared error, and a detection-style count (peaks matched within a radius)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .edges import _map_batch, _MapErrors
from .segmentation import _check_mask

__all__ = ["KeypointMetric", "heatmap_peaks"]

_KEYS = ("abs", "mse", "precision", "recall")


def heatmap_peaks(heat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Peaks of (B, H, W) heat-maps: pixels >= ``threshold`` that are the maximum of their 3x3
    neighbourhood (ties: every tied pixel is a peak). Returns a bool (B, H, W) tensor."""
    pooled = F.max_pool2d(heat[:, None].double(), 3, stride=1, padding=1)[:, 0]
    return (heat.double() >= threshold) & (heat.double() >= pooled)


class KeypointMetric(_MapErrors):
    """Mean absolute / squared error of key-point heat-maps, and peak precision / recall.

    Args:
        peak_threshold: a peak must reach this value (default 0.5) in the prediction and in the
            target to count as a detected / a true key-point.
        radius: a predicted peak is correct when a true peak lies within this many pixels
            (Chebyshev distance, default 2), and a true peak is found when a predicted one does.

    :meth:`update` takes ``pred`` and ``target`` (B, H, W) or (B, 1, H, W) and an optional bool
    ``mask`` (pixels outside it are left out of the errors and of the peaks). Pixel-pooled and
    peak-pooled over the data set.

    :meth:`compute` returns ``abs`` = mean |p - t| (the seed's "Key Abs." column), ``mse``, and
    ``precision`` (fraction of predicted peaks near a true one) and ``recall`` (fraction of true
    peaks near a predicted one), 0 when there is no peak to count; ``nan`` when nothing was
    evaluated. The peaks of a target made of Gaussians (the synthetic ``"keypoints"``) are its
    key-points, except that two key-points closer than about 2 sigma merge into one peak.
    """

    def __init__(self, peak_threshold: float = 0.5, radius: int = 2) -> None:
        if isinstance(peak_threshold, bool) or not isinstance(peak_threshold, (int, float)) \
                or not 0 < peak_threshold < math.inf:
            raise ValueError(f"peak_threshold must be a finite number > 0, got {peak_threshold!r}")
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
            raise ValueError(f"radius must be an int >= 0 (pixels), got {radius!r}")
        self.peak_threshold = float(peak_threshold)
        self.radius = radius
        self.reset()

    def __repr__(self) -> str:
        return f"KeypointMetric(peak_threshold={self.peak_threshold}, radius={self.radius})"

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch (see the class docstring)."""
        p, t = _map_batch("KeypointMetric", pred, target, mask)
        # counts: pixels, predicted peaks, correct, true peaks, found
        self._add(p, t, torch.cat([torch.tensor([p.numel()], device=p.device), self._peak_counts(pred, target, mask)]))

    def _peak_counts(self, pred, target, mask) -> torch.Tensor:
        pred, target = (x.squeeze(1) if x.dim() == 4 and x.shape[1] == 1 else x for x in (pred, target))
        mask = _check_mask(mask, target.shape)
        valid = torch.isfinite(target) if mask is None else torch.isfinite(target) & mask.to(target.device)
        zero = torch.zeros((), dtype=torch.float64, device=target.device)
        pp = heatmap_peaks(torch.where(valid, pred.double(), zero), self.peak_threshold) & valid
        tp = heatmap_peaks(torch.where(valid, target.double(), zero), self.peak_threshold) & valid
        k = 2 * self.radius + 1
        near = lambda peaks: F.max_pool2d(peaks[:, None].double(), k, stride=1, padding=self.radius)[:, 0] > 0
        return torch.stack([pp.sum(), (pp & near(tp)).sum(), tp.sum(), (tp & near(pp)).sum()])

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last reset."""
        if self._sums is None:
            raise RuntimeError("KeypointMetric.compute() called before any update()")
        n, predicted, correct, true, found = self._counts.tolist()
        if n == 0:
            return {k: math.nan for k in _KEYS}
        s = (self._sums / n).tolist()
        return {"abs": s[0], "mse": s[1], "precision": correct / predicted if predicted else 0.0,
                "recall": found / true if true else 0.0}

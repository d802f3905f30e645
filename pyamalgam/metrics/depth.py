"""Streaming monocular-depth metrics (Eigen et al., 2014), pixel-pooled over a data set."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .._checks import as_real
from .segmentation import _check_mask, _check_tensor

__all__ = ["DepthMetric"]

_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "mae", "delta1", "delta2", "delta3")


def _squeeze_channel(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(1) if t.dim() == 4 and t.shape[1] == 1 else t


class DepthMetric:
    """abs rel, sq rel, RMSE, RMSE log, log10, MAE and δ < 1.25^k, accumulated over batches.

    Args:
        min_depth: predictions are clamped to at least this (metres) so ratios and logs are
            defined (default 1e-3, as in the usual Eigen-split evaluation).
        max_depth: if given, targets beyond it are not evaluated and predictions are clamped to
            it (e.g. 10 for NYUv2, 80 for outdoor data); ``None`` evaluates every valid target.

    :meth:`update` takes ``pred`` and ``target`` of shape ``(B, H, W)`` or ``(B, 1, H, W)``
    (metres) and an optional bool ``mask`` of the same spatial shape. A pixel is evaluated where
    ``mask`` is True (if given) **and** ``target`` is finite and > 0 (and <= ``max_depth``).
    Non-finite predictions at evaluated pixels raise ``ValueError``.

    Convention: metrics are **pixel-pooled** over the whole data set: every evaluated pixel of
    every image counts equally (``abs_rel = sum |p - t| / t / N`` over all N evaluated pixels
    seen), not an average of per-image values. The state is a handful of float64 sums, so
    streaming over batches equals the whole-data-set computation up to float64 rounding.

    :meth:`compute` returns (``nan`` when no pixel has been evaluated):

    * ``abs_rel`` = mean(|p - t| / t); ``sq_rel`` = mean((p - t)^2 / t);
    * ``rmse`` = sqrt(mean((p - t)^2)); ``rmse_log`` = sqrt(mean((ln p - ln t)^2));
    * ``log10`` = mean(|log10 p - log10 t|); ``mae`` = mean(|p - t|);
    * ``delta1..3`` = fraction (in [0, 1]) of pixels with max(p / t, t / p) < 1.25, 1.25^2, 1.25^3.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: Optional[float] = None) -> None:
        for name, v in (("min_depth", min_depth), ("max_depth", max_depth)):
            if v is None and name == "max_depth":
                continue
            if as_real(v) is None or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0 (metres), got {v!r}")
        if max_depth is not None and max_depth <= min_depth:
            raise ValueError(f"max_depth ({max_depth}) must be > min_depth ({min_depth})")
        self.min_depth = float(min_depth)
        self.max_depth = None if max_depth is None else float(max_depth)
        self.reset()

    def __repr__(self) -> str:
        return f"DepthMetric(min_depth={self.min_depth}, max_depth={self.max_depth})"

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums: Optional[torch.Tensor] = None  # float64 (9,): see update()
        self._count = 0

    @property
    def num_pixels(self) -> int:
        """Number of pixels evaluated so far."""
        return self._count

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Accumulate one batch (see the class docstring)."""
        _check_tensor("pred", pred, floating=True)
        _check_tensor("target", target, floating=True)
        pred, target = _squeeze_channel("pred", pred), _squeeze_channel("target", target)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape ((B, H, W) or (B, 1, H, W)), "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        if pred.device != target.device:
            raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
        mask = _check_mask(mask, target.shape)
        t = target.double()
        valid = torch.isfinite(t) & (t > 0)
        if self.max_depth is not None:
            valid &= t <= self.max_depth
        if mask is not None:
            valid &= mask.to(valid.device)
        t = t[valid]
        p = pred.double()[valid]
        if not torch.isfinite(p).all():
            raise ValueError(f"pred holds {int((~torch.isfinite(p)).sum())} non-finite value(s) at evaluated pixels")
        p = p.clamp(min=self.min_depth, max=self.max_depth)
        diff = p - t
        log_diff = torch.log(p) - torch.log(t)
        ratio = torch.maximum(p / t, t / p)
        sums = torch.stack([
            (diff.abs() / t).sum(),
            (diff * diff / t).sum(),
            (diff * diff).sum(),
            (log_diff * log_diff).sum(),
            (log_diff.abs() / math.log(10.0)).sum(),
            diff.abs().sum(),
            (ratio < 1.25).sum().double(),
            (ratio < 1.25 ** 2).sum().double(),
            (ratio < 1.25 ** 3).sum().double(),
        ])
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)
        self._count += int(t.numel())

    def compute(self) -> Dict[str, float]:
        """Pixel-pooled metrics over everything seen since the last reset."""
        if self._sums is None:
            raise RuntimeError("DepthMetric.compute() called before any update()")
        n = self._count
        if n == 0:
            return {k: math.nan for k in _KEYS}
        s = (self._sums / n).tolist()
        return {
            "abs_rel": s[0], "sq_rel": s[1], "rmse": math.sqrt(s[2]), "rmse_log": math.sqrt(s[3]),
            "log10": s[4], "mae": s[5], "delta1": s[6], "delta2": s[7], "delta3": s[8],
        }

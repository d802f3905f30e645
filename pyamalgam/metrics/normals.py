"""Streaming surface-normal metrics: angular error statistics (Eigen & Fergus, 2015) and the
mean cosine similarity of seed 002."""
from __future__ import annotations

import math

import torch

from .._checks import check_int
from .segmentation import _check_mask, _check_tensor

__all__ = ["NormalCosineMetric", "NormalMetric", "angular_error"]

THRESHOLDS = (11.25, 22.5, 30.0)
_KEYS = ("mean", "median", "rmse", "within_11_25", "within_22_5", "within_30")


def angular_error(pred: torch.Tensor, target: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Angle in degrees (float64) between ``pred`` and ``target`` along ``dim``.

    Computed as ``atan2(|p x t|, p . t)``, accurate for small angles too; neither input needs
    unit length. A zero vector (in either input) gives 90 degrees.
    """
    p, t = pred.double(), target.double()
    cross = torch.linalg.cross(p, t, dim=dim)
    sin = torch.linalg.vector_norm(cross, dim=dim)
    cos = (p * t).sum(dim)
    ang = torch.rad2deg(torch.atan2(sin, cos))
    degenerate = (p == 0).all(dim) | (t == 0).all(dim)  # atan2(0, 0) = 0 would reward it
    return ang.masked_fill(degenerate, 90.0)


class NormalMetric:
    """Mean / median / RMS angular error and the fraction of pixels within 11.25°, 22.5°, 30°.

    Args:
        median_bins: ``None`` (default) computes the median **exactly**: every evaluated pixel's
            angle is kept (float32, on the CPU: 4 bytes per pixel, e.g. ~290 MB for the 654
            NYUv2 test images at 288x384). An int ``B`` keeps a histogram of ``B`` equal bins over
            [0°, 180°] instead (8·B bytes); the median is then the centre of the bin(s) holding
            the middle rank(s), within ``90 / B`` degrees of the exact median (e.g. 0.0005° for
            the suggested ``B = 180_000``).

    :meth:`update` takes ``pred`` and ``target`` ``(B, 3, H, W)`` (any length; both are
    normalised) and an optional bool ``mask`` ``(B, H, W)``. A pixel is evaluated where ``mask``
    is True (if given) **and** ``target`` is finite and non-zero (zeros mark invalid normals in
    :mod:`pyamalgam.data`). Non-finite predictions at evaluated pixels raise ``ValueError``.

    Statistics are pixel-pooled over the whole data set. The median is the usual one (mean of
    the two middle values for an even count), so exact mode gives bit-identical results however
    the data are split into batches, equal to the median of all angles at once; ``mean`` and
    ``rmse`` come from float64 sums. :meth:`compute` returns ``mean``, ``median``, ``rmse`` in
    degrees and ``within_11_25``, ``within_22_5``, ``within_30`` as fractions in [0, 1] (strictly
    less than the threshold); ``nan`` when no pixel has been evaluated.
    """

    def __init__(self, median_bins: int | None = None) -> None:
        self.median_bins = None if median_bins is None else check_int("median_bins", median_bins, minimum=1)
        self.reset()

    def __repr__(self) -> str:
        return f"NormalMetric(median_bins={self.median_bins})"

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums: torch.Tensor | None = None  # float64: sum angle, sum angle^2, 3 threshold counts
        self._count = 0
        self._angles: list[torch.Tensor] = []
        self._hist: torch.Tensor | None = None

    @property
    def num_pixels(self) -> int:
        """Number of pixels evaluated so far."""
        return self._count

    @property
    def median_error_bound(self) -> float:
        """Largest possible |reported median - exact median| in degrees (0 in exact mode, apart
        from the float32 storage of angles: < 1e-5 degrees)."""
        return 0.0 if self.median_bins is None else 90.0 / self.median_bins

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch (see the class docstring)."""
        p, t = _normal_pixels(pred, target, mask)  # (N, 3), in the inputs' dtype
        ang = angular_error(p, t, dim=1)
        sums = torch.stack([ang.sum(), (ang * ang).sum()] + [(ang < th).sum().double() for th in THRESHOLDS])
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)
        self._count += int(ang.numel())
        if self.median_bins is None:
            self._angles.append(ang.float().cpu())
        else:
            b = self.median_bins
            idx = (ang * (b / 180.0)).floor().long().clamp_(0, b - 1)
            hist = torch.bincount(idx, minlength=b)
            self._hist = hist if self._hist is None else self._hist + hist.to(self._hist.device)

    def _median(self) -> float:
        n = self._count
        lo_rank, hi_rank = (n - 1) // 2, n // 2  # 0-based middle ranks
        if self.median_bins is None:
            if len(self._angles) > 1:  # consolidate so repeated compute() calls stay cheap
                self._angles = [torch.cat(self._angles)]
            flat = self._angles[0]
            lo = flat.kthvalue(lo_rank + 1).values.item()
            hi = lo if hi_rank == lo_rank else flat.kthvalue(hi_rank + 1).values.item()
            return (lo + hi) / 2.0
        cum = self._hist.cumsum(0)
        ranks = torch.tensor([lo_rank, hi_rank], device=cum.device)
        bins = torch.searchsorted(cum, ranks, right=True).double()  # first bin with cum > rank
        centres = (bins + 0.5) * (180.0 / self.median_bins)
        return centres.mean().item()

    def compute(self) -> dict[str, float]:
        """Angular statistics over everything seen since the last reset."""
        if self._sums is None:
            raise RuntimeError("NormalMetric.compute() called before any update()")
        n = self._count
        if n == 0:
            return {k: math.nan for k in _KEYS}
        s = (self._sums / n).tolist()
        return {"mean": s[0], "median": self._median(), "rmse": math.sqrt(s[1]),
                "within_11_25": s[2], "within_22_5": s[3], "within_30": s[4]}


class NormalCosineMetric:
    """Mean cosine similarity between predicted and true normals (seed 002's "SN CS" column).

    ``cosine = (1/N) sum_i p_i . t_i / (|p_i| |t_i|)`` over the N evaluated pixels, pixel-pooled
    over the data set (a float64 sum). Evaluated pixels, shapes and errors as in
    :class:`NormalMetric`: ``pred`` and ``target`` (B, 3, H, W) of any length, an optional bool
    ``mask`` (B, H, W); a pixel counts where ``mask`` is True and ``target`` is finite and
    non-zero; a zero prediction there scores 0 (no direction). :meth:`compute` returns
    ``{"cosine": ...}`` in [-1, 1], ``nan`` when no pixel has been evaluated. The seed does not
    say how it averages (per image or per pixel); this is per pixel, like the other metrics here.
    """

    def __init__(self) -> None:
        self.reset()

    def __repr__(self) -> str:
        return "NormalCosineMetric()"

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sum: torch.Tensor | None = None
        self._count = 0

    @property
    def num_pixels(self) -> int:
        """Number of pixels evaluated so far."""
        return self._count

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch (see the class docstring)."""
        p, t = (v.double() for v in _normal_pixels(pred, target, mask))
        pn, tn = torch.linalg.vector_norm(p, dim=1), torch.linalg.vector_norm(t, dim=1)
        cos = (p * t).sum(1) / (pn * tn).clamp_min(torch.finfo(torch.float64).tiny)
        total = cos.sum()
        self._sum = total if self._sum is None else self._sum + total.to(self._sum.device)
        self._count += int(cos.numel())

    def compute(self) -> dict[str, float]:
        """The pixel-pooled mean cosine since the last reset."""
        if self._sum is None:
            raise RuntimeError("NormalCosineMetric.compute() called before any update()")
        return {"cosine": math.nan if self._count == 0 else float(self._sum) / self._count}


def _normal_pixels(pred, target, mask):
    """The evaluated pixels of the normal metrics' inputs, checked: (N, 3) pairs (pred, target)
    in their dtype; a pixel counts where its target is finite and non-zero and ``mask`` holds."""
    _check_tensor("pred", pred, floating=True)
    _check_tensor("target", target, floating=True)
    if target.dim() < 2 or target.shape[1] != 3:
        raise ValueError(f"target must have shape (B, 3, H, W) (3 vector components at dim 1), "
                         f"got {tuple(target.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred must have the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    mask = _check_mask(mask, target.shape[:1] + target.shape[2:], target_name="target without its channel dim")
    valid = torch.isfinite(target).all(1) & (target != 0).any(1)
    if mask is not None:
        valid &= mask.to(valid.device)
    p = pred.movedim(1, -1)[valid]
    t = target.movedim(1, -1)[valid]
    if not torch.isfinite(p).all():
        raise ValueError(f"pred holds non-finite values at {int((~torch.isfinite(p).all(1)).sum())} "
                         f"evaluated pixel(s)")
    return p, t

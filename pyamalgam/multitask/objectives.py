"""The self-distillation terms of SD-MTCNN (seed 002) and its SD-Vanilla baseline, as we read them.

Seed 002 is the supplementary only: it names the variants (★ "by Eq. 5", ★★ "by Eq. 6", "full")
and shows their rows, but the equations are in the main paper, which is not in the seeds. What is
known (issue 14): the decoders' more abstract features are distilled back into the shared
*encoder* space through small adaptors, with no external teacher; T rows are the decoders' end,
S rows a shallow path fed from the encoder side. Our formulas (docs/multitask.md says why):

* the feature term ``sd_feature_loss(a, b) = mean_pixels || a/|a| - b/|b| ||^2`` (channel-wise
  unit vectors, so a feature's scale cannot shrink the loss; ``= 2 - 2 cos`` per pixel);
* **SD-MTCNN (★)**, the *encoder space*: ``L_5 = mean_{t in S} sd(E, A_t(P(sg D_t)))``, E the
  shared encoder's last-block features, D_t task t's last decoder features, P an average pool to
  E's resolution, A_t a 1x1 adaptor (decoder -> encoder channels), sg a stop-gradient: E (the
  student) moves towards what the decoder computed, A_t learns the map between the spaces;
* **SD-Vanilla (★)** (Baseline-2), the *decoder space* (self-distillation as in Zhang et al.,
  2019, "Be Your Own Teacher"): ``mean_t sd(B_t(E), P(sg D_t))``, B_t the S path's adaptor
  (encoder -> decoder channels): the shallow path imitates the deep one;
* **(★★)** adds the prediction level (our "Eq. 6"): ``+ mean_{t in S} kd_t(S_t, sg T_t)``, the
  S path's prediction against the T path's (pixel-wise KL on class / depth-bin logits, 1 - cos
  on normals, L1 on edges and key-points);
* **full**: the sources S are every task; without it, the first task only (the primary task).

Every variant also trains the S paths on the labels (``shallow_weight``). Each term is 0 where
the two paths agree (the tests check it and the gradients against a float64 reference).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["SelfDistillation", "sd_feature_loss", "pool_to", "SPACES", "VARIANTS"]

SPACES = ("encoder", "decoder")   # SD-MTCNN, SD-Vanilla
VARIANTS = ("star", "star2")      # (★) Eq. 5, (★★) Eq. 6, as read in the module docstring


def sd_feature_loss(student: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``mean_{b,h,w} || s/|s| - t/|t| ||_2^2`` over the channel vectors of two (B, C, H, W) maps.

    A pixel whose channel vector is zero counts as the zero vector (no NaN, no gradient
    blow-up: ``F.normalize`` clamps the norm at ``eps``). Pass a detached ``target`` for a
    stop-gradient.
    """
    for name, t in (("student", student), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, C, H, W) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if student.shape != target.shape:
        raise ValueError(f"student and target must have the same shape, got {tuple(student.shape)} and "
                         f"{tuple(target.shape)} (adapt the channels and pool to one resolution first)")
    acc = torch.promote_types(student.dtype, torch.float32)
    s = F.normalize(student.to(acc), dim=1, eps=eps)
    t = F.normalize(target.to(acc), dim=1, eps=eps)
    return (s - t).pow(2).sum(dim=1).mean()


def pool_to(features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Average-pool ``features`` to the spatial size of ``like`` (an integer factor)."""
    fh, fw = features.shape[-2:]
    h, w = like.shape[-2:]
    if fh % h or fw % w or fh // h != fw // w:
        raise ValueError(f"cannot pool {fh}x{fw} features to {h}x{w} by one integer factor")
    k = fh // h
    return features if k == 1 else F.avg_pool2d(features, k, k)


@dataclasses.dataclass(frozen=True)
class SelfDistillation:
    """One self-distillation setting (module docstring): where the feature term lives
    (``space``: "encoder" = SD-MTCNN, "decoder" = SD-Vanilla), ``variant`` ("star" = ★, "star2"
    = ★★), ``full`` (every task distils, else the first one), and the terms' weights."""

    space: str = "encoder"
    variant: str = "star"
    full: bool = False
    feature_weight: float = 1.0
    output_weight: float = 1.0
    shallow_weight: float = 1.0

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"SelfDistillation.space must be one of {SPACES}, got {self.space!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"SelfDistillation.variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("feature_weight", "output_weight", "shallow_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"SelfDistillation.{name} must be a finite number >= 0, got {v!r}")

    def sources(self, tasks) -> list:
        tasks = list(tasks)
        return tasks if self.full else tasks[:1]

    def label(self) -> str:
        star = "★" if self.variant == "star" else "★★"
        return f"({star}){' full' if self.full else ''}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

"""Temporal losses for video (thesis 003, ch. 5, §5.3): the motion-guided temporal loss (TL,
Eq. 5.1) and the temporal-consistency distillation terms, pair-wise frames (PF, Eq. 5.2) and
multi-frame dependency (MF, §5.3.2).

Flow follows the package convention (:mod:`pyamalgam._flow`): (B, 2, H, W) from frame t to frame
t+k in pixels, x then y; ``warp(x_{t+k}, flow)`` is frame t+k seen from frame t. Where the thesis
is vague, the docstrings say what we chose (and docs/distillation.md, "Temporal terms").
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_float, check_int, check_map, frame_list
from .._flow import warp
from ..nn.convlstm import ConvLSTM

__all__ = [
    "MultiFrameLoss",
    "PairWiseFramesLoss",
    "TemporalLoss",
    "occlusion_weight",
    "pair_wise_frames_loss",
    "self_affinity",
    "temporal_loss",
]


def _like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, channels: bool = True) -> None:
    check_map(name, t)
    if (t.shape if channels else (t.shape[0], *t.shape[2:])) != (ref.shape if channels else (ref.shape[0], *ref.shape[2:])):
        what = "shape" if channels else "batch and spatial sizes"
        raise ValueError(f"{name} must have the {what} of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def occlusion_weight(image_t: torch.Tensor, image_k: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``V = exp(-|I_t - I^_{t+k}|)`` (thesis §5.3.1, under Eq. 5.1), (B, H, W), no gradient.

    ``I^_{t+k}`` is frame t+k warped to frame t with ``flow``. The thesis prints ``|.|`` of a
    colour difference without saying over what; we take the Euclidean norm over the channels (the
    absolute value for one channel), with no scale (its reference [63] uses
    ``exp(-50 ||.||^2)``; the thesis prints neither the 50 nor the square). Pixels whose flow
    leaves frame t+k get 0: they have no correspondence (the thesis does not say).
    """
    check_map("image_t", image_t)
    _like("image_k", image_k, "image_t", image_t)
    with torch.no_grad():
        warped, inside = warp(image_k, flow.to(image_k.dtype))
        v = torch.exp(-(image_t - warped).norm(dim=1))
        return torch.where(inside, v, torch.zeros_like(v))


def temporal_loss(q_t: torch.Tensor, q_k: torch.Tensor, flow: torch.Tensor, *,
                  images: tuple[torch.Tensor, torch.Tensor] | None = None,
                  visible: torch.Tensor | None = None) -> torch.Tensor:
    """Motion-guided temporal loss, thesis Eq. 5.1: ``1/N sum_i V_i ||q_t^i - q^_{t+k->t}^i||_2^2``.

    ``q^_{t+k->t}`` is ``q_k`` backward-warped with ``flow`` (bilinear, ``grid_sample``). The sum
    runs over the N = H W pixels of an image and the result is averaged over the batch (1/N as
    printed: pixels with weight 0 still count in N). Gradients reach both ``q_t`` and the warped
    ``q_k`` (both are the trained network's predictions; the thesis does not say to stop one).

    The weight V:
      * ``images=(I_t, I_{t+k})``: the thesis' ``exp(-|I_t - I^_{t+k}|)`` (:func:`occlusion_weight`);
      * ``visible``: an exact mask (B, H, W), bool or float in [0, 1], 1 where the pixel of frame t
        is visible in frame t+k (synthetic data has one); used as given;
      * neither: V = 1.
    In every case V is 0 where the flow leaves frame t+k (no correspondence; our choice).

    Args:
        q_t, q_k: class probabilities (B, K, H, W) of frames t and t+k (the thesis' q; softmax
            the logits first, :class:`TemporalLoss` does).
        flow: (B, 2, H, W) from frame t to frame t+k, in pixels (:mod:`pyamalgam._flow`).
    """
    check_map("q_t", q_t)
    _like("q_k", q_k, "q_t", q_t)
    if images is not None and visible is not None:
        raise ValueError("give images or visible, not both")
    warped, inside = warp(q_k, flow.to(q_k.dtype))
    weight = inside.to(q_t.dtype)
    if images is not None:
        if not isinstance(images, (tuple, list)) or len(images) != 2:
            raise TypeError("images must be a pair (I_t, I_{t+k})")
        _like("images[0]", images[0], "q_t", q_t, channels=False)
        weight = weight * occlusion_weight(images[0], images[1], flow).to(q_t.dtype)
    elif visible is not None:
        if not isinstance(visible, torch.Tensor) or tuple(visible.shape) != (q_t.shape[0], *q_t.shape[2:]):
            got = tuple(visible.shape) if isinstance(visible, torch.Tensor) else type(visible).__name__
            raise ValueError(f"visible must be (B, H, W) = {(q_t.shape[0], *q_t.shape[2:])}, got {got}")
        weight = weight * visible.to(device=q_t.device, dtype=q_t.dtype)
    per_pixel = (q_t - warped).square().sum(dim=1)
    # A zero weight must drop the pixel even where the warped value is not finite.
    per_pixel = torch.where(weight > 0, weight * per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.mean(dim=(1, 2)).mean() if per_pixel.numel() else per_pixel.sum()


def pair_wise_frames_loss(qs_t: torch.Tensor, qs_k: torch.Tensor, qt_t: torch.Tensor, qt_k: torch.Tensor,
                          patch: int = 1) -> torch.Tensor:
    """Pair-wise-frames distillation, thesis Eq. 5.2: ``1/N^2 sum_ij (a^S_ij - a^T_ij)^2`` with
    ``a_ij = cos(q_t^i, q_{t+k}^j)``; student maps first (s), then the teacher's (t).

    The fused operator :func:`pyamalgam.ops.pairwise_frames_loss` (exact, O(N C^2), no N x N
    matrix). The thesis uses the segmentation maps (class probabilities) at full resolution
    (``patch=1``); ``patch > 1`` averages ``patch x patch`` cells into one node first (our option,
    as for Eq. 3.2).
    """
    return ops.pairwise_frames_loss(qs_t, qs_k, qt_t, qt_k, check_int("patch", patch, minimum=1))


def self_affinity(f: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """The AT operator of a frame with itself, ``A_{F,F}`` (thesis §5.3.2), as a (B, 1, N, N) map.

    Nodes are ``patch x patch`` average pools (ragged border cells average what they have),
    L2-normalised (a zero node stays zero), in row-major order. Materialises N x N per image: the
    ConvLSTM convolves over it, so keep N small (a few hundred nodes) with ``patch``.
    """
    check_map("f", f)
    patch = min(check_int("patch", patch, minimum=1), max(f.shape[2], f.shape[3], 1))
    if patch > 1:
        f = F.avg_pool2d(f, patch, patch, ceil_mode=True, count_include_pad=False)
    v = f.flatten(2).transpose(1, 2)
    norm = v.norm(dim=-1, keepdim=True)
    v = torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(v))
    return (v @ v.transpose(1, 2)).unsqueeze(1)


class TemporalLoss(nn.Module):
    """Eq. 5.1 on logits: softmax over the classes, then :func:`temporal_loss`."""

    def forward(self, logits_t, logits_k, flow, *, images=None, visible=None):
        check_map("logits_t", logits_t)
        check_map("logits_k", logits_k)
        return temporal_loss(logits_t.softmax(1), logits_k.softmax(1), flow, images=images, visible=visible)


class PairWiseFramesLoss(nn.Module):
    """Eq. 5.2 as a module: ``PairWiseFramesLoss(patch)(qs_t, qs_k, qt_t, qt_k)``; see
    :func:`pair_wise_frames_loss`. With ``softmax=True`` the four maps are logits and are turned
    into class probabilities first (the thesis' Q)."""

    def __init__(self, patch: int = 1, softmax: bool = False):
        super().__init__()
        self.patch = check_int("patch", patch, minimum=1)
        self.softmax = bool(softmax)

    def forward(self, qs_t, qs_k, qt_t, qt_k):
        maps = [qs_t, qs_k, qt_t, qt_k]
        if self.softmax:
            maps = [m.softmax(1) if isinstance(m, torch.Tensor) and m.dim() == 4 else m for m in maps]
        return pair_wise_frames_loss(*maps, patch=self.patch)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, softmax={self.softmax}"


def _frames(name: str, frames) -> list:
    frames = frame_list(name, frames)
    check_map(f"{name}[0]", frames[0])
    for t, f in enumerate(frames[1:], start=1):
        _like(f"{name}[{t}]", f, f"{name}[0]", frames[0])
    return frames


class MultiFrameLoss(nn.Module):
    """Multi-frame dependency (MF) distillation, thesis §5.3.2: ``||E^T - E^S||_2^2``.

    Each frame's features give their self-affinity map ``A_{F_t,F_t}`` (:func:`self_affinity`, which
    also makes student and teacher comparable whatever their channels); one ConvLSTM, shared by
    teacher and student (:class:`pyamalgam.nn.convlstm.ConvLSTM`), runs over the T maps of each, and ``E``
    is its embedding at the last step. Against the collapse point (all ConvLSTM weights 0, so
    E^T = E^S = 0), the thesis clips the weights and "enlarges E^T as a regularization"; we
    implement it as

        loss = mean_b ||E^T - E^S||^2 - enlarge * mean_b ||E^T||^2,

    minimised by the student *and* the ConvLSTM (put this module's parameters in the student's
    optimizer, and call :meth:`clip_` after each step). The thesis gives neither the clip range nor
    the weight of the enlarging term: ``clip=0.1`` and ``enlarge=0.1`` are our defaults; D_e
    (``hidden``) = 16, a 3x3 kernel. The teacher is fixed (§5.3.3): its features are detached,
    so the enlarging term trains the ConvLSTM only.

    Args:
        hidden: D_e. kernel_size: the ConvLSTM's kernel. patch: node cell side for the affinity
            maps (N x N per frame is materialised). clip: weight bound. enlarge: weight of -||E^T||^2.
    """

    def __init__(self, hidden: int = 16, kernel_size: int = 3, patch: int = 1, clip: float | None = 0.1,
                 enlarge: float = 0.1):
        super().__init__()
        self.patch = check_int("patch", patch, minimum=1)
        self.enlarge = check_float("enlarge", enlarge)
        if self.enlarge < 0:
            raise ValueError(f"enlarge must be >= 0, got {self.enlarge}")
        self.convlstm = ConvLSTM(1, hidden, kernel_size, clip)

    def clip_(self) -> MultiFrameLoss:
        self.convlstm.clip_()
        return self

    def embeddings(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]):
        """(E^S, E^T), each (B, D_e): the ConvLSTM's embedding at the last frame."""
        fs, ft = _frames("student", student), _frames("teacher", teacher)
        if len(fs) != len(ft):
            raise ValueError(f"student has {len(fs)} frames and teacher {len(ft)}: they must agree")
        _like("teacher[0]", ft[0], "student[0]", fs[0], channels=False)
        e_s = self.convlstm([self_affinity(f, self.patch) for f in fs])[:, -1]
        e_t = self.convlstm([self_affinity(f.detach(), self.patch) for f in ft])[:, -1]
        return e_s, e_t

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """``student``, ``teacher``: the T frames' features, a sequence of (B, C, H, W) or one
        (B, T, C, H, W) tensor each (channels may differ, B, T, H, W may not)."""
        e_s, e_t = self.embeddings(student, teacher)
        distance = (e_t - e_s).square().sum(dim=1).mean()
        return distance - self.enlarge * e_t.square().sum(dim=1).mean() if self.enlarge else distance

    def extra_repr(self) -> str:
        return f"patch={self.patch}, enlarge={self.enlarge}"

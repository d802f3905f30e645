"""Structured and channel-wise knowledge distillation for dense prediction (thesis 003, ch. 3-4).

Functions are the bare equations; the classes are small callables with the thesis' settings, in
the style of torchdistill. The hot paths are fused operators (:mod:`pyamalgam.ops`): the local
pair-wise loss and the channel-wise loss. What each loss means for regression outputs (depth,
normals) is in its docstring and in docs/distillation.md.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from .._checks import check_float, check_int, check_map

__all__ = [
    "ChannelWiseLoss",
    "ObjectiveTerms",
    "PairWiseLoss",
    "PixelWiseLoss",
    "StructuredObjective",
    "alpha_fusion",
    "beta_fusion",
    "channel_wise_loss",
    "pair_wise_loss",
    "pixel_wise_loss",
    "table_3_2_radii",
]

_ORDERS = ("thesis", "teacher")
_DEFAULT = object()  # "the thesis' term" for StructuredObjective's arguments


def _pair(s_name: str, s: torch.Tensor, t_name: str, t: torch.Tensor, channels: bool) -> None:
    sizes = (lambda x: tuple(x.shape)) if channels else (lambda x: (x.shape[0], *x.shape[2:]))
    if sizes(s) != sizes(t):
        what = "shape" if channels else "batch and spatial sizes"
        raise ValueError(f"{s_name} and {t_name} must have the same {what} (interpolate one first): "
                         f"{s_name} is {tuple(s.shape)}, {t_name} is {tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"{t_name} must be on the device of {s_name} ({s.device}), got {t.device}")


def _pixel_mask(mask, ref: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    b, _, h, w = ref.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = use the pixel), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(f"mask must have shape {(b, h, w)} or {(b, 1, h, w)} (B, H, W of the logits), "
                         f"got {tuple(mask.shape)}")
    if mask.device != ref.device:
        raise ValueError(f"mask must be on the device of the logits ({ref.device}), got {mask.device}")
    return mask


def pixel_wise_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None, *, order: str = "thesis") -> torch.Tensor:
    """Pixel-wise distillation, thesis Eq. 3.1: ``1/(W'H') sum_i KL(q^s_i || q^t_i)``.

    ``q_i = softmax(z_i / T)`` over the K classes of pixel i. ``order="thesis"`` (default) is the
    order Eq. 3.1 prints, student first: ``KL(q^s || q^t) = sum_k q^s_k log(q^s_k / q^t_k)``;
    ``order="teacher"`` is Hinton et al.'s soft-target order ``KL(q^t || q^s)``, which is what the
    public code minimises (as the cross-entropy with the teacher's soft targets, i.e. up to the
    teacher's entropy). The result is multiplied by ``T^2`` (Hinton et al.), so gradients keep
    their size as T grows; at T = 1 it is Eq. 3.1 exactly. It is the mean over the pixels of the
    batch where ``mask`` is True (every pixel by default), i.e. Eq. 3.1 per image averaged over the
    batch (the thesis sums over the mini-batch: multiply lambda_1 by B to match). A batch with no
    valid pixel gives 0 and zero gradients; masked-out pixels are never read (NaN there is fine).

    Regression outputs: a "class distribution" only exists where the output is one. Depth
    predicted as classification over depth bins (the thesis' §3.3.3, this package's DepthNet,
    :func:`pyamalgam.ops.soft_argmax_depth`) gives one per pixel: pass the bin logits. A plain
    depth map (K = 1) or surface normals (a unit 3-vector, not a distribution) have none, and the
    loss does not apply (K = 1 is refused; the thesis found pixel-wise KD does not help depth).

    Args:
        student_logits, teacher_logits: (B, K, H, W) class scores, K >= 2, same shape and device.
        temperature: T > 0.
        mask: optional bool (B, H, W) or (B, 1, H, W), True where the pixel counts, e.g.
            ``labels != ignore_index``.
        order: "thesis" (KL(student || teacher)) or "teacher" (KL(teacher || student)).
    """
    check_map("student_logits", student_logits, min_channels=2)
    check_map("teacher_logits", teacher_logits, min_channels=2)
    _pair("student_logits", student_logits, "teacher_logits", teacher_logits, channels=True)
    t = check_float("temperature", temperature, positive=True)
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    mask = _pixel_mask(mask, student_logits)
    # Half precision logits: the log-softmax and its sums run in float32.
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    zs, zt = student_logits.to(acc), teacher_logits.to(acc)
    if mask is not None:  # zero masked-out logits first: a NaN there must not reach any gradient
        zs = torch.where(mask[:, None], zs, torch.zeros((), dtype=acc, device=zs.device))
        zt = torch.where(mask[:, None], zt, torch.zeros((), dtype=acc, device=zt.device))
    log_qs = torch.log_softmax(zs / t, dim=1)
    log_qt = torch.log_softmax(zt / t, dim=1)
    first, second = (log_qs, log_qt) if order == "thesis" else (log_qt, log_qs)
    kl = (first.exp() * (first - second)).sum(dim=1)
    if mask is None:
        return (t * t * kl.mean()).to(student_logits.dtype)
    count = mask.sum().clamp_min(1)
    return (t * t * torch.where(mask, kl, torch.zeros_like(kl)).sum() / count).to(student_logits.dtype)


def pair_wise_loss(fs: torch.Tensor, ft: torch.Tensor, radius: int | None = None, patch: int = 1) -> torch.Tensor:
    """Pair-wise distillation, thesis Eq. 3.2, with connection range alpha and granularity beta.

    ``l_pa = beta / (W'H' alpha) sum_i sum_{j in alpha(i)} (a^s_ij - a^t_ij)^2`` with
    ``a_ij = f_i^T f_j / (|f_i| |f_j|)`` over nodes ``f_i`` that average-pool beta = patch x patch
    pixels (the thesis' pooling; the public code max-pools) -- a ragged border cell averages the
    pixels it has, and a zero node has affinity 0. Node i is connected to the nodes within
    Chebyshev distance ``radius`` of it, itself included: alpha = (2 radius + 1)^2, e.g. the
    thesis' Fig. 3.3 (A) alpha = 9 is ``radius=1``, (B) alpha = 25 is ``radius=2``, (C) is
    ``radius=1, patch=2``. ``radius=None`` is the full graph (alpha = N, Table 3.2's best rows).

    The normaliser is the thesis' 1 / (N alpha) for every node, with N the number of nodes and
    alpha the window clipped to the node grid, ``min(2r+1, hp) * min(2r+1, wp)``: a node near the
    border has fewer neighbours, which count as equal (0) rather than renormalising that node, and
    a window that holds the whole grid gives exactly the full graph (which this function then
    computes with the linear-time full-graph op). Averaged over the batch.

    Regression outputs: the loss compares *feature* similarities, so it applies to any network's
    intermediate (B, C, H, W) features (the thesis' depth experiments distil those). On a
    prediction map it needs several channels to say anything: on surface normals (C = 3) a_ij is
    the cosine of the angle between two normals, a meaningful structure; on a one-channel depth map
    a_ij is only the product of two signs, so distil depth features, not depth.

    Args:
        fs: student features (B, Cs, H, W). ft: teacher features (B, Ct, H, W); Ct may differ.
        radius: Chebyshev radius of the window in nodes (>= 0), or None for the full graph.
        patch: side of a node's cell in pixels (beta = patch x patch, >= 1).
    """
    patch = check_int("patch", patch, minimum=1)
    if radius is None:
        return ops.pairwise_affinity_loss(fs, ft, patch)
    radius = check_int("radius", radius, minimum=0)
    check_map("fs", fs)
    hp, wp = math.ceil(fs.shape[2] / patch), math.ceil(fs.shape[3] / patch)
    if hp * wp > 0 and radius >= max(hp, wp) - 1:  # every window holds the whole grid: the full graph
        return ops.pairwise_affinity_loss(fs, ft, patch)
    return ops.pairwise_local_loss(fs, ft, radius, patch)


def table_3_2_radii(height: int, width: int, patch: int = 2, fractions: Sequence[int] = (1, 2, 4)) -> list:
    """Radii of Table 3.2's alpha-fusion: windows of 1/f of the node grid's side for each f.

    Footnote 1 of Table 3.2 (beta = 2x2, alpha = W'/2 x H'/2, W'/4 x H'/4, W'/8 x H'/8 pixels,
    i.e. the whole node grid, half and a quarter of its side; connections 16 + 4 + 1 = 21 units):
    f = 1 gives None (the full graph), otherwise the smallest radius whose window side 2r + 1
    covers ceil(side / f) nodes, side = the larger side of the node grid.
    """
    side = max(math.ceil(height / patch), math.ceil(width / patch))
    return [None if f == 1 else math.ceil(side / f) // 2 for f in fractions]


def alpha_fusion(fs: torch.Tensor, ft: torch.Tensor, radii: Sequence[int | None] | None = None,
                 patch: int = 2) -> torch.Tensor:
    """Table 3.2's alpha-fusion: the sum of Eq. 3.2 over several connection ranges at one beta.

    ``radii`` default: :func:`table_3_2_radii` of fs's size (the full graph, half and a quarter of
    the grid, at beta = 2x2). Each term is :func:`pair_wise_loss`; the terms are summed, unweighted.
    """
    radii = table_3_2_radii(fs.shape[-2], fs.shape[-1], patch) if radii is None else list(radii)
    if not radii:
        raise ValueError("radii must name at least one connection range")
    return sum(pair_wise_loss(fs, ft, r, patch) for r in radii)


def beta_fusion(fs: torch.Tensor, ft: torch.Tensor, patches: Sequence[int] = (2, 4, 8),
                radius: int | None = None) -> torch.Tensor:
    """Table 3.2's beta-fusion: the sum of Eq. 3.2 over several granularities (footnote 2: beta
    2x2, 4x4, 8x8 with the full graph, ``radius=None``). Unweighted sum of :func:`pair_wise_loss`.
    (The table's third row, feature-fusion, is a sum of pair_wise_loss over feature levels.)"""
    patches = list(patches)
    if not patches:
        raise ValueError("patches must name at least one granularity")
    return sum(pair_wise_loss(fs, ft, radius, p) for p in patches)


def channel_wise_loss(ys: torch.Tensor, yt: torch.Tensor, temperature: float = 3.0,
                      connector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Channel-wise distillation, thesis Eqs. 4.2-4.4.

    Each channel c becomes a distribution over its H*W pixels, ``phi(y_c) = softmax(y_c / T)``
    (Eq. 4.3), and ``phi_cd = T^2 / C sum_c sum_i phi(yt_ci) log(phi(yt_ci) / phi(ys_ci))``
    (Eq. 4.4): KL(teacher || student), the asymmetric order the thesis prints (swapped, training
    does not converge, §4.4.3), with T^2 balancing soft and hard targets. Averaged over the batch.
    T = 3 is the thesis' setting (§4.4.1). Fused, one pass per channel:
    :func:`pyamalgam.ops.channel_wise_loss`.

    When student and teacher have different channel counts, a 1x1 convolution maps the student's
    channels onto the teacher's (§4.3.2): pass ``connector=pyamalgam.nn.Connector(Cs, Ct)`` (and
    train it with the student).

    Regression outputs: the "channel distribution" is a spatial one, so it exists for any map:
    for features and logits (the thesis' use) it says where each channel fires. On a one-channel
    depth map it is softmax(depth / T) over the image, which weights the far regions (use
    ``-depth`` for the near ones); on normals each of the three components gets one. It applies,
    but its meaning there is the user's call; features are the tested use.

    Args:
        ys: student activations (B, Cs, H, W). yt: teacher activations (B, Ct, H, W).
        temperature: T > 0.
        connector: optional callable applied to ys first (e.g. :class:`pyamalgam.nn.Connector`).
    """
    if connector is not None:
        if not callable(connector):
            raise TypeError(f"connector must be callable (e.g. pyamalgam.nn.Connector), got {type(connector).__name__}")
        ys = connector(ys)
    check_map("ys", ys)
    check_map("yt", yt)
    if ys.shape[1] != yt.shape[1]:
        raise ValueError(f"ys has {ys.shape[1]} channels and yt {yt.shape[1]}: pass "
                         f"connector=pyamalgam.nn.Connector({ys.shape[1]}, {yt.shape[1]})")
    _pair("ys", ys, "yt", yt, channels=True)
    return ops.channel_wise_loss(ys, yt, check_float("temperature", temperature, positive=True))


class PixelWiseLoss(nn.Module):
    """Eq. 3.1 as a module: ``PixelWiseLoss(T)(student_logits, teacher_logits, mask=None)``."""

    def __init__(self, temperature: float = 1.0, order: str = "thesis"):
        super().__init__()
        self.temperature = check_float("temperature", temperature, positive=True)
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        self.order = order

    def forward(self, student_logits, teacher_logits, mask=None):
        return pixel_wise_loss(student_logits, teacher_logits, self.temperature, mask, order=self.order)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, order={self.order!r}"


class PairWiseLoss(nn.Module):
    """Eq. 3.2 as a module: ``PairWiseLoss(radius, patch)(fs, ft)``; see :func:`pair_wise_loss`."""

    def __init__(self, radius: int | None = None, patch: int = 1):
        super().__init__()
        self.radius = None if radius is None else check_int("radius", radius, minimum=0)
        self.patch = check_int("patch", patch, minimum=1)

    def forward(self, fs, ft):
        return pair_wise_loss(fs, ft, self.radius, self.patch)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, patch={self.patch}"


class ChannelWiseLoss(nn.Module):
    """Eqs. 4.2-4.4 as a module, with its optional connector as a submodule (so that its
    parameters train with the student's): ``ChannelWiseLoss(3.0, Connector(64, 256))(ys, yt)``."""

    def __init__(self, temperature: float = 3.0, connector: nn.Module | None = None):
        super().__init__()
        self.temperature = check_float("temperature", temperature, positive=True)
        self.connector = connector

    def forward(self, ys, yt):
        return channel_wise_loss(ys, yt, self.temperature, self.connector)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ObjectiveTerms(NamedTuple):
    """What :class:`StructuredObjective` returns: the total and each (unweighted) term."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class StructuredObjective:
    """The student's objective of thesis Eq. 3.4: ``l_mc + lambda_1 (l_pi + l_pa) - lambda_2 l^s_ho``.

    lambda_1 = 10 and lambda_2 = 0.1 are the thesis' values (§3.3.2). ``pixel_wise`` /
    ``pair_wise`` are the terms' callables (None leaves one out; the pair-wise one gets the
    features, the pixel-wise one the logits, as in the thesis).

    ``holistic`` is the hook for the holistic term (Eq. 3.3, a WGAN-GP critic, not part of this
    module): a callable ``holistic(student_logits, image) -> l^s_ho``, the critic's mean score of the
    student's map conditioned on the image, ``E[D(Q^s | I)]``. The objective *subtracts*
    ``lambda_2 l^s_ho`` (the student wants a high score). The critic's own step (minimising
    ``l_ho`` plus the gradient penalty) belongs to the holistic module, alternating with this one.
    Without ``holistic`` the term is absent (the thesis' "+PI+PA" rows).
    """

    def __init__(self, lambda1: float = 10.0, lambda2: float = 0.1, *,
                 pixel_wise: Callable | None = _DEFAULT, pair_wise: Callable | None = _DEFAULT,
                 holistic: Callable | None = None):
        pixel_wise = PixelWiseLoss() if pixel_wise is _DEFAULT else pixel_wise
        pair_wise = PairWiseLoss() if pair_wise is _DEFAULT else pair_wise
        self.lambda1 = check_float("lambda1", lambda1)
        self.lambda2 = check_float("lambda2", lambda2)
        for name, fn in (("pixel_wise", pixel_wise), ("pair_wise", pair_wise), ("holistic", holistic)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        self.pixel_wise, self.pair_wise, self.holistic = pixel_wise, pair_wise, holistic

    def __call__(self, student_logits, teacher_logits, student_features=None, teacher_features=None, *,
                 task_loss=None, image=None, mask=None) -> ObjectiveTerms:
        terms: dict[str, torch.Tensor] = {}
        if task_loss is not None:
            terms["mc"] = task_loss
        if self.pixel_wise is not None:
            terms["pi"] = self.pixel_wise(student_logits, teacher_logits, mask=mask)
        if self.pair_wise is not None:
            if student_features is None or teacher_features is None:
                raise ValueError("the pair-wise term needs student_features and teacher_features "
                                 "(or build the objective with pair_wise=None)")
            terms["pa"] = self.pair_wise(student_features, teacher_features)
        if self.holistic is not None:
            terms["ho"] = self.holistic(student_logits, image)
        total = terms.get("mc", student_logits.new_zeros(()))
        distill = [terms[k] for k in ("pi", "pa") if k in terms]
        if distill:
            total = total + self.lambda1 * sum(distill)
        if "ho" in terms:
            total = total - self.lambda2 * terms["ho"]
        return ObjectiveTerms(total, terms)

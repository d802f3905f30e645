"""Plain-PyTorch formulas of the fused operators.

Each function has the signature and semantics of its fused twin in :mod:`pyamalgam.ops`.
They materialise every intermediate (the pair-wise one builds both N x N affinity
matrices) and, given float64 inputs, are the independent float64 ground truth that the tests,
``pyamalgam selfcheck`` and the benchmarks compare the fused operators against. Nothing
dispatches to them (they are no fallback of the fused operators), and they are not something
to train with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "channel_coding",
    "soft_argmax_depth",
    "si_depth_loss",
    "pairwise_affinity_loss",
    "pool_nodes",
    "normalize_nodes",
]


def channel_coding(x, w1, b1, w2, b2):
    """Channel coding (paper 001 §5.1.1, Fig. 3): a squeeze-excitation style rescale.

    ``s = sigmoid(w2 @ relu(w1 @ mean_HW(x) + b1) + b2)``, returns ``x * s[:, :, None, None]``.
    An empty map (H or W = 0) gives an empty result, and zero gradients for the weights: its
    mean is taken as 0 (the empty sum), not NaN, since the result does not depend on it.
    """
    pooled = x.mean(dim=(2, 3)) if x.shape[2] * x.shape[3] > 0 else x.sum(dim=(2, 3))
    hidden = torch.relu(pooled @ w1.t() + b1)
    scale = torch.sigmoid(hidden @ w2.t() + b2)
    return x * scale[:, :, None, None]


def soft_argmax_depth(logits, bin_size):
    """Eq. 2: ``D_i = sum_b b * l * softmax(r_i)_b`` with bins numbered 1..N_d."""
    bins = torch.arange(1, logits.shape[1] + 1, device=logits.device, dtype=logits.dtype)
    prob = torch.softmax(logits, dim=1)
    return bin_size * (prob * bins[None, :, None, None]).sum(dim=1)


def si_depth_loss(pred, target, mask=None):
    """Eq. 3, the scale-invariant depth loss, per image then averaged.

    With ``d = target - pred`` over the N valid pixels of an image:
    ``(1/N) sum d^2 - (1/(2 N^2)) (sum d)^2``. Images with no valid pixel are left out of the
    mean; a batch with none at all gives 0 (and zero gradients), an empty one (B = 0) too.
    """
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    b, pixels = pred.shape[0], math.prod(pred.shape[1:])  # not -1: ambiguous when B = 0
    d = (target - pred).reshape(b, pixels)
    m = mask.reshape(b, pixels).to(d.dtype)
    d = torch.where(m > 0, d, torch.zeros_like(d))  # a masked NaN must not leak in
    n = m.sum(dim=1)
    s1 = d.sum(dim=1)
    s2 = (d * d).sum(dim=1)
    has = n > 0
    safe_n = torch.where(has, n, torch.ones_like(n))
    per_image = s2 / safe_n - s1 * s1 / (2 * safe_n * safe_n)
    per_image = torch.where(has, per_image, torch.zeros_like(per_image))
    count = has.sum()
    return per_image.sum() / count.clamp_min(1).to(per_image.dtype)


def pool_nodes(f, patch):
    """Average ``patch x patch`` non-overlapping cells; a ragged border cell averages what it has.

    Returns (B, N, C) with nodes in row-major order of the cell grid. A patch beyond the map
    (>= max(H, W)) makes one node of the whole image: it is clamped to max(H, W), the same cell.
    """
    patch = min(patch, max(f.shape[2], f.shape[3], 1))
    if patch == 1:
        pooled = f
    else:
        # ceil_mode with padding=0: the border window is clipped to the input, and
        # count_include_pad=False divides by the number of pixels it really covers.
        pooled = F.avg_pool2d(f, patch, patch, ceil_mode=True, count_include_pad=False)
        hp, wp = math.ceil(f.shape[2] / patch), math.ceil(f.shape[3] / patch)
        assert pooled.shape[2:] == (hp, wp)
    return pooled.flatten(2).transpose(1, 2)


def normalize_nodes(v):
    """L2-normalise each node's C-vector; a zero vector stays zero (and has zero gradient)."""
    norm = v.norm(dim=-1, keepdim=True)
    nonzero = norm > 0
    return torch.where(nonzero, v / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(v))


def pairwise_affinity_loss(fs, ft, patch=1):
    """Thesis §3.3.1, Eq. 3.2 with alpha = all nodes: full-graph pair-wise distillation.

    ``a_ij = f_i^T f_j`` over L2-normalised node features; the loss is the mean over all node
    pairs of ``(a^s_ij - a^t_ij)^2``, averaged over the batch. Builds both N x N matrices.
    An empty batch or map (B, H or W = 0: no node pairs) gives 0 and zero gradients.
    """
    if fs.shape[0] * fs.shape[2] * fs.shape[3] == 0:
        return (fs.sum() + ft.sum()) * 0  # the empty sum, connected to both inputs
    s = normalize_nodes(pool_nodes(fs, patch))
    t = normalize_nodes(pool_nodes(ft, patch))
    a_s = s @ s.transpose(1, 2)
    a_t = t @ t.transpose(1, 2)
    return ((a_s - a_t) ** 2).mean(dim=(1, 2)).mean()


# --- Structured and channel-wise distillation (thesis 003, ch. 3-4) ---------------------------------
__all__ += ["node_grid", "chebyshev_window", "pairwise_local_loss", "channel_wise_loss"]


def node_grid(h, w, patch):
    """(hp, wp): the node grid of a (h, w) map cut into patch x patch cells (ragged border kept)."""
    return math.ceil(h / patch), math.ceil(w / patch)


def chebyshev_window(hp, wp, radius, device=None):
    """(N, N) bool, True where two nodes of an hp x wp grid are within Chebyshev distance ``radius``."""
    ii, jj = torch.meshgrid(torch.arange(hp, device=device), torch.arange(wp, device=device), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    dist = torch.maximum((ii[:, None] - ii[None, :]).abs(), (jj[:, None] - jj[None, :]).abs())
    return dist <= radius


def pairwise_local_loss(fs, ft, radius, patch=1):
    """Thesis §3.3.1, Eq. 3.2 with a local window: each node is connected to the nodes within
    Chebyshev distance ``radius`` (itself included), ``alpha = min(2r+1, hp) * min(2r+1, wp)``.

    ``loss = 1 / (N alpha) sum_i sum_{j in window(i)} (a^s_ij - a^t_ij)^2`` per image (the thesis'
    beta / (W'H' alpha) with N = W'H' / beta nodes), averaged over the batch. Builds both N x N
    affinity matrices and the N x N window mask.
    """
    s = normalize_nodes(pool_nodes(fs, patch))
    t = normalize_nodes(pool_nodes(ft, patch))
    hp, wp = node_grid(fs.shape[2], fs.shape[3], patch)
    alpha = min(2 * radius + 1, hp) * min(2 * radius + 1, wp)
    window = chebyshev_window(hp, wp, radius, device=fs.device).to(s.dtype)
    diff = s @ s.transpose(1, 2) - t @ t.transpose(1, 2)
    per_image = (diff * diff * window).sum(dim=(1, 2)) / (hp * wp * alpha)
    return per_image.mean()


def channel_wise_loss(ys, yt, temperature=1.0):
    """Thesis ch. 4, Eqs. 4.3-4.4: channel-wise distillation.

    Each channel of each image becomes a distribution over its H*W pixels,
    ``phi(y_c) = softmax(y_c / T)``; the loss of an image is
    ``T^2 / C * sum_c KL(phi(yt_c) || phi(ys_c))`` (teacher first, as printed), averaged over the
    batch. Materialises both (B, C, H*W) softmaxes.
    """
    b, c = ys.shape[:2]
    log_ps = torch.log_softmax(ys.reshape(b, c, -1) / temperature, dim=-1)
    log_pt = torch.log_softmax(yt.reshape(b, c, -1) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return temperature**2 * kl.sum(dim=1).mean() / c


# --- Temporal distillation (thesis 003, ch. 5) -----------------------------------------------------------
__all__ += ["pairwise_frames_loss"]


def pairwise_frames_loss(fs_t, fs_k, ft_t, ft_k, patch=1):
    """Thesis §5.3.2, Eq. 5.2: pair-wise-frames distillation.

    ``a_ij = cos(f_t^i, f_{t+k}^j)`` between node i of frame t and node j of frame t+k (nodes as in
    :func:`pool_nodes`, L2-normalised by :func:`normalize_nodes`); the loss is the mean over all
    node pairs of ``(a^s_ij - a^t_ij)^2``, averaged over the batch. Builds both N x N cross-frame
    affinity matrices. An empty batch or map (no node pairs) gives 0 and zero gradients.
    """
    if fs_t.shape[0] * fs_t.shape[2] * fs_t.shape[3] == 0:
        return (fs_t.sum() + fs_k.sum() + ft_t.sum() + ft_k.sum()) * 0
    nodes = lambda f: normalize_nodes(pool_nodes(f, patch))  # noqa: E731
    a_s = nodes(fs_t) @ nodes(fs_k).transpose(1, 2)
    a_t = nodes(ft_t) @ nodes(ft_k).transpose(1, 2)
    return ((a_s - a_t) ** 2).mean(dim=(1, 2)).mean()

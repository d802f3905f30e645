"""Pair-wise distillation with a local window (thesis 003, §3.3.1, Eq. 3.2) as one fused operator."""
from __future__ import annotations

import torch

from .._checks import check_int
from . import _validate as v
from . import _meta_checks as checks
from ._meta_checks import _check  # torch._check with the op name, as the other fake kernels
from . import reference as ref

__all__ = ["pairwise_local_loss"]

_tensor = v.map_any_device


def pairwise_local_loss(fs: torch.Tensor, ft: torch.Tensor, radius: int, patch: int = 1) -> torch.Tensor:
    """Eq. 3.2 with connection range alpha = a Chebyshev window of ``radius`` nodes.

    Nodes are the non-overlapping ``patch x patch`` average pools (a ragged border cell averages
    what it has), L2-normalised (a zero node stays zero), ``a_ij = f_i^T f_j``. Node i is
    connected to every node within Chebyshev distance ``radius``, itself included, and the loss is
    ``1 / (N alpha) sum_i sum_{j in window(i)} (a^s_ij - a^t_ij)^2`` per image with
    ``alpha = min(2r+1, hp) * min(2r+1, wp)`` (the thesis' normaliser; border nodes have fewer
    neighbours), averaged over the batch. A batch or map with no node gives 0.

    CPU: fused, memory O(N C) (the N alpha C neighbourhoods are never gathered), time
    O(N alpha C), float64 inside, deterministic. Other devices: a device-generic ATen path (one
    shifted product per window offset, also O(N C) memory) with autograd; it has no kernel of its
    own and has never run on a GPU (docs/cuda.md).

    Args:
        fs: student features (B, Cs, H, W). ft: teacher features (B, Ct, H, W); Ct may differ.
        radius: Chebyshev radius of the window in nodes (>= 0).
        patch: side of a node's cell in pixels (>= 1).
    """
    _tensor("fs", fs)
    _tensor("ft", ft)
    radius = check_int("radius", radius, minimum=0)
    patch = check_int("patch", patch, minimum=1)
    if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
        raise ValueError("fs and ft must have the same batch and spatial sizes (channels may differ): "
                         f"fs is {tuple(fs.shape)}, ft is {tuple(ft.shape)}")
    v.same("device", "fs", fs, ft=ft)
    v.same("dtype", "fs", fs, ft=ft)
    if fs.device.type not in ("cpu", "meta"):
        return _pairwise_local_generic(fs, ft, radius, patch)
    return torch.ops.pyamalgam.pairwise_local_loss.default(fs, ft, radius, patch)


def _pairwise_local_generic(fs, ft, radius, patch):
    """The same loss from ATen ops on any device: for each offset (dy, dx) of the half window, the
    affinities of every node with its shifted neighbour, as one product of two shifted views."""
    acc = torch.float64 if fs.dtype == torch.float64 else torch.float32
    b, _, h, w = fs.shape
    hp, wp = ref.node_grid(h, w, patch)
    if b * hp * wp == 0:
        return fs.new_zeros(())
    s = ref.normalize_nodes(ref.pool_nodes(fs.to(acc), patch)).transpose(1, 2).reshape(b, -1, hp, wp)
    t = ref.normalize_nodes(ref.pool_nodes(ft.to(acc), patch)).transpose(1, 2).reshape(b, -1, hp, wp)
    r = min(radius, max(hp, wp))
    diag = (s * s).sum(1) - (t * t).sum(1)
    total = (diag * diag).sum()
    for dy in range(0, min(r, hp - 1) + 1):
        for dx in range(-min(r, wp - 1), min(r, wp - 1) + 1):
            if dy == 0 and dx <= 0:  # the other half of the window: the same pairs, counted by 2 below
                continue
            x0, x1 = max(0, -dx), wp - max(0, dx)
            a = lambda m: (m[:, :, : hp - dy, x0:x1] * m[:, :, dy:, x0 + dx : x1 + dx]).sum(1)
            d = a(s) - a(t)
            total = total + 2 * (d * d).sum()
    alpha = min(2 * r + 1, hp) * min(2 * r + 1, wp)
    return (total / (b * hp * wp * alpha)).to(fs.dtype)


# The C++ checks (csrc/checks_distill.cpp) for the fake kernels, same messages.
def _fake_checks(op, fs, ft, radius, patch):
    checks.feature_pair(op, fs, ft)
    _check(op, radius >= 0, lambda: f"radius must be >= 0, got {radius}")
    _check(op, patch >= 1, lambda: f"patch must be >= 1, got {patch}")


@torch.library.register_fake("pyamalgam::pairwise_local_loss")
def _pairwise_local_loss_fake(fs, ft, radius, patch):
    _fake_checks("pairwise_local_loss", fs, ft, radius, patch)
    return fs.new_empty(())


@torch.library.register_fake("pyamalgam::pairwise_local_loss_backward")
def _pairwise_local_loss_backward_fake(grad, fs, ft, radius, patch):
    op = "pairwise_local_loss_backward"
    _fake_checks(op, fs, ft, radius, patch)
    checks._scalar_grad(op, grad, "fs", fs)
    return (torch.empty_like(fs, memory_format=v.dense_format(fs)),
            torch.empty_like(ft, memory_format=v.dense_format(ft)))


def _setup_context(ctx, inputs, output):
    fs, ft, radius, patch = inputs
    ctx.save_for_backward(fs, ft)
    ctx.radius, ctx.patch = radius, patch


def _backward(ctx, grad):
    fs, ft = ctx.saved_tensors
    grad_s, grad_t = torch.ops.pyamalgam.pairwise_local_loss_backward.default(grad, fs, ft, ctx.radius, ctx.patch)
    return grad_s, grad_t, None, None


torch.library.register_autograd("pyamalgam::pairwise_local_loss", _backward, setup_context=_setup_context)

"""Pair-wise (affinity) distillation of the thesis, §3.3.1, exact and linear in the number of nodes."""
from __future__ import annotations

import torch

from . import _meta_checks as checks
from . import _validate as v

__all__ = ["pairwise_affinity_loss"]

_INT64_MAX = 2**63 - 1


def pairwise_affinity_loss(fs: torch.Tensor, ft: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """Full-graph pair-wise distillation loss (thesis Eq. 3.2 with alpha = all nodes).

    Nodes are the non-overlapping ``patch x patch`` average pools of a feature map (a ragged border
    cell averages the pixels it has); each node's C-vector is L2-normalised (a zero vector stays
    zero), ``a_ij = f_i^T f_j``, and the loss is the mean over all node pairs of
    ``(a^s_ij - a^t_ij)^2``, averaged over the batch. An empty batch or map (B, H or W = 0: no
    node pairs) gives 0 and zero gradients, never NaN.

    The N x N affinity matrices are never formed: time and memory are linear in N, and the result
    is exact (float64 inside, cancellation-free also when student and teacher agree up to a
    rotation of their features; see csrc/pairwise_affinity.cpp). The forward keeps what the
    backward needs (the normalised nodes, P and D, and the backward's C x C coefficients: O(N C)),
    so the backward is one product and the adjoint of the pooling, with nothing recomputed.

    Args:
        fs: student features (B, Cs, H, W).
        ft: teacher features (B, Ct, H, W); Ct may differ from Cs, B, H, W may not.
        patch: side of a node's cell in pixels (>= 1). Any patch >= max(H, W) makes one node of
            the whole image (the kernels clamp it to max(H, W), which gives the same nodes).
    """
    v.tensor("fs", fs, ndim=4)
    v.tensor("ft", ft, ndim=4)
    # The schema's int is an int64; a larger patch means one node per image as well.
    patch = min(v.positive_int("patch", patch), _INT64_MAX)
    if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
        raise ValueError(
            "fs and ft must have the same batch and spatial sizes (channels may differ): "
            f"fs is {tuple(fs.shape)}, ft is {tuple(ft.shape)}"
        )
    v.same("device", "fs", fs, ft=ft)
    v.same("dtype", "fs", fs, ft=ft)
    return torch.ops.pyamalgam.pairwise_affinity_loss_for_backward.default(fs, ft, patch)[0]


@torch.library.register_fake("pyamalgam::pairwise_affinity_loss")
def _pairwise_affinity_loss_fake(fs, ft, patch):
    checks.pairwise_affinity_loss(fs, ft, patch)
    return fs.new_empty(())


@torch.library.register_fake("pyamalgam::pairwise_affinity_loss_backward")
def _pairwise_affinity_loss_backward_fake(grad, fs, ft, patch):
    checks.pairwise_affinity_loss(fs, ft, patch, grad=grad)
    return (
        torch.empty_like(fs, memory_format=v.dense_format(fs)),
        torch.empty_like(ft, memory_format=v.dense_format(ft)),
    )


@torch.library.register_fake("pyamalgam::pairwise_affinity_loss_for_backward")
def _pairwise_affinity_loss_for_backward_fake(fs, ft, patch):
    checks.pairwise_affinity_loss(fs, ft, patch, op="pairwise_affinity_loss_for_backward")
    saved = [fs.new_empty(shape, dtype=dtype) for shape, dtype in checks.pairwise_saved_shapes(fs, ft, patch).values()]
    return (fs.new_empty(()), *saved)


@torch.library.register_fake("pyamalgam::pairwise_affinity_loss_saved_backward")
def _pairwise_affinity_loss_saved_backward_fake(grad, fs, ft, s_hat, s_inv, t_hat, t_inv, pd, coef, patch):
    checks.pairwise_affinity_loss_saved(grad, fs, ft, (s_hat, s_inv, t_hat, t_inv, pd, coef), patch)
    return _pairwise_affinity_loss_backward_fake(grad, fs, ft, patch)


# A direct call of pairwise_affinity_loss with gradients: its backward op computes the forward again.
def _pairwise_affinity_loss_setup_context(ctx, inputs, output):
    fs, ft, patch = inputs
    ctx.save_for_backward(fs, ft)
    ctx.patch = patch


def _pairwise_affinity_loss_backward(ctx, grad):
    fs, ft = ctx.saved_tensors
    grad_s, grad_t = torch.ops.pyamalgam.pairwise_affinity_loss_backward.default(grad, fs, ft, ctx.patch)
    return grad_s, grad_t, None


torch.library.register_autograd(
    "pyamalgam::pairwise_affinity_loss",
    _pairwise_affinity_loss_backward,
    setup_context=_pairwise_affinity_loss_setup_context,
)


# The Python API's path: the forward returned what the backward needs (fs and ft only give it
# their shapes and layouts).
def _for_backward_setup_context(ctx, inputs, output):
    fs, ft, patch = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the six saved outputs
    ctx.save_for_backward(fs, ft, *output[1:])
    ctx.patch = patch


def _for_backward_backward(ctx, grad, *_saved_grads):
    if grad is None:  # the loss took no part in what is differentiated (grads are not materialised)
        return None, None, None
    fs, ft, *saved = ctx.saved_tensors
    grad_s, grad_t = torch.ops.pyamalgam.pairwise_affinity_loss_saved_backward.default(grad, fs, ft, *saved, ctx.patch)
    return grad_s, grad_t, None


torch.library.register_autograd(
    "pyamalgam::pairwise_affinity_loss_for_backward",
    _for_backward_backward,
    setup_context=_for_backward_setup_context,
)

"""Depth operators of the paper: soft-argmax over depth bins (Eq. 2) and the scale-invariant loss (Eq. 3)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _meta_checks as checks
from . import _validate as v

__all__ = ["soft_argmax_depth", "si_depth_loss"]


def soft_argmax_depth(logits: torch.Tensor, bin_size: float) -> torch.Tensor:
    """Eq. 2: decode per-pixel depth-bin logits into metric depth.

    ``D_i = sum_{b=1..N_d} b * l * softmax(r_i)_b``, bins numbered from 1, with a numerically
    stable softmax.

    Args:
        logits: (B, N_d, H, W) bin scores r, N_d >= 1 (no bins is refused: the softmax of nothing
            has no value). B, H or W may be 0: the result is then empty.
        bin_size: l, the depth covered by one bin (> 0), e.g. ``max_depth / N_d``.

    Returns:
        depth (B, H, W), same dtype as ``logits``.
    """
    v.tensor("logits", logits, ndim=4)
    if logits.shape[1] < 1:
        raise ValueError(
            f"logits must have at least one depth bin (logits.shape[1] >= 1), got shape {tuple(logits.shape)}"
        )
    bin_size = v.positive_float("bin_size", bin_size)
    return torch.ops.pyamalgam.soft_argmax_depth.default(logits, bin_size)


@torch.library.register_fake("pyamalgam::soft_argmax_depth")
def _soft_argmax_depth_fake(logits, bin_size):
    checks.soft_argmax_depth(logits, bin_size)
    b, _, h, w = logits.shape
    return logits.new_empty((b, h, w))


@torch.library.register_fake("pyamalgam::soft_argmax_depth_backward")
def _soft_argmax_depth_backward_fake(grad, logits, bin_size):
    checks.soft_argmax_depth(logits, bin_size, grad=grad)
    return torch.empty_like(logits, memory_format=v.dense_format(logits))


def _soft_argmax_depth_setup_context(ctx, inputs, output):
    logits, bin_size = inputs
    ctx.save_for_backward(logits)
    ctx.bin_size = bin_size


def _soft_argmax_depth_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.pyamalgam.soft_argmax_depth_backward.default(grad, logits, ctx.bin_size), None


torch.library.register_autograd(
    "pyamalgam::soft_argmax_depth", _soft_argmax_depth_backward, setup_context=_soft_argmax_depth_setup_context
)


def si_depth_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 3: the scale-invariant depth loss, per image, averaged over the batch.

    For image i with ``d = target - pred`` over its N valid pixels:
    ``L_i = (1/N) sum d^2 - (1/(2 N^2)) (sum d)^2``. The result is the mean of ``L_i`` over the
    images with at least one valid pixel; a batch with none gives 0 and zero gradients (never NaN),
    and so does an empty batch or map (B, H or W = 0). Pixels outside the mask are ignored
    entirely, even if they hold NaN. The loss is computed in float64 and rounded to the inputs'
    dtype as a cast rounds: a value beyond the dtype's range is inf, never an error.

    Args:
        pred, target: (B, H, W) or (B, 1, H, W) depth, same shape, dtype and device.
        mask: optional bool tensor of the same shape; True marks valid pixels. Default: all valid.
    """
    v.tensor("pred", pred, ndim=(3, 4))
    v.tensor("target", target, ndim=(3, 4))
    if pred.dim() == 4 and pred.shape[1] != 1:
        raise ValueError(f"pred must be (B, H, W) or (B, 1, H, W), got shape {tuple(pred.shape)}")
    v.dims("target", target, pred.shape, "the shape of pred")
    v.same("device", "pred", pred, target=target)
    v.same("dtype", "pred", pred, target=target)
    if mask is not None:
        v.tensor("mask", mask, floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        v.dims("mask", mask, pred.shape, "the shape of pred")
        v.same("device", "pred", pred, mask=mask)
    if pred.dim() == 4:
        pred, target = pred[:, 0], target[:, 0]
        mask = None if mask is None else mask[:, 0]
    return torch.ops.pyamalgam.si_depth_loss.default(pred, target, mask)


@torch.library.register_fake("pyamalgam::si_depth_loss")
def _si_depth_loss_fake(pred, target, mask):
    checks.si_depth_loss(pred, target, mask)
    return pred.new_empty(())


@torch.library.register_fake("pyamalgam::si_depth_loss_backward")
def _si_depth_loss_backward_fake(grad, pred, target, mask):
    checks.si_depth_loss(pred, target, mask, grad=grad)
    return torch.empty_like(pred, memory_format=torch.contiguous_format), torch.empty_like(
        target, memory_format=torch.contiguous_format
    )


def _si_depth_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2], inputs[2])


def _si_depth_loss_backward(ctx, grad):
    pred, target, mask = ctx.saved_tensors
    grad_pred, grad_target = torch.ops.pyamalgam.si_depth_loss_backward.default(grad, pred, target, mask)
    return grad_pred, grad_target, None


torch.library.register_autograd(
    "pyamalgam::si_depth_loss", _si_depth_loss_backward, setup_context=_si_depth_loss_setup_context
)

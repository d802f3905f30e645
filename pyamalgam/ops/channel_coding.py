"""Channel coding (paper 001 §5.1.1, Fig. 3): the projection of amalgamated features into a task."""
from __future__ import annotations

import torch

from . import _meta_checks as checks
from . import _validate as v

__all__ = ["channel_coding"]


def channel_coding(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Modified squeeze-excitation branch of Fig. 3, fused.

    ``s = sigmoid(w2 @ relu(w1 @ mean_HW(x) + b1) + b2)`` and the result is ``x * s[:, :, None, None]``.

    Args:
        x: features (B, C, H, W), any layout (NCHW or channels_last kept).
        w1: (R, C) weight of the squeezing FC layer, b1: (R,).
        w2: (C, R) weight of the expanding FC layer, b2: (C,).

    An empty ``x`` (B, C, H or W = 0) gives an empty result and zero weight gradients: the result
    depends on no weight (the mean of a plane of no pixel is not taken, where it would be NaN).
    """
    v.tensor("x", x, ndim=4)
    for name, t, nd in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
        v.tensor(name, t, ndim=nd)
    v.same("device", "x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    v.same("dtype", "x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    c, r = x.shape[1], w1.shape[0]
    v.dims("w1", w1, (r, c), "(R, C) with C = x.shape[1]")
    v.dims("b1", b1, (r,), "(R,) with R = w1.shape[0]")
    v.dims("w2", w2, (c, r), "(C, R)")
    v.dims("b2", b2, (c,), "(C,)")
    return torch.ops.pyamalgam.channel_coding.default(x, w1, b1, w2, b2)


@torch.library.register_fake("pyamalgam::channel_coding")
def _channel_coding_fake(x, w1, b1, w2, b2):
    checks.channel_coding(x, w1, b1, w2, b2)
    return torch.empty_like(x, memory_format=v.dense_format(x))


@torch.library.register_fake("pyamalgam::channel_coding_backward")
def _channel_coding_backward_fake(grad, x, w1, b1, w2, b2):
    checks.channel_coding(x, w1, b1, w2, b2, grad=grad)
    return (
        torch.empty_like(x, memory_format=v.dense_format(x)),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(b1, memory_format=torch.contiguous_format),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        torch.empty_like(b2, memory_format=torch.contiguous_format),
    )


def _channel_coding_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _channel_coding_backward(ctx, grad):
    return torch.ops.pyamalgam.channel_coding_backward.default(grad, *ctx.saved_tensors)


torch.library.register_autograd(
    "pyamalgam::channel_coding", _channel_coding_backward, setup_context=_channel_coding_setup_context
)

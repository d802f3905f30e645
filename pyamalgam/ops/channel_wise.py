"""Channel-wise distillation of the thesis (003, ch. 4, Eqs. 4.3-4.4) as one fused operator."""
from __future__ import annotations

import math

import torch

from . import _validate as v
from . import _meta_checks as checks
from ._meta_checks import _check  # torch._check with the op name, as the other fake kernels

__all__ = ["channel_wise_loss"]

_tensor = v.map_any_device


def channel_wise_loss(ys: torch.Tensor, yt: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eqs. 4.3-4.4: ``T^2 / C sum_c KL(softmax(yt_c / T) || softmax(ys_c / T))``, batch mean.

    Each (image, channel) plane is a distribution over its H*W pixels; the teacher's comes first,
    as the thesis prints it. On CPU, one pass over each plane (an online softmax) for the forward, one for
    the backward; between them only three float64 numbers per plane are kept (the log-sum-exps
    and the teacher-weighted mean of yt - ys), never the (B, C, H*W) softmaxes. Gradients flow to
    both inputs (detach the teacher's to train the student only). Other devices: a device-generic
    ATen path (log-softmax, autograd), no kernel of its own, never run on a GPU (docs/cuda.md).

    Args:
        ys: student activations (B, C, H, W), C >= 1, H * W >= 1.
        yt: teacher activations of the same shape, dtype and device (map channels first, e.g. with
            :class:`pyamalgam.nn.Connector`).
        temperature: T, finite and > 0.
    """
    _tensor("ys", ys)
    _tensor("yt", yt)
    v.dims("yt", yt, ys.shape, "the shape of ys")
    v.same("device", "ys", ys, yt=yt)
    v.same("dtype", "ys", ys, yt=yt)
    if ys.shape[1] < 1 or ys.shape[2] * ys.shape[3] < 1:
        raise ValueError(f"ys must have at least one channel and one pixel, got shape {tuple(ys.shape)}")
    temperature = v.positive_float("temperature", temperature)
    if ys.device.type not in ("cpu", "meta"):
        return _channel_wise_generic(ys, yt, temperature)
    return torch.ops.pyamalgam.channel_wise_loss.default(ys, yt, temperature)[0]


def _channel_wise_generic(ys, yt, temperature):
    """The same loss from ATen ops on any device (autograd keeps its softmaxes: not fused)."""
    acc = torch.promote_types(ys.dtype, torch.float32)
    b, c = ys.shape[:2]
    log_ps = torch.log_softmax(ys.to(acc).reshape(b, c, -1) / temperature, dim=-1)
    log_pt = torch.log_softmax(yt.to(acc).reshape(b, c, -1) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return (temperature * temperature * kl.mean()).to(ys.dtype)


# The C++ checks (csrc/checks_distill.cpp) for the fake kernels, same messages (torch._check takes
# symbolic sizes).
def _fake_checks(op, ys, yt, temperature):
    checks._floating(op, "ys", ys)
    checks._dims(op, "ys", ys, 4)
    _check(op, ys.shape[1] >= 1, lambda: f"ys must have at least one channel and one pixel, got shape {tuple(ys.shape)}")
    _check(op, ys.shape[2] * ys.shape[3] >= 1,
           lambda: f"ys must have at least one channel and one pixel, got shape {tuple(ys.shape)}")
    checks._shape_of(op, "yt", yt, "ys", ys)
    checks._like(op, "yt", yt, "ys", ys)
    # Two comparisons rather than math.isfinite, which a symbolic float does not take.
    message = lambda: f"temperature must be a finite number > 0, got {checks._format_float(temperature)}"
    _check(op, temperature > 0, message)
    _check(op, temperature < math.inf, message)


@torch.library.register_fake("pyamalgam::channel_wise_loss")
def _channel_wise_loss_fake(ys, yt, temperature):
    _fake_checks("channel_wise_loss", ys, yt, temperature)
    return ys.new_empty(()), ys.new_empty((ys.shape[0], ys.shape[1], 3), dtype=torch.float64)


@torch.library.register_fake("pyamalgam::channel_wise_loss_backward")
def _channel_wise_loss_backward_fake(grad, ys, yt, stats, temperature):
    op = "channel_wise_loss_backward"
    _fake_checks(op, ys, yt, temperature)
    checks._scalar_grad(op, grad, "ys", ys)
    checks.saved(op, "stats", stats, torch.float64, (ys.shape[0], ys.shape[1], 3), "(B, C, 3) of ys", "ys", ys)
    return (torch.empty_like(ys, memory_format=v.dense_format(ys)),
            torch.empty_like(yt, memory_format=v.dense_format(yt)))


def _setup_context(ctx, inputs, output):
    ys, yt, temperature = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(ys, yt, stats)
    ctx.temperature = temperature


def _backward(ctx, grad, _grad_stats):
    ys, yt, stats = ctx.saved_tensors
    grad_s, grad_t = torch.ops.pyamalgam.channel_wise_loss_backward.default(grad, ys, yt, stats, ctx.temperature)
    return grad_s, grad_t, None


torch.library.register_autograd("pyamalgam::channel_wise_loss", _backward, setup_context=_setup_context)

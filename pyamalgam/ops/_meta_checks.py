"""The argument checks of csrc/checks.cpp, for the fake (meta) kernels.

FakeTensor tracing (torch.compile, torch.export, opcheck) runs the fake kernels instead of the
C++ ones, so they make the same checks with the same messages. They use ``torch._check``, which
also takes the symbolic sizes of dynamic shapes (a size relation becomes a guard or a runtime
assertion instead of a Python ``bool`` on a SymInt). Each function checks one op and its backward:
``grad`` is given for the backward, whose messages name the backward op.
"""
from __future__ import annotations

import math

import torch

from ._validate import FLOAT_DTYPES

__all__ = ["channel_coding", "feature_pair", "pairwise_affinity_loss", "pairwise_affinity_loss_saved",
           "pairwise_saved_shapes", "saved", "si_depth_loss", "soft_argmax_depth"]


def _check(op: str, cond, message) -> None:
    torch._check(cond, lambda: f"{op}: {message()}")


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    _check(op, t.dtype in FLOAT_DTYPES, lambda: (
        f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"))


def _dims(op: str, name: str, t: torch.Tensor, n: int) -> None:
    _check(op, t.dim() == n, lambda: f"{name} must have {n} dimensions, got shape {tuple(t.shape)}")


# Shapes are compared one size at a time: each may be symbolic, and each comparison its own check.
def _shape(op: str, name: str, t: torch.Tensor, expected, what: str) -> None:
    message = lambda: f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}"
    _check(op, t.dim() == len(expected), message)
    for got, want in zip(t.shape, expected):
        _check(op, got == want, message)


def _shape_of(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    message = lambda: f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
    _check(op, t.dim() == ref.dim(), message)
    for got, want in zip(t.shape, ref.shape):
        _check(op, got == want, message)


def _like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, attrs=("dtype", "device")) -> None:
    """t has ref's dtype and device (or the given attributes only)."""
    for attr in attrs:
        want, got = getattr(ref, attr), getattr(t, attr)
        _check(op, got == want,
               lambda a=attr, w=want, g=got: f"{name} must have the same {a} as {ref_name} ({w}), got {g}")


def _scalar_grad(op: str, grad: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _floating(op, "grad", grad)
    _check(op, grad.numel() == 1,
           lambda: f"grad must have one element (the loss is a scalar), got shape {tuple(grad.shape)}")
    _like(op, "grad", grad, ref_name, ref, attrs=("device",))


def channel_coding(x, w1, b1, w2, b2, grad=None) -> None:
    op = "channel_coding" if grad is None else "channel_coding_backward"
    _floating(op, "x", x)
    _dims(op, "x", x, 4)
    _dims(op, "w1", w1, 2)
    c, r = x.shape[1], w1.shape[0]
    _shape(op, "w1", w1, (r, c), "(R, C) with C = x.shape[1]")
    _shape(op, "b1", b1, (r,), "(R,) with R = w1.shape[0]")
    _shape(op, "w2", w2, (c, r), "(C, R)")
    _shape(op, "b2", b2, (c,), "(C,)")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _like(op, name, t, "x", x)
    if grad is not None:
        _floating(op, "grad", grad)
        _shape_of(op, "grad", grad, "x", x)
        _like(op, "grad", grad, "x", x, attrs=("device",))


def _format_float(value) -> str:
    """As C++ streams print a double (%g), e.g. 0, -1.5, nan."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def soft_argmax_depth(logits, bin_size, grad=None) -> None:
    op = "soft_argmax_depth" if grad is None else "soft_argmax_depth_backward"
    _floating(op, "logits", logits)
    _dims(op, "logits", logits, 4)
    _check(op, logits.shape[1] >= 1, lambda: (
        f"logits must have at least one depth bin (logits.shape[1] >= 1), got shape {tuple(logits.shape)}"))
    message = lambda: f"bin_size must be a finite number > 0, got {_format_float(bin_size)}"
    # Two comparisons rather than math.isfinite, which a symbolic float does not take.
    _check(op, bin_size > 0, message)
    _check(op, bin_size < math.inf, message)
    if grad is not None:
        b, _, h, w = logits.shape
        _floating(op, "grad", grad)
        _shape(op, "grad", grad, (b, h, w), "(B, H, W) of logits")
        _like(op, "grad", grad, "logits", logits, attrs=("device",))


def si_depth_loss(pred, target, mask, grad=None) -> None:
    op = "si_depth_loss" if grad is None else "si_depth_loss_backward"
    _floating(op, "pred", pred)
    _check(op, pred.dim() in (3, 4), lambda: f"pred must have 3 or 4 dimensions, got shape {tuple(pred.shape)}")
    _check(op, pred.dim() == 3 or pred.shape[1] == 1,
           lambda: f"pred must be (B, H, W) or (B, 1, H, W), got shape {tuple(pred.shape)}")
    _shape_of(op, "target", target, "pred", pred)
    _like(op, "target", target, "pred", pred)
    if mask is not None:
        _check(op, mask.dtype == torch.bool, lambda: f"mask must be a bool tensor, got {mask.dtype}")
        _shape_of(op, "mask", mask, "pred", pred)
        _like(op, "mask", mask, "pred", pred, attrs=("device",))
    if grad is not None:
        _scalar_grad(op, grad, "pred", pred)


def feature_pair(op: str, fs, ft) -> None:
    """fs (B, Cs, H, W) floating, ft (B, Ct, H, W) of its dtype and device (checks::check_feature_pair)."""
    _floating(op, "fs", fs)
    _dims(op, "fs", fs, 4)
    _dims(op, "ft", ft, 4)
    message = lambda: (
        "fs and ft must have the same batch and spatial sizes (channels may differ): "
        f"fs is {tuple(fs.shape)}, ft is {tuple(ft.shape)}")
    for i in (0, 2, 3):
        _check(op, fs.shape[i] == ft.shape[i], message)
    _like(op, "ft", ft, "fs", fs)


def pairwise_affinity_loss(fs, ft, patch, grad=None, op=None) -> None:
    op = op or ("pairwise_affinity_loss" if grad is None else "pairwise_affinity_loss_backward")
    feature_pair(op, fs, ft)
    _check(op, patch >= 1, lambda: f"patch must be >= 1, got {patch}")
    if grad is not None:
        _scalar_grad(op, grad, "fs", fs)


def pairwise_saved_shapes(fs, ft, patch) -> dict:
    """name -> (shape, dtype) of what pairwise_affinity_loss_for_backward returns after the loss
    (csrc/pairwise_affinity.cpp): the float64 nodes, [P | D] and the backward's coefficients."""
    b, cs, h, w = fs.shape
    ct = ft.shape[1]
    # The kernels' cell side (csrc/common.h node_patch); sym_min/sym_max take symbolic sizes.
    p = torch.sym_min(patch, torch.sym_max(torch.sym_max(h, w), 1))
    n = ((h + p - 1) // p) * ((w + p - 1) // p)
    cb, ca = torch.sym_max(cs, ct), torch.sym_min(cs, ct)
    gram = torch.float64 if fs.dtype == torch.float64 else torch.float32
    f64 = torch.float64
    return {"s_hat": ((b, n, cs), f64), "s_inv": ((b, n, 1), f64), "t_hat": ((b, n, ct), f64),
            "t_inv": ((b, n, 1), f64), "pd": ((b, n, 2 * cb), gram), "coef": ((b, 2 * cb, cb + ca), gram)}


# What the shapes are, in the messages (as csrc/checks.cpp words them).
_SAVED_WHAT = {"s_hat": "(B, N, Cs): N nodes of fs", "s_inv": "(B, N, 1)", "t_hat": "(B, N, Ct)",
               "t_inv": "(B, N, 1)", "pd": "(B, N, 2 max(Cs, Ct))", "coef": "(B, 2 max(Cs, Ct), Cs + Ct)"}


def saved(op: str, name: str, t, dtype, shape, what: str, ref_name: str, ref) -> None:
    """A tensor a forward returned for its backward (checks::check_saved)."""
    _check(op, t.dtype == dtype,
           lambda: f"{name} must be a {str(dtype).removeprefix('torch.')} tensor (the forward's), got {t.dtype}")
    _shape(op, name, t, shape, what)
    _like(op, name, t, ref_name, ref, attrs=("device",))


def pairwise_affinity_loss_saved(grad, fs, ft, saved_tensors, patch) -> None:
    op = "pairwise_affinity_loss_saved_backward"
    pairwise_affinity_loss(fs, ft, patch, grad=grad, op=op)
    for (name, (shape, dtype)), t in zip(pairwise_saved_shapes(fs, ft, patch).items(), saved_tensors):
        saved(op, name, t, dtype, shape, _SAVED_WHAT[name], "fs", fs)

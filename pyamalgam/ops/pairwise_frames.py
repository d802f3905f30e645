"""Pair-wise-frames distillation (thesis 003, §5.3.2, Eq. 5.2), exact and linear in the number of nodes."""
from __future__ import annotations

import torch

from . import _meta_checks as checks
from . import _validate as v
from . import reference as ref
from ._meta_checks import _check

__all__ = ["pairwise_frames_loss"]

_INT64_MAX = 2**63 - 1
_NAMES = ("fs_t", "fs_k", "ft_t", "ft_k")


def pairwise_frames_loss(fs_t: torch.Tensor, fs_k: torch.Tensor, ft_t: torch.Tensor, ft_k: torch.Tensor,
                         patch: int = 1) -> torch.Tensor:
    """Pair-wise-frames (PF) distillation loss, thesis Eq. 5.2.

    The cross-frame affinity of a network is ``a_ij = cos(q_t^i, q_{t+k}^j)`` between node i of
    frame t and node j of frame t+k (the thesis' AT operator); the loss is the mean over all
    ``N^2`` node pairs of ``(a^S_ij - a^T_ij)^2``, averaged over the batch. Nodes are the
    non-overlapping ``patch x patch`` average pools of a map (``patch=1``: pixels, as the thesis;
    a ragged border cell averages what it has), L2-normalised (a zero node stays zero, so its
    affinities are 0 rather than NaN). An empty batch or map gives 0 and zero gradients.

    The N x N matrices are never formed: time O(N C^2), memory O(N C), float64 where cancellation
    lives (one Procrustes rotation of both frames, then the loss in the sum and difference of the
    aligned sides, so it stays exact when the student nears the teacher; csrc/cpu/pairwise_frames.cpp).
    The forward keeps what the backward needs, so the backward is one product and the adjoint of
    the pooling. CPU: fused operator. Other devices: a device-generic ATen path with the same
    algorithm and autograd; it has no kernel of its own and has never run on a GPU (docs/cuda.md).

    The thesis applies Eq. 5.2 to the segmentation maps Q (class probabilities); any feature maps
    work (pass probabilities to follow it; logits give other cosines).

    Args:
        fs_t, fs_k: the student's maps of frames t and t+k, (B, Cs, H, W) each.
        ft_t, ft_k: the teacher's maps of the same frames, (B, Ct, H, W) each; Ct may differ
            from Cs, B, H, W may not.
        patch: side of a node's cell in pixels (>= 1); one beyond the map makes one node per image.
    """
    for name, t in zip(_NAMES, (fs_t, fs_k, ft_t, ft_k)):
        v.map_any_device(name, t)
    patch = min(v.positive_int("patch", patch), _INT64_MAX)
    v.dims("fs_k", fs_k, fs_t.shape, "the shape of fs_t")
    v.dims("ft_k", ft_k, ft_t.shape, "the shape of ft_t")
    if fs_t.shape[0] != ft_t.shape[0] or fs_t.shape[2:] != ft_t.shape[2:]:
        raise ValueError("fs_t and ft_t must have the same batch and spatial sizes (channels may differ): "
                         f"fs_t is {tuple(fs_t.shape)}, ft_t is {tuple(ft_t.shape)}")
    v.same("device", "fs_t", fs_t, fs_k=fs_k, ft_t=ft_t, ft_k=ft_k)
    v.same("dtype", "fs_t", fs_t, fs_k=fs_k, ft_t=ft_t, ft_k=ft_k)
    if fs_t.device.type not in ("cpu", "meta"):
        return _pairwise_frames_generic(fs_t, fs_k, ft_t, ft_k, patch)
    return torch.ops.pyamalgam.pairwise_frames_loss_for_backward.default(fs_t, fs_k, ft_t, ft_k, patch)[0]


def _pairwise_frames_generic(fs_t, fs_k, ft_t, ft_k, patch):
    """The fused op's algorithm from ATen ops, on any device, with autograd.

    The rotation Q is detached: the loss is the same for every Q with orthonormal rows, so its
    gradient through Q is zero (and autograd through the SVD would divide by gaps between singular
    values)."""
    b = fs_t.shape[0]
    if b * fs_t.shape[2] * fs_t.shape[3] == 0:
        return sum(f.sum() for f in (fs_t, fs_k, ft_t, ft_k)) * 0
    gram = torch.float64 if fs_t.dtype == torch.float64 else torch.float32
    nodes = lambda f: ref.normalize_nodes(ref.pool_nodes(f.double(), patch))  # noqa: E731
    s, t = torch.cat([nodes(fs_t), nodes(fs_k)]), torch.cat([nodes(ft_t), nodes(ft_k)])
    a, bb = (t, s) if fs_t.shape[1] >= ft_t.shape[1] else (s, t)
    ab = (a.transpose(1, 2) @ bb).detach()
    u, _, vh = torch.linalg.svd(torch.nan_to_num(ab[:b] + ab[b:], 0.0, 0.0, 0.0), full_matrices=False)
    a_rot = a @ (u @ vh).repeat(2, 1, 1)
    p, d = (bb + a_rot).to(gram), (bb - a_rot).to(gram)
    g = lambda x, y: x.transpose(1, 2) @ y  # noqa: E731
    swap = lambda x: torch.cat([x[b:], x[:b]])  # noqa: E731  (each frame's slot: the other frame)
    gpp, gdd, gdp = g(p, p), g(d, d), g(d, p)
    rows = (gpp * swap(gdd)).sum((1, 2), dtype=torch.float64) + (gdp * swap(gdp).transpose(1, 2)).sum((1, 2), dtype=torch.float64)
    n = s.shape[1]
    return (0.25 * (rows[:b] + rows[b:]) / (n * n)).mean().to(fs_t.dtype)


# --- fake kernels (same checks and messages as csrc/checks_temporal.cpp) ----------------------------

def _fake_checks(op, fs_t, fs_k, ft_t, ft_k, patch, grad=None):
    checks._floating(op, "fs_t", fs_t)
    checks._dims(op, "fs_t", fs_t, 4)
    checks._shape_of(op, "fs_k", fs_k, "fs_t", fs_t)
    checks._dims(op, "ft_t", ft_t, 4)
    message = lambda: ("fs_t and ft_t must have the same batch and spatial sizes (channels may differ): "  # noqa: E731
                       f"fs_t is {tuple(fs_t.shape)}, ft_t is {tuple(ft_t.shape)}")
    for i in (0, 2, 3):
        _check(op, fs_t.shape[i] == ft_t.shape[i], message)
    checks._shape_of(op, "ft_k", ft_k, "ft_t", ft_t)
    for name, t in (("fs_k", fs_k), ("ft_t", ft_t), ("ft_k", ft_k)):
        checks._like(op, name, t, "fs_t", fs_t)
    _check(op, patch >= 1, lambda: f"patch must be >= 1, got {patch}")
    if grad is not None:
        checks._scalar_grad(op, grad, "fs_t", fs_t)


def saved_shapes(fs_t, ft_t, patch) -> dict:
    """name -> (shape, dtype) of what pairwise_frames_loss_for_backward returns after the loss:
    the single-frame op's saved tensors with the two frames stacked on the batch (2B)."""
    shapes = checks.pairwise_saved_shapes(fs_t, ft_t, patch)
    return {name: ((2 * shape[0], *shape[1:]), dtype) for name, (shape, dtype) in shapes.items()}


_SAVED_WHAT = {"s_hat": "(2B, N, Cs): N nodes of fs_t and fs_k", "s_inv": "(2B, N, 1)", "t_hat": "(2B, N, Ct)",
               "t_inv": "(2B, N, 1)", "pd": "(2B, N, 2 max(Cs, Ct))", "coef": "(2B, 2 max(Cs, Ct), Cs + Ct)"}


def _grads_like(*fs):
    return tuple(torch.empty_like(f, memory_format=v.dense_format(f)) for f in fs)


@torch.library.register_fake("pyamalgam::pairwise_frames_loss")
def _loss_fake(fs_t, fs_k, ft_t, ft_k, patch):
    _fake_checks("pairwise_frames_loss", fs_t, fs_k, ft_t, ft_k, patch)
    return fs_t.new_empty(())


@torch.library.register_fake("pyamalgam::pairwise_frames_loss_backward")
def _backward_fake(grad, fs_t, fs_k, ft_t, ft_k, patch):
    _fake_checks("pairwise_frames_loss_backward", fs_t, fs_k, ft_t, ft_k, patch, grad=grad)
    return _grads_like(fs_t, fs_k, ft_t, ft_k)


@torch.library.register_fake("pyamalgam::pairwise_frames_loss_for_backward")
def _for_backward_fake(fs_t, fs_k, ft_t, ft_k, patch):
    _fake_checks("pairwise_frames_loss_for_backward", fs_t, fs_k, ft_t, ft_k, patch)
    saved = [fs_t.new_empty(shape, dtype=dtype) for shape, dtype in saved_shapes(fs_t, ft_t, patch).values()]
    return (fs_t.new_empty(()), *saved)


@torch.library.register_fake("pyamalgam::pairwise_frames_loss_saved_backward")
def _saved_backward_fake(grad, fs_t, fs_k, ft_t, ft_k, s_hat, s_inv, t_hat, t_inv, pd, coef, patch):
    op = "pairwise_frames_loss_saved_backward"
    _fake_checks(op, fs_t, fs_k, ft_t, ft_k, patch, grad=grad)
    for (name, (shape, dtype)), t in zip(saved_shapes(fs_t, ft_t, patch).items(), (s_hat, s_inv, t_hat, t_inv, pd, coef)):
        checks.saved(op, name, t, dtype, shape, _SAVED_WHAT[name], "fs_t", fs_t)
    return _grads_like(fs_t, fs_k, ft_t, ft_k)


# --- autograd ------------------------------------------------------------------------------------------

# A direct call of pairwise_frames_loss with gradients: its backward op computes the forward again.
def _loss_setup_context(ctx, inputs, output):
    *maps, patch = inputs
    ctx.save_for_backward(*maps)
    ctx.patch = patch


def _loss_backward(ctx, grad):
    grads = torch.ops.pyamalgam.pairwise_frames_loss_backward.default(grad, *ctx.saved_tensors, ctx.patch)
    return (*grads, None)


torch.library.register_autograd("pyamalgam::pairwise_frames_loss", _loss_backward, setup_context=_loss_setup_context)


# The Python API's path: the forward returned what the backward needs (the maps only give it their
# shapes and layouts).
def _for_backward_setup_context(ctx, inputs, output):
    *maps, patch = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the six saved outputs
    ctx.save_for_backward(*maps, *output[1:])
    ctx.patch = patch


def _for_backward_backward(ctx, grad, *_saved_grads):
    if grad is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None
    grads = torch.ops.pyamalgam.pairwise_frames_loss_saved_backward.default(grad, *ctx.saved_tensors, ctx.patch)
    return (*grads, None)


torch.library.register_autograd("pyamalgam::pairwise_frames_loss_for_backward", _for_backward_backward,
                                setup_context=_for_backward_setup_context)

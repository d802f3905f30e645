"""Optical flow: the package's one definition of the flow convention, and backward warping.

Convention (used by :mod:`pyamalgam.data` clips, :mod:`pyamalgam.metrics.temporal` and the
temporal losses):

* ``flow`` is a float tensor (B, 2, H, W) **from frame t to frame t+k**, in **pixels**, channel 0
  the horizontal displacement (x, columns, to the right) and channel 1 the vertical one (y, rows,
  downwards): the pixel whose centre is at ``(u + 0.5, v + 0.5)`` in frame t (column ``u``, row
  ``v``; the renderer's pixel-centre convention) shows the same scene point as the position
  ``(u + 0.5 + flow[0, v, u], v + 0.5 + flow[1, v, u])`` of frame t+k.
* :func:`warp` is a **backward** warp: ``warp(x_{t+k}, flow_{t->t+k})`` samples frame t+k at those
  positions and so reproduces frame t at every pixel that is visible in both frames (thesis 003
  ch. 5 and its reference [63] compare the prediction at t with the warped one at t+k this way).

Sampling is :func:`torch.nn.functional.grid_sample` with ``align_corners=False`` (pixel ``u``
covers ``[u, u + 1)`` in the coordinates above, so the normalised coordinate of a position ``x``
is ``2 x / W - 1``) and ``padding_mode="border"``. The in-bounds mask is True where the sampled
position lies inside the image rectangle ``[0, W] x [0, H]`` (a position in the outer half pixel
is read from the border pixel, which is exact for ``"nearest"``).

Imports nothing from pyamalgam: every floor may use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FLOW_MODES", "flow_grid", "warp"]

#: The sampling modes of :func:`warp`.
FLOW_MODES = ("bilinear", "nearest")


def flow_grid(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``grid_sample`` grid (B, H, W, 2) of ``flow`` (B, 2, H, W) and its in-bounds mask (B, H, W).

    Non-finite flow vectors count as out of bounds, and their grid entry is set to the pixel's own
    centre, so the warped value stays finite (and their gradient is zero).
    """
    _check_flow(flow)
    b, _, h, w = flow.shape
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype) + 0.5
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype) + 0.5
    px = xs.view(1, 1, w) + flow[:, 0]  # sampled positions, in the pixel-edge coordinates above
    py = ys.view(1, h, 1) + flow[:, 1]
    inside = (px >= 0) & (px <= w) & (py >= 0) & (py <= h)  # False for NaN too
    finite = torch.isfinite(px) & torch.isfinite(py)
    px = torch.where(finite, px, xs.view(1, 1, w).expand_as(px))
    py = torch.where(finite, py, ys.view(1, h, 1).expand_as(py))
    grid = torch.stack([2.0 * px / w - 1.0, 2.0 * py / h - 1.0], dim=-1)
    return grid, inside


def warp(x: torch.Tensor, flow: torch.Tensor, *, mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``x`` (frame t+k) with ``flow`` (t -> t+k): returns ``(warped, in_bounds)``.

    Args:
        x: (B, C, H, W) or (B, H, W) tensor of frame t+k. Float tensors are sampled in their own
            dtype; integer and bool tensors (labels, masks) need ``mode="nearest"`` and keep their
            dtype.
        flow: float (B, 2, H, W) flow from frame t to frame t+k in pixels, x then y (module
            docstring); same batch size, height, width and device as ``x``.
        mode: ``"bilinear"`` (differentiable in ``x`` and ``flow``) or ``"nearest"``.

    Returns:
        ``warped``, shaped and typed like ``x`` (frame t+k seen from frame t), and ``in_bounds``,
        bool (B, H, W): where the flow lands inside frame t+k. Occlusion is not detected here;
        combine ``in_bounds`` with an occlusion mask (exact for the synthetic clips).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if mode not in FLOW_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, FLOW_MODES))}, got {mode!r}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    grid, inside = flow_grid(flow)
    squeeze = x.dim() == 3
    xb = x.unsqueeze(1) if squeeze else x
    if xb.shape[0] != flow.shape[0] or xb.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x {tuple(x.shape)} and flow {tuple(flow.shape)} must have the same batch size, "
                         f"height and width")
    if x.device != flow.device:
        raise ValueError(f"x is on {x.device} and flow on {flow.device}: they must be on the same device")
    discrete = not x.is_floating_point()
    if discrete and mode != "nearest":
        raise ValueError(f"x of dtype {x.dtype} (labels or a mask) can only be warped with mode='nearest'")
    if x.is_complex():
        raise TypeError("x must be a real tensor, got a complex one")
    # labels up to 2**24 are exact in float32; float64 keeps any int64 id below 2**53 exact
    src = xb.to(torch.float64) if discrete else xb
    out = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="border", align_corners=False)
    if discrete:
        out = out.round().to(x.dtype)
    return (out.squeeze(1) if squeeze else out), inside


def _check_flow(flow) -> None:
    if not isinstance(flow, torch.Tensor):
        raise TypeError(f"flow must be a torch.Tensor, got {type(flow).__name__}")
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (B, 2, H, W) (x then y displacement in pixels), got shape {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise TypeError(f"flow must be a floating-point tensor, got {flow.dtype}")
    if 0 in flow.shape:
        raise ValueError(f"flow must not be empty, got shape {tuple(flow.shape)}")

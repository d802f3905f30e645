"""Task heads: what follows the last block of an encoder-decoder (paper 001, §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import soft_argmax_depth

__all__ = ["SegmentationHead", "DepthHead", "NormalHead", "EdgeHead", "KeypointHead"]


class SegmentationHead(nn.Module):
    """Per-pixel class logits (B, K, H, W), SegNet's final 3x3 convolution."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class DepthHead(nn.Module):
    """Depth as classification over N_d bins, decoded to metres by Eq. 2 (soft-argmax).

    Args:
        in_channels: channels of the last block.
        num_bins: N_d.
        max_depth: depth range covered by the bins; the bin size is l = max_depth / N_d, so the
            decoded depth lies in [l, max_depth].
    """

    def __init__(self, in_channels: int, num_bins: int = 64, max_depth: float = 10.0):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if not max_depth > 0:
            raise ValueError(f"max_depth must be > 0, got {max_depth}")
        self.conv = nn.Conv2d(in_channels, num_bins, 3, padding=1)
        self.bin_size = float(max_depth) / num_bins

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x):
        # Decoded in float32: the soft-argmax sums N_d products, too coarse in bf16.
        return soft_argmax_depth(self.conv(x).float(), self.bin_size)


class NormalHead(nn.Module):
    """Unit surface normals (B, 3, H, W): a 3x3 convolution, L2-normalised per pixel."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3, 3, padding=1)

    def forward(self, x):
        return F.normalize(self.conv(x).float(), dim=1, eps=1e-6)


class EdgeHead(nn.Module):
    """Edge probabilities (B, H, W) in [0, 1]: a 3x3 convolution to one channel and a sigmoid
    (HED's side outputs), for :func:`pyamalgam.losses.edge_loss`. Seed 002 describes no head;
    this mirrors the other one-convolution heads."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x).float()).squeeze(1)


class KeypointHead(nn.Module):
    """A key-point heat-map (B, H, W): a 3x3 convolution to one channel, linear (unbounded, as
    heat-map regression usually is), for :func:`pyamalgam.losses.keypoint_loss` (MSE)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).float().squeeze(1)

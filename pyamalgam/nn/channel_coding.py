"""The channel-coding module of paper 001 (§5.1.1, Fig. 3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import channel_coding


class ChannelCoding(nn.Module):
    """Projects amalgamated features into one teacher's domain (S-, D-, M-, U-channel coding).

    Global average pooling, FC (C -> C // reduction), ReLU, FC (-> C), sigmoid, channel rescale;
    fused into one operator, :func:`pyamalgam.ops.channel_coding`. Adds ``2 C R + C + R``
    parameters, a few percent of a VGG block (the paper reports < 4% in total).

    Args:
        channels: C, the channels of the features it codes.
        reduction: C / R, the squeeze ratio (R is at least 1).
        gate: None (default) initialises both FC layers like ``nn.Linear``, so the initial gates
            are about 0.5 with some noise; a number in (0, 1) starts every gate at exactly that
            value (``w2 = 0``, ``b2 = logit(gate)``), a near-identity projection for gate near 1.
            The paper does not say how the codings are initialised.
    """

    def __init__(self, channels: int, reduction: int = 4, *, gate=None, device=None, dtype=None):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if gate is not None and not 0 < gate < 1:
            raise ValueError(f"gate must be in (0, 1) or None, got {gate!r}")
        self.channels = channels
        self.gate = gate
        self.hidden = max(1, channels // reduction)
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(self.hidden, channels, **kw))
        self.b1 = nn.Parameter(torch.empty(self.hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(channels, self.hidden, **kw))
        self.b2 = nn.Parameter(torch.empty(channels, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation for both FC layers.
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(b, -bound, bound)
        if self.gate is not None:  # sigmoid(0 * h + logit(gate)) = gate for every input
            nn.init.zeros_(self.w2)
            nn.init.constant_(self.b2, math.log(self.gate / (1 - self.gate)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ChannelCoding({self.channels}) expects x of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        return channel_coding(x, self.w1, self.b1, self.w2, self.b2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"

"""ConvLSTM (Shi et al., 2015; thesis 003's [124]), the recurrent unit of the multi-frame loss (thesis §5.3.2)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_float, check_int, frame_list

__all__ = ["ConvLSTM"]


class ConvLSTM(nn.Module):
    """One ConvLSTM cell run over a sequence of maps; returns the embedding of every time step.

    Gates ``i, f, o, g = conv([x_t, h_{t-1}])`` (one ``kernel_size`` convolution, same padding),
    ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)``, ``h_t = sigmoid(o) tanh(c_t)``, from zero
    states. The thesis (§5.3.2) turns the hidden state into an embedding ``E_t`` in R^{D_e}
    without saying how; we take the spatial mean of ``h_t`` (D_e = ``hidden`` channels), which
    makes E independent of the map size. Shi et al.'s peephole terms (``W_c o c``) are left out,
    as in most implementations; the thesis does not say.

    ``clip_()`` clamps every weight and bias to ``[-clip, clip]``: the thesis clips the weights
    "between a certain range" to keep the unit from collapsing, without the range; call it after
    each optimizer step (like a WGAN critic's clipping). The weights start clipped.

    Args:
        in_channels: channels of each input map (1 for the thesis' self-affinity maps).
        hidden: D_e, the hidden channels and the embedding length.
        kernel_size: odd side of the gate convolution.
        clip: the weight bound (> 0), or None for no clipping.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 16, kernel_size: int = 3, clip: float | None = 0.1):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1)
        kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.clip = None if clip is None else check_float("clip", clip, positive=True)
        self.gates = nn.Conv2d(self.in_channels + self.hidden, 4 * self.hidden, kernel_size, padding=kernel_size // 2)
        self.clip_()

    @torch.no_grad()
    def clip_(self) -> ConvLSTM:
        """Clamp the weights and biases to ``[-clip, clip]`` in place (nothing when clip is None)."""
        if self.clip is not None:
            for p in self.parameters():
                p.clamp_(-self.clip, self.clip)
        return self

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One time step: ``x`` (B, in_channels, H, W) -> ``(h, c)``, each (B, hidden, H, W)."""
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            state = (zeros, zeros)
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``maps``: a sequence of T maps (B, in_channels, H, W), or one (B, T, in_channels, H, W)
        tensor. Returns the embeddings E_1..E_T, (B, T, hidden); E_T = ``out[:, -1]``."""
        maps = frame_list("maps", maps, "time step")
        for t, x in enumerate(maps):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"maps[{t}] must be (B, {self.in_channels}, H, W), got {got}")
            if x.shape != maps[0].shape:
                raise ValueError(f"maps[{t}] has shape {tuple(x.shape)}, maps[0] {tuple(maps[0].shape)}: all steps must agree")
        state, out = None, []
        for x in maps:
            state = self.step(x, state)
            out.append(state[0].mean(dim=(2, 3)))
        return torch.stack(out, dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, hidden={self.hidden}, clip={self.clip}"

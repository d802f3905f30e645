"""The conditional critic of holistic distillation (thesis 003, §3.3.1, Fig. 3.4, Tables 3.3-3.4).

``D(Q | I)``: a fully convolutional network that scores how well a prediction map Q matches the
image I. The thesis' design, and where we deviate (the WGAN-GP penalty, Gulrajani et al. 2017 =
the thesis' [40], needs a critic whose score of one image does not depend on the rest of the batch):

* **Input** (§3.3.1, Table 3.3): ``norm(concat(Q, I))``. The thesis puts a BatchNorm on the
  concatenation ("to handle the different scales of the RGB image and the logits"; without it
  mIoU drops from 74.08 to 71.03). Ours, :class:`RunningInputNorm`, is a per-channel affine
  normalisation by *running* statistics that only :meth:`Discriminator.update_input_stats`
  changes (the holistic module calls it once per critic step, on the teacher's and the student's
  maps together): a forward never normalises by its own batch, so every score is a per-sample
  function (the penalty is exact, B = 1 works) and teacher and student maps share one scale.
* **Q, the "score map"**: ``score_map="logits"`` (default) feeds the map as given: the raw logits
  for segmentation, as the thesis (§3.2: "the ground truth for the discriminator is the teacher
  network's logits, which are real-valued") and the public code do; for regression maps (depth,
  normals; §3.3.3 "the holistic distillation uses the depth map as input") the raw map.
  ``score_map="softmax"`` feeds softmax over the channels (class probabilities) instead.
* **Body** (Fig. 3.4, Table 3.4): ``AnLm`` is n self-attention blocks and m stride-2 residual
  blocks; a last 3x3 convolution (the output block, no norm, no activation) gives a score map
  and an average pool the score. A2L4 (the thesis' choice) is 4 residual blocks + the output conv,
  the thesis' "five convolutions", with the two attention blocks "between the final three
  layers": after residual blocks 3 and 4. For n attention blocks we put them after the last n
  residual blocks (n <= m); Fig. 3.4's drawing of the other variants is not in our copy.
  Widths double per block from ``width`` (64: 64, 128, 256, 512, attention at 256 and 512 as in
  the public code's ``sagan_models.Discriminator``).
* **Residual block**: ResNet's basic block with stride 2 (3x3 s2 conv, norm, ReLU, 3x3 conv, norm;
  a 1x1 s2 projection shortcut; ReLU after the sum). The thesis' blocks have "ReLU and BN
  layers"; batch statistics are what WGAN-GP forbids, so ``norm="layer"`` (default) uses layer
  normalisation over (C, H, W) per sample (``GroupNorm(1, C)``), WGAN-GP's recommended drop-in
  replacement; ``norm="none"`` uses none. No spectral norm (the public code has it; the thesis
  and WGAN-GP do not).
* **Self-attention**: SAGAN (Zhang et al., the thesis' [167]): 1x1 query/key convs to
  ``max(1, C // 8)`` channels, a 1x1 value conv, softmax over positions of the (unscaled) dot
  products, ``x + gamma * attention(x)`` with ``gamma`` starting at 0. It forms the N x N matrix
  explicitly (N = positions at that depth): the penalty needs second derivatives, which the fused
  attention kernels do not have.

Odd H, W and 1x1 maps work (every stride-2 layer rounds up: ceil(H / 2)).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_map

__all__ = [
    "Discriminator",
    "RunningInputNorm",
    "SelfAttention2d",
    "check_critic_inputs",
    "discriminator_a0l4",
    "discriminator_a2l2",
    "discriminator_a2l4",
]

_NORMS = ("layer", "none")
_SCORE_MAPS = ("logits", "softmax")


def check_critic_inputs(score_map, image, num_classes: int, in_chans: int, map_name: str = "score_map") -> None:
    """A clear error naming the argument unless ``score_map`` is (B, num_classes, H, W) floating
    point and ``image`` (B, in_chans, H, W) on its device (``image`` is not read when in_chans is 0)."""
    check_map(map_name, score_map)
    if score_map.shape[1] != num_classes:
        raise ValueError(f"{map_name} must have num_classes={num_classes} channels (the critic's), got shape "
                         f"{tuple(score_map.shape)}")
    if score_map.shape[0] == 0:
        raise ValueError(f"{map_name} is an empty batch (shape {tuple(score_map.shape)}): the critic's mean score "
                         f"of no image is undefined")
    if in_chans == 0:
        return
    check_map("image", image)
    if image.shape[1] != in_chans:
        raise ValueError(f"image must have in_chans={in_chans} channels, got shape {tuple(image.shape)}")
    if (image.shape[0], *image.shape[2:]) != (score_map.shape[0], *score_map.shape[2:]):
        raise ValueError(f"image and {map_name} must have the same batch and spatial sizes (interpolate the map "
                         f"first): image is {tuple(image.shape)}, {map_name} is {tuple(score_map.shape)}")
    if image.device != score_map.device:
        raise ValueError(f"image must be on the device of {map_name} ({score_map.device}), got {image.device}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RunningInputNorm(nn.Module):
    """Per-channel ``(x - mean) / sqrt(var + eps) * weight + bias`` with running statistics.

    The statistics change only in :meth:`update` (the first call sets them to that batch's, later
    ones move them by ``momentum``, as BatchNorm's running averages; unbiased variance), never in
    :meth:`forward`: the output of one sample never depends on the others'. Under
    torch.distributed the batch moments are summed over ranks first, so every rank keeps the same.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.channels = check_int("channels", channels, minimum=1)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the batch statistics of ``x`` (B, C, H, W) into the running ones."""
        x = x.detach().to(torch.float64)
        count = torch.tensor(float(x.numel() // self.channels), dtype=torch.float64, device=x.device)
        moments = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)), count[None]])
        if _distributed():
            dist.all_reduce(moments)
        s, ss, n = moments[: self.channels], moments[self.channels: -1], float(moments[-1])
        if n == 0:
            return
        mean = s / n
        # float64 moments: the one-pass variance keeps its digits for image-scale values (0..255).
        var = ((ss - n * mean.square()) / max(n - 1.0, 1.0)).clamp_min(0)
        m = 1.0 if int(self.num_batches_tracked) == 0 else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean), m)
        self.running_var.lerp_(var.to(self.running_var), m)
        self.num_batches_tracked += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, momentum={self.momentum}, eps={self.eps}"


class SelfAttention2d(nn.Module):
    """SAGAN self-attention (Zhang et al. 2018, thesis [167]): ``x + gamma * o``, with
    ``o_i = sum_j softmax_j(q_i . k_j) v_j`` over the H*W positions and ``gamma`` starting at 0
    (so a new block is the identity). q, k: 1x1 convs to ``max(1, C // reduction)`` channels."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        channels = check_int("channels", channels, minimum=1)
        inner = max(1, channels // check_int("reduction", reduction, minimum=1))
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k = self.key(x).flatten(2)  # (B, C', N)
        attention = torch.softmax(torch.bmm(q, k), dim=-1)  # row i: the weights of every j for i
        out = torch.bmm(self.value(x).flatten(2), attention.transpose(1, 2))  # (B, C, N)
        return x + self.gamma * out.view(b, c, h, w)


class _ResidualDown(nn.Module):
    """ResNet basic block with stride 2 and a 1x1 stride-2 projection shortcut."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        make_norm = (lambda c: nn.GroupNorm(1, c)) if norm == "layer" else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm1 = make_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = make_norm(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class Discriminator(nn.Module):
    """The conditional critic ``D(Q | I)`` of thesis §3.3.1 in its ``AnLm`` family (module docstring).

    ``forward(score_map, image) -> (B,)``: the score of each image (the average-pooled score map;
    :meth:`score_map_of` returns the map). ``update_input_stats(score_map, image)`` moves the
    input normalisation's running statistics (call it in the critic's training step, not in the
    student's).

    Args:
        num_classes: channels of the prediction map (classes, depth bins, 1 for depth, 3 for normals).
        in_chans: channels of the image; 0 makes the critic unconditional (Table 3.3's rows
            without "Conditional"; ``image`` is then not read).
        attention: n, the self-attention blocks (after the last n residual blocks), 0 <= n <= blocks.
        blocks: m, the stride-2 residual blocks (>= 1).
        width: channels of the first block; each block doubles them.
        norm: "layer" (per-sample LayerNorm over C, H, W; default) or "none" in the residual blocks.
        score_map: "logits" (the map as given; default) or "softmax" (over its channels).
        input_norm: the normalisation of the concatenated input (Table 3.3's "BN"); False feeds it raw.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, *, attention: int = 2, blocks: int = 4,
                 width: int = 64, norm: str = "layer", score_map: str = "logits", input_norm: bool = True):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.in_chans = check_int("in_chans", in_chans, minimum=0)
        self.blocks_count = check_int("blocks", blocks, minimum=1)
        self.attention_count = check_int("attention", attention, minimum=0)
        if self.attention_count > self.blocks_count:
            raise ValueError(f"attention must be <= blocks (one block per residual block at most), got "
                             f"attention={attention}, blocks={blocks}")
        width = check_int("width", width, minimum=1)
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if score_map not in _SCORE_MAPS:
            raise ValueError(f"score_map must be one of {_SCORE_MAPS}, got {score_map!r}")
        if not isinstance(input_norm, bool):
            raise TypeError(f"input_norm must be a bool, got {type(input_norm).__name__}")
        self.norm, self.score_map, self.width = norm, score_map, width
        cin = self.num_classes + self.in_chans
        self.input_norm = RunningInputNorm(cin) if input_norm else None
        layers = []
        for i in range(self.blocks_count):
            cout = width * 2 ** i
            layers.append(_ResidualDown(cin, cout, norm))
            if i >= self.blocks_count - self.attention_count:
                layers.append(SelfAttention2d(cout))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, 3, padding=1)  # the output block: no norm, no activation

    @property
    def arch(self) -> str:
        """The thesis' index of this critic, e.g. "A2L4"."""
        return f"A{self.attention_count}L{self.blocks_count}"

    def _inputs(self, score_map: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        check_critic_inputs(score_map, image, self.num_classes, self.in_chans)
        q = torch.softmax(score_map, dim=1) if self.score_map == "softmax" else score_map
        return q if self.in_chans == 0 else torch.cat([q, image.to(q.dtype)], dim=1)

    def score_map_of(self, score_map: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The critic's output map (B, 1, ceil(H / 2^m), ceil(W / 2^m)), before the average pool."""
        x = self._inputs(score_map, image)
        if self.input_norm is not None:
            x = self.input_norm(x)
        return self.head(self.body(x))

    def forward(self, score_map: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_map_of(score_map, image).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def update_input_stats(self, score_map: torch.Tensor, image: torch.Tensor | None = None) -> None:
        """Fold this batch into the input normalisation's running statistics (no-op without one)."""
        if self.input_norm is not None:
            self.input_norm.update(self._inputs(score_map, image))

    def extra_repr(self) -> str:
        return (f"{self.arch}, num_classes={self.num_classes}, in_chans={self.in_chans}, width={self.width}, "
                f"norm={self.norm!r}, score_map={self.score_map!r}")


def discriminator_a2l4(num_classes: int, in_chans: int = 3, **kwargs) -> Discriminator:
    """The thesis' critic (Table 3.4, "A2L4 (ours)"): 4 residual blocks, attention after the last 2."""
    return Discriminator(num_classes, in_chans, attention=2, blocks=4, **kwargs)


def discriminator_a0l4(num_classes: int, in_chans: int = 3, **kwargs) -> Discriminator:
    """Table 3.5's D_no_attention: 4 residual blocks, no attention."""
    return Discriminator(num_classes, in_chans, attention=0, blocks=4, **kwargs)


def discriminator_a2l2(num_classes: int, in_chans: int = 3, **kwargs) -> Discriminator:
    """Table 3.5's D_shallow: 2 residual blocks, each followed by attention."""
    return Discriminator(num_classes, in_chans, attention=2, blocks=2, **kwargs)

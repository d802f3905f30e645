"""Reference teachers: a VGG encoder-decoder as a :class:`SequentialBlockNet` (paper 001, §4, §5.1.1).

Layout for ``depth`` pooling stages (5 for SegNet-VGG16), N = 2 * depth blocks::

    block   1 .. depth           encoder level k = block n: [2x2 max-pool] + 2-3 conv3x3-BN-ReLU
    block   depth+1 .. 2*depth   decoder level k = block 2*depth+1-k: up-sample + 2-3 convs
    head                         task head on the full-resolution features of block N

A block's features all have one resolution, H / 2^(k-1) at level k, so the pooling that ends
an encoder level opens the next block, and the deepest pooling opens the first decoder block
(together with its up-sampling). Encoder and decoder are symmetric: block n and block N+1-n have
the same resolution. H and W must be divisible by 2^depth.

Two decoders, to show the side information the protocol carries:

* ``"unpool"`` (SegNet): up-sampling by max-unpooling with the encoder's pooling indices,
  side keys ``"pool{k}"``.
* ``"concat"`` (U-Net style): nearest up-sampling, then concatenation of the encoder features
  of the same level, side keys ``"skip{k}"``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import (
    DepthTask,
    EdgeTask,
    KeypointTask,
    NormalTask,
    SegmentationTask,
    get_task,
)
from .heads import DepthHead, EdgeHead, KeypointHead, NormalHead, SegmentationHead
from .sequential import SequentialBlockNet

__all__ = ["DecoderBlock", "EncoderBlock", "VGGEncoderDecoder", "segnet_vgg", "unet_vgg"]

VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)


def segnet_vgg(task: str = "segmentation", *, width: float = 1.0, depth: int = 5, **kwargs) -> VGGEncoderDecoder:
    """SegNet (VGG16-BN encoder, mirrored decoder with max-unpooling) for ``task``.

    ``width`` scales every channel count (1/16 gives a CPU-sized toy), ``depth`` is the number of
    pooling stages. Other keywords go to :class:`VGGEncoderDecoder` (``num_classes``,
    ``num_bins``, ``max_depth``, ``in_chans``, ``name``). With width 1 and depth 5: 29.50 M
    parameters (40 classes), 29.52 M (64 depth bins), 29.48 M (normals); the paper's pair of
    teachers is ~55.6 M.
    """
    return VGGEncoderDecoder(task, width=width, depth=depth, decoder="unpool", **kwargs)


def unet_vgg(task: str = "segmentation", *, width: float = 1.0, depth: int = 5, **kwargs) -> VGGEncoderDecoder:
    """U-Net-style variant: same blocks, nearest up-sampling and concatenated skip features.

    The decoder convolutions see twice the channels: 35.0 M parameters at width 1, depth 5.
    """
    return VGGEncoderDecoder(task, width=width, depth=depth, decoder="concat", **kwargs)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions with zero bias and unit BatchNorm (VGG / SegNet
    practice): the initialisation of the VGG encoder-decoders, single- and multi-task."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VGGEncoderDecoder(SequentialBlockNet):
    """VGG encoder-decoder teacher with a task head: a chain of blocks (:class:`SequentialBlockNet`).

    Args:
        task: "segmentation", "depth", "normals", "edges", "keypoints", or another
            :class:`pyamalgam.losses.Task` (then ``head`` must be given).
        width: channel multiplier (channels are rounded, at least 1).
        depth: pooling stages (1..5); blocks N = 2 * depth.
        decoder: "unpool" (SegNet, pooling indices) or "concat" (U-Net, skip features).
        num_classes: classes of the segmentation head.
        num_bins, max_depth: N_d and the range of the depth head (Eq. 2).
        in_chans: input channels.
        channels, convs: per-level widths and conv counts (VGG16 by default).
        head: a custom head module (replaces the one implied by ``task``).
        name: output name of the task (defaults "seg", "depth", "normal", "edges", "keypoints").
    """

    def __init__(
        self,
        task="segmentation",
        *,
        width: float = 1.0,
        depth: int = 5,
        decoder: str = "unpool",
        num_classes: int = 40,
        num_bins: int = 64,
        max_depth: float = 10.0,
        in_chans: int = 3,
        channels: Sequence[int] = VGG16_CHANNELS,
        convs: Sequence[int] = VGG16_CONVS,
        head: nn.Module | None = None,
        name: str | None = None,
    ):
        _check_config(width, depth, decoder, channels, convs)
        ch = [max(1, round(c * width)) for c in channels[:depth]]
        blocks = [EncoderBlock(k, in_chans if k == 1 else ch[k - 2], ch[k - 1], convs[k - 1], decoder) for k in range(1, depth + 1)]
        blocks += [
            DecoderBlock(k, ch[k - 1], ch[max(k - 2, 0)], convs[k - 1], decoder, deepest=k == depth)
            for k in range(depth, 0, -1)
        ]
        task = get_task(task, name)
        head = head if head is not None else _default_head(task, ch[0], num_classes, num_bins, max_depth)
        super().__init__(blocks, head, task, size_divisor=2**depth, in_chans=in_chans)
        self.depth = depth
        self.decoder = decoder
        self.channels = tuple(ch)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convolutions, unit BatchNorm (VGG / SegNet practice); the one-channel edge
        and key-point heads start small (see below)."""
        kaiming_init(self)
        if isinstance(self.head, (EdgeHead, KeypointHead)):
            # one output channel after Kaiming fan-out (std sqrt(2/9)) starts at |outputs| ~ 4: a
            # saturated sigmoid, a heat-map far from its mostly-zero target. Start near p = 0.5 / 0.
            nn.init.normal_(self.head.conv.weight, std=1e-3)
            nn.init.zeros_(self.head.conv.bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # also resets BatchNorm running statistics
        self.init_weights()

    def extra_repr(self) -> str:
        return f"task={self.task.name!r}, depth={self.depth}, decoder={self.decoder!r}, channels={self.channels}"


class EncoderBlock(nn.Module):
    """Encoder level k: the pooling that closes level k-1 (k > 1), then the level's convs."""

    def __init__(self, level: int, in_channels: int, out_channels: int, num_convs: int, decoder: str):
        super().__init__()
        self.level = level
        self.decoder = decoder
        self.convs = _conv_stack(in_channels, out_channels, out_channels, num_convs)

    def forward(self, x, side):
        if self.level > 1:
            x = _pool(x, self.level - 1, side, self.decoder)
        x = self.convs(x)
        if self.decoder == "concat":
            side[f"skip{self.level}"] = x
        return x


class DecoderBlock(nn.Module):
    """Decoder level k: up-sample to level k's resolution, then the level's convs.

    The deepest decoder block first applies the encoder's last pooling, so that this block's
    input and output both live at a block resolution.
    """

    def __init__(self, level: int, channels: int, out_channels: int, num_convs: int, decoder: str, deepest: bool):
        super().__init__()
        self.level = level
        self.decoder = decoder
        self.deepest = deepest
        in_channels = 2 * channels if decoder == "concat" else channels
        self.convs = _conv_stack(in_channels, channels, out_channels, num_convs)

    def forward(self, x, side):
        if self.deepest:
            side = dict(side)  # the deepest pooling is private to this block
            x = _pool(x, self.level, side, self.decoder)
        if self.decoder == "unpool":
            x = F.max_unpool2d(x, _side(side, f"pool{self.level}"), 2, 2)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = torch.cat([x, _side(side, f"skip{self.level}")], dim=1)
        return self.convs(x)


def _pool(x, level, side, decoder):
    if decoder == "unpool":
        x, side[f"pool{level}"] = F.max_pool2d(x, 2, 2, return_indices=True)
        return x
    return F.max_pool2d(x, 2, 2)


def _side(side, key):
    try:
        return side[key]
    except KeyError:
        raise KeyError(f"side information {key!r} is missing; run the blocks that produce it first (got keys {sorted(side)})") from None


def _conv_stack(in_channels: int, mid_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    layers = []
    for i in range(num_convs):
        cin = in_channels if i == 0 else mid_channels
        cout = out_channels if i == num_convs - 1 else mid_channels
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _default_head(task, channels, num_classes, num_bins, max_depth):
    if isinstance(task, SegmentationTask):
        return SegmentationHead(channels, num_classes)
    if isinstance(task, DepthTask):
        return DepthHead(channels, num_bins, max_depth)
    if isinstance(task, NormalTask):
        return NormalHead(channels)
    if isinstance(task, EdgeTask):
        return EdgeHead(channels)
    if isinstance(task, KeypointTask):
        return KeypointHead(channels)
    raise ValueError(f"task {task!r} has no default head; pass head=")


def _check_config(width, depth, decoder, channels, convs):
    if not isinstance(depth, int) or not 1 <= depth <= min(len(channels), len(convs)):
        raise ValueError(f"depth must be an int in [1, {min(len(channels), len(convs))}], got {depth!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if decoder not in ("unpool", "concat"):
        raise ValueError(f"decoder must be 'unpool' or 'concat', got {decoder!r}")
    if any(c < 1 for c in convs[:depth]):
        raise ValueError(f"convs must be >= 1 per level, got {tuple(convs)}")

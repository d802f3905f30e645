"""Encoder-decoders of segmentation-models-pytorch (smp) in the block protocol (issue 13).

:func:`from_smp` cuts an smp model into the blocks of paper 001, §3 (the layers between two
resolution changes): one block per encoder stage, then one per decoder stage, then the task head.
The encoder's skip features are side information (``"skip{k}"``, the output of encoder stage k),
exactly what the U-Net style teachers of :mod:`pyamalgam.models.vgg` carry. The blocks *share*
the smp model's modules (no copy; encoder layers past ``encoder_depth``, which smp keeps but never
runs, are left out), so the wrapped network computes what the model computes, bit for bit: ``forward_from(*forward_until(x, n), n)`` equals ``model(x)`` at every n (tested).

What is split (N = number of blocks, D = ``encoder_depth``):

* encoders: ResNet / ResNeXt (smp's ``ResNetEncoder``): stage 1 = conv1-bn-relu (H/2), stage 2 =
  max-pool + layer1 (H/4), stages 3..5 = layer2..layer4;
* ``smp.Unet``: N = 2D; decoder block i up-samples to the next skip's size (to 2x for the last)
  and concatenates that skip; the VGG encoders' centre block would open the first decoder block;
* ``smp.FPN``: N = D + 4; the top-down path p5..p2 is four blocks, each writing its segmentation
  branch (``"pyramid{j}"``) for the merge, which closes the last block;
* ``smp.DeepLabV3Plus``: N = D + 2 (ASPP; up-sampling + fusion with ``"skip2"``);
  ``smp.DeepLabV3``: N = D + 1 (ASPP).

Anything else is refused with the reason. smp is an optional dependency
(``pip install "pyamalgam[smp]"``), imported only when :func:`from_smp` is called.
"""
from __future__ import annotations

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
from ..ops import soft_argmax_depth
from .sequential import SequentialBlockNet

__all__ = ["SMPBlockNet", "SMPHead", "from_smp", "split_blocks"]

INSTALL_HINT = 'pip install "pyamalgam[smp]" (or pip install segmentation-models-pytorch)'


def import_smp():
    """The smp package, or an ImportError that says how to install it."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError(f"pyamalgam.models.from_smp needs segmentation-models-pytorch: {INSTALL_HINT}") from e
    return smp


class SMPBlockNet(SequentialBlockNet):
    """An smp model as a :class:`SequentialBlockNet` (built by :func:`from_smp`).

    ``architecture`` (e.g. ``"Unet"``) and ``encoder`` (e.g. ``"ResNetEncoder"``) say what was
    wrapped; ``encoder_depth`` is D.
    """

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, encoder={self.encoder!r}, encoder_depth={self.encoder_depth}"


def from_smp(model: nn.Module, task="segmentation", *, name: str | None = None, max_depth: float = 10.0) -> SMPBlockNet:
    """Wrap an smp encoder-decoder into the block protocol, a teacher (and a student template).

    Args:
        model: an ``smp.Unet``, ``smp.FPN``, ``smp.DeepLabV3Plus`` or ``smp.DeepLabV3`` with a
            ResNet/ResNeXt encoder, without ``aux_params`` and with ``activation=None`` (the task
            decodes the raw output itself). Its modules are shared, not copied.
        task: what the head predicts, mapping smp's raw ``classes`` outputs onto the tasks of
            :mod:`pyamalgam.losses`:

            * ``"segmentation"``: the raw output are the logits (K = ``classes``), Eq. 1;
            * ``"depth"``: the raw output are N_d = ``classes`` >= 2 bin logits, decoded to metres
              by the soft-argmax of Eq. 2 with bin size ``max_depth / classes`` (as
              :class:`~pyamalgam.models.DepthHead` does), so that :class:`DepthTask` (Eq. 3)
              scores it; a 1-channel regression output is refused (Eq. 2 needs bins);
            * ``"normals"``: ``classes`` = 3, L2-normalised per pixel (Eq. 4 wants unit vectors);
            * a :class:`~pyamalgam.losses.Task` of another kind: the raw output, unchanged.
        name: the output name (defaults "seg", "depth", "normal").
        max_depth: the depth range of the bins (depth only).

    Returns:
        an :class:`SMPBlockNet`; ``net(x)`` is ``model(x)`` decoded as above, and inputs must have
        H and W divisible by ``net.size_divisor`` (the encoder's output stride).
    """
    smp = import_smp()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a segmentation_models_pytorch model (an nn.Module), got {type(model).__name__}")
    task = get_task(task, name)
    if isinstance(task, (EdgeTask, KeypointTask)):  # (B, H, W) maps in [0, 1]: SMPHead would pass raw logits
        raise ValueError(f"task: from_smp does not wrap {type(task).__name__} teachers yet (their heads predict a "  # noqa: TRY004
                         f"squashed single-channel map, which SMPHead does not form)")
    _check_heads(model)
    encoder = model.encoder
    depth = int(encoder._depth)
    blocks = split_blocks(model, smp)  # an unsupported model is refused before its head
    head = SMPHead(model.segmentation_head, task, channels=_head_classes(model), max_depth=max_depth)
    net = SMPBlockNet(blocks, head, task, size_divisor=int(encoder.output_stride),
                      in_chans=int(getattr(encoder, "_in_channels", 3)))
    net.architecture, net.encoder, net.encoder_depth = type(model).__name__, type(encoder).__name__, depth
    _tag_origin(net, model)
    return net


def _tag_origin(net: SMPBlockNet, model: nn.Module) -> None:
    """Give the network, each block and the head an ``smp_origin``: the smp constructor's
    arguments (:func:`pyamalgam.models.records.smp_spec`) and the block's number, which a model
    file records to rebuild the module with ``encoder_weights=None`` (and checks by rebuilding)."""
    from .records import SMPOrigin, smp_spec

    spec, why = smp_spec(model)
    for n, block in net.blocks.items():
        block.smp_origin = SMPOrigin(spec, why, int(n))
    net.head.smp_origin = net.smp_origin = SMPOrigin(spec, why, None)


def split_blocks(model: nn.Module, smp=None) -> list:
    """The N blocks of an smp model (encoder stages, then decoder stages), sharing its modules."""
    smp = smp or import_smp()
    depth = int(model.encoder._depth)
    builder = _decoder_builder(smp, model)  # an unsupported decoder is refused before the encoder
    stages = _encoder_stages(smp, model.encoder)
    decoder_blocks, skips = builder(model, depth)
    blocks = [EncoderStage(k, stage, write_skip=k in skips, write_input=0 in skips and k == 1)
              for k, stage in enumerate(stages, start=1)]
    return blocks + decoder_blocks


def _check_heads(model):
    if getattr(model, "classification_head", None) is not None:
        raise ValueError("model has a classification head (aux_params), whose (B, classes) output is not a dense "
                         "prediction; build the smp model without aux_params")
    head = getattr(model, "segmentation_head", None)
    if not isinstance(head, nn.Sequential) or not isinstance(head[0], nn.Conv2d):
        raise TypeError(f"model has no smp segmentation_head (got {type(head).__name__}); pass an smp encoder-decoder")
    activation = getattr(head[-1], "activation", head[-1])
    if not isinstance(activation, nn.Identity):
        raise ValueError(f"model applies the activation {type(activation).__name__} to its output; build it with "  # noqa: TRY004
                         f"activation=None: the task (Eq. 1 logits, Eq. 2 bin logits) decodes the raw output")


def _head_classes(model) -> int:
    return int(model.segmentation_head[0].out_channels)


# ---------------------------------------------------------------- encoders


def _encoder_stages(smp, encoder) -> list:
    """The encoder's stages 1..D as modules, in the order its ``forward`` runs them."""
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    if isinstance(encoder, ResNetEncoder):
        stages = [nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu), nn.Sequential(encoder.maxpool, encoder.layer1),
                  encoder.layer2, encoder.layer3, encoder.layer4]
        return stages[: encoder._depth]
    raise ValueError(f"from_smp cannot split the encoder {type(encoder).__name__} into stages: it knows smp's "
                     "ResNetEncoder (resnet18..152, resnext*); other encoders' forward() runs their stages in one "
                     "call. Use a ResNet encoder or subclass pyamalgam.models.BlockNetwork")


class EncoderStage(nn.Module):
    """Encoder stage k; writes its output as ``"skip{k}"`` where the decoder reads it (and the
    image as ``"skip0"`` where a decoder reads the input resolution, FPN at depth 3)."""

    def __init__(self, level: int, stage: nn.Module, write_skip: bool, write_input: bool = False):
        super().__init__()
        self.level, self.stage, self.write_skip, self.write_input = level, stage, write_skip, write_input

    def forward(self, x, side):
        if self.write_input:
            side["skip0"] = x
        x = self.stage(x)
        if self.write_skip:
            side[f"skip{self.level}"] = x
        return x

    def extra_repr(self) -> str:
        return f"level={self.level}, write_skip={self.write_skip}, write_input={self.write_input}"


def _read(side, key):
    try:
        return side[key]
    except KeyError:
        raise KeyError(f"side information {key!r} is missing; run the blocks that produce it first "
                       f"(got keys {sorted(side)})") from None


# ---------------------------------------------------------------- decoders


def _decoder_builder(smp, model):
    """The function that cuts this model's decoder into blocks, or a ValueError saying why not."""
    kind = type(model).__name__
    builders = {smp.Unet: _unet_blocks, smp.FPN: _fpn_blocks, smp.DeepLabV3Plus: _deeplab_plus_blocks,
                smp.DeepLabV3: _deeplab_blocks}
    for cls, builder in builders.items():
        if type(model) is cls:
            return builder
    why = _UNSUPPORTED.get(kind, "its decoder is not a chain of stages that from_smp knows how to cut")
    raise ValueError(f"from_smp supports smp.Unet, smp.FPN, smp.DeepLabV3Plus and smp.DeepLabV3, not {kind}: {why}; "
                     "subclass pyamalgam.models.BlockNetwork to wrap it by hand")


_UNSUPPORTED = {
    "UnetPlusPlus": "its nested decoder nodes X(i, j) each read several encoder levels and every earlier node of "
                    "their row, so the decoder is a grid, not a chain of blocks with one feature map between them",
    "PSPNet": "its pyramid pooling module pools one encoder map to four grids at once and has no decoder stages",
    "PAN": "its feature pyramid attention reads three encoder levels inside one module",
    "UPerNet": "its fusion reads every pyramid level at once inside one module",
    "Segformer": "its all-MLP decoder reads every encoder level at once inside one module",
    "DPT": "its reassemble and fusion stages are built for a ViT encoder that from_smp does not split",
}


class UnetStage(nn.Module):
    """Unet decoder block: up-sample to the skip's size (2x where none) and concatenate it."""

    def __init__(self, block: nn.Module, skip: str | None, center: nn.Module | None = None):
        super().__init__()
        self.block, self.skip, self.center = block, skip, center

    def forward(self, x, side):
        if self.center is not None:
            x = self.center(x)
        if self.skip is None:  # the last block: the input's resolution, 2x (H, W divisible by 2^D)
            return self.block(x, 2 * x.shape[-2], 2 * x.shape[-1], skip_connection=None)
        skip = _read(side, self.skip)
        return self.block(x, skip.shape[-2], skip.shape[-1], skip_connection=skip)

    def extra_repr(self) -> str:
        return f"skip={self.skip!r}"


def _unet_blocks(model, depth):
    dec = model.decoder
    skips = [f"skip{depth - 1 - i}" if i < depth - 1 else None for i in range(len(dec.blocks))]
    center = None if isinstance(dec.center, nn.Identity) else dec.center
    blocks = [UnetStage(b, s, center if i == 0 else None) for i, (b, s) in enumerate(zip(dec.blocks, skips))]
    return blocks, {int(s[4:]) for s in skips if s is not None}


class FPNStage(nn.Module):
    """One level of FPN's top-down path (p5 = lateral 1x1 of the deepest map, p_j = 2x + lateral
    of ``skip``); writes its segmentation branch for the merge; the last level merges them all."""

    def __init__(self, index: int, lateral: nn.Module, seg_block: nn.Module, skip: str | None, merge=None, dropout=None):
        super().__init__()
        self.index, self.lateral, self.seg_block, self.skip = index, lateral, seg_block, skip
        self.merge, self.dropout = merge, dropout

    def forward(self, x, side):
        p = self.lateral(x) if self.skip is None else self.lateral(x, _read(side, self.skip))
        s = self.seg_block(p)
        if self.merge is None:
            side[f"pyramid{self.index}"] = s
            return p
        pyramid = [_read(side, f"pyramid{j}") for j in range(1, self.index)] + [s]
        return self.dropout(self.merge(pyramid))

    def extra_repr(self) -> str:
        return f"index={self.index}, skip={self.skip!r}"


def _fpn_blocks(model, depth):
    dec = model.decoder
    levels = [depth - 1, depth - 2, depth - 3]  # c4, c3, c2 of features[-4:] = [x, f1..fD][-4:]
    laterals = [dec.p5, dec.p4, dec.p3, dec.p2]
    blocks = []
    for i, (lateral, seg) in enumerate(zip(laterals, dec.seg_blocks), start=1):
        skip = None if i == 1 else f"skip{levels[i - 2]}"
        last = i == len(laterals)
        blocks.append(FPNStage(i, lateral, seg, skip, dec.merge if last else None, dec.dropout if last else None))
    return blocks, set(levels)


class DeepLabStage(nn.Module):
    """DeepLabV3(+) block: the ASPP module on the deepest map, or (V3+) the fusion block
    (up-sampled ASPP output concatenated with the projected ``"skip2"``)."""

    def __init__(self, modules: dict, fusion: bool, features_list: bool = False):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.fusion, self.features_list = fusion, features_list

    def forward(self, x, side):
        if not self.fusion:
            return self.parts["aspp"]([x] if self.features_list else x)
        high = self.parts["block1"](_read(side, "skip2"))
        return self.parts["block2"](torch.cat([self.parts["up"](x), high], dim=1))

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, features_list={self.features_list}"


def _deeplab_plus_blocks(model, depth):
    dec = model.decoder
    return [DeepLabStage({"aspp": dec.aspp}, fusion=False),
            DeepLabStage({"up": dec.up, "block1": dec.block1, "block2": dec.block2}, fusion=True)], {2}


def _deeplab_blocks(model, depth):
    return [DeepLabStage({"aspp": model.decoder}, fusion=False, features_list=True)], set()


# ---------------------------------------------------------------- head


class SMPHead(nn.Module):
    """smp's segmentation head (conv, up-sampling) and the decoding the task expects.

    ``"depth"``: the ``classes`` outputs are bin logits, decoded by Eq. 2 (as
    :class:`~pyamalgam.models.DepthHead`); ``"normals"``: unit vectors (as
    :class:`~pyamalgam.models.NormalHead`); otherwise the raw output. Unlike those heads, which
    always decode in float32, a float64 network decodes in float64 (so gradcheck applies).
    """

    def __init__(self, head: nn.Module, task, channels: int, max_depth: float = 10.0):
        super().__init__()
        self.head = head
        self.kind = "depth" if isinstance(task, DepthTask) else "normals" if isinstance(task, NormalTask) else "raw"
        self.bin_size = None
        if self.kind == "depth":
            if channels < 2:
                raise ValueError(f"a depth teacher predicts N_d >= 2 bin logits decoded by Eq. 2 (soft-argmax); the "
                                 f"model has classes={channels}: build it with classes=num_bins, e.g. 32")
            if not max_depth > 0:
                raise ValueError(f"max_depth must be > 0, got {max_depth!r}")
            self.bin_size = float(max_depth) / channels
        if self.kind == "normals" and channels != 3:
            raise ValueError(f"a normals teacher predicts 3 channels (x, y, z); the model has classes={channels}")
        if isinstance(task, SegmentationTask) and channels < 2:
            raise ValueError(f"a segmentation teacher predicts K >= 2 class logits; the model has classes={channels}")

    def forward(self, x):
        out = self.head(x)
        if self.kind == "raw":
            return out
        # decoded in float32 or better: Eq. 2 sums N_d products, too coarse in bf16 (float64 stays)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if self.kind == "depth":
            return soft_argmax_depth(out, self.bin_size)
        return F.normalize(out, dim=1, eps=1e-6)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", bin_size={self.bin_size}" if self.bin_size is not None else "")

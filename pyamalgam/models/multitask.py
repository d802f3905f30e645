"""Hard-sharing multi-task encoder-decoders in the block protocol (seed 002, SD-MTCNN's baselines).

One shared VGG encoder (blocks 1..depth, :class:`~pyamalgam.models.vgg.EncoderBlock`) and one
decoder per task (blocks depth+1..2*depth, :class:`~pyamalgam.models.vgg.DecoderBlock`, each with
its own head): the *vanilla multi-task SegNet* of seed 002 (its Baseline-1), and with
``decoder="concat"`` its U-Net ablation (every task's decoder reads the shared encoder's skips).

With ``shallow=True`` every task also gets a shallow "S" prediction path from the encoder's
last block (:class:`ShallowPath`: a 1x1 adaptor into the decoder's channel space, bilinear
up-sampling, a head of the task's kind): the S rows of seed 002's Table 1. The T rows are the
ordinary decoders. The seed shows the rows but not the architecture of the S path; this one is
our choice (docs/multitask.md).

As a :class:`~pyamalgam.models.BlockNetwork` the network is ``multi_output`` (like a
TargetNet): block n <= depth features are one tensor (the shared encoder's), past the encoder
:meth:`MultiTaskNet.forward_until` returns a dict task -> features.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import get_task
from ..ops import soft_argmax_depth
from .protocol import BlockNetwork, Side, check_input
from .sequential import SequentialBlockNet
from .vgg import (
    VGG16_CHANNELS,
    VGG16_CONVS,
    DecoderBlock,
    EncoderBlock,
    _check_config,
    _default_head,
    kaiming_init,
)

__all__ = ["MultiTaskNet", "ShallowPath", "head_outputs", "multitask_segnet", "multitask_unet", "resolve_tasks"]


def multitask_segnet(tasks=("seg", "depth", "normal"), **kwargs) -> MultiTaskNet:
    """Hard-sharing multi-task SegNet (max-unpooling decoders): seed 002's Baseline-1."""
    return MultiTaskNet(tasks, decoder="unpool", **kwargs)


def multitask_unet(tasks=("seg", "depth", "normal"), **kwargs) -> MultiTaskNet:
    """The U-Net ablation of seed 002's Table 1: the decoders concatenate the encoder's skips."""
    return MultiTaskNet(tasks, decoder="concat", **kwargs)


def resolve_tasks(tasks) -> dict:
    """Output name -> :class:`~pyamalgam.losses.Task` for a sequence of task names or Tasks.

    Names go through :func:`pyamalgam.losses.get_task` (aliases: "segmentation", "normals"...),
    so a task registered there plugs in. An empty list, an unknown name (the error lists the
    known ones) or a task named twice is a ValueError.
    """
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names, e.g. ('seg', 'depth'), got {tasks!r}")
    if not tasks:
        raise ValueError("tasks must name at least one task")
    resolved = {}
    for spec in tasks:
        try:
            task = get_task(spec)
        except ValueError as e:
            raise ValueError(f"tasks: {e}") from None
        if task.name in resolved:
            raise ValueError(f"tasks: {task.name!r} is listed twice (as {spec!r}); got {list(tasks)}")
        resolved[task.name] = task
    return resolved


def head_outputs(head: nn.Module, features: torch.Tensor) -> tuple:
    """(prediction, what distillation compares) of a head on ``features``.

    A depth head's distillation side is its bin logits (a class distribution per pixel, as
    thesis §3.3.3 distils depth), decoded to metres by Eq. 2 for the prediction; every other
    head's two are its one output (segmentation logits, unit normals, ...).
    """
    logits = getattr(head, "logits", None)
    if callable(logits) and hasattr(head, "bin_size"):
        z = logits(features)
        return soft_argmax_depth(z.float(), head.bin_size), z
    out = head(features)
    return out, out


class ShallowPath(nn.Module):
    """The S path of one task: encoder features -> 1x1 adaptor (the decoder's channel space) ->
    ReLU, bilinear up-sampling by ``scale`` -> a head. ``forward(e) -> (adapted, prediction, kd)``,
    ``adapted`` before its ReLU (what a feature hint compares, docs/multitask.md)."""

    def __init__(self, in_channels: int, out_channels: int, scale: int, head: nn.Module):
        super().__init__()
        self.adapt = nn.Conv2d(in_channels, out_channels, 1)
        self.scale = int(scale)
        self.head = head

    def forward(self, encoded):
        adapted = self.adapt(encoded)
        up = F.relu(adapted)
        if self.scale > 1:
            up = F.interpolate(up, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        pred, kd = head_outputs(self.head, up)
        return adapted, pred, kd


class MultiTaskNet(BlockNetwork):
    """A shared VGG encoder and one decoder + head per task; ``forward(x)`` -> task -> prediction.

    Args:
        tasks: the tasks, in order (names or :class:`~pyamalgam.losses.Task`; any subset of the
            registered ones): see :func:`resolve_tasks`.
        width, depth, num_classes, num_bins, max_depth, in_chans, channels, convs: as
            :class:`~pyamalgam.models.VGGEncoderDecoder` (every decoder mirrors the encoder).
        decoder: "unpool" (SegNet) or "concat" (U-Net skips).
        shallow: also build the S paths (:class:`ShallowPath`), one per task.

    Blocks: N = 2 * depth; blocks 1..depth are shared (:meth:`block` gives them), decoder
    blocks are per task (``decoders[task][str(n)]``). Depth comes out in metres (Eq. 2),
    segmentation as logits, normals as unit vectors.
    """

    multi_output = True

    def __init__(self, tasks=("seg", "depth", "normal"), *, width: float = 1.0, depth: int = 5, decoder: str = "unpool",
                 num_classes: int = 40, num_bins: int = 64, max_depth: float = 10.0, in_chans: int = 3,
                 channels: Sequence[int] = VGG16_CHANNELS, convs: Sequence[int] = VGG16_CONVS, shallow: bool = False):
        super().__init__()
        _check_config(width, depth, decoder, channels, convs)
        self._tasks = resolve_tasks(tasks)
        ch = [max(1, round(c * width)) for c in channels[:depth]]
        self.encoder = nn.ModuleDict({str(k): EncoderBlock(k, in_chans if k == 1 else ch[k - 2], ch[k - 1],
                                                           convs[k - 1], decoder) for k in range(1, depth + 1)})
        self.decoders = nn.ModuleDict({name: nn.ModuleDict({
            str(2 * depth + 1 - k): DecoderBlock(k, ch[k - 1], ch[max(k - 2, 0)], convs[k - 1], decoder,
                                                 deepest=k == depth) for k in range(depth, 0, -1)})
            for name in self._tasks})
        self.heads = nn.ModuleDict({name: _default_head(task, ch[0], num_classes, num_bins, max_depth)
                                    for name, task in self._tasks.items()})
        self.shallow = None
        if shallow:
            self.shallow = nn.ModuleDict({
                name: ShallowPath(ch[depth - 1], ch[0], 2 ** (depth - 1),
                                  _default_head(task, ch[0], num_classes, num_bins, max_depth))
                for name, task in self._tasks.items()})
        self.num_blocks, self.depth, self.decoder = 2 * depth, depth, decoder
        self.size_divisor, self.in_chans, self.channels = 2**depth, in_chans, tuple(ch)
        self.first_block = 1
        self.config = {"tasks": list(self._tasks), "width": width, "depth": depth, "decoder": decoder,
                       "num_classes": num_classes, "num_bins": num_bins, "max_depth": max_depth,
                       "in_chans": in_chans, "shallow": bool(shallow)}
        self.init_weights()

    @property
    def tasks(self) -> dict:
        return dict(self._tasks)

    @property
    def encoded_channels(self) -> int:
        """Channels of the shared encoder's last block (the space SD-MTCNN distils into)."""
        return self.channels[-1]

    def init_weights(self) -> None:
        """Kaiming-normal convolutions, unit BatchNorm (as the single-task VGG teachers)."""
        kaiming_init(self)

    # ------------------------------------------------------------ the training-time pass

    def forward_train(self, x: torch.Tensor, shallow: bool | None = None) -> dict:
        """One pass returning everything the multi-task objectives read:

        ``encoded`` (E, the shared encoder's block-``depth`` features), ``features`` (task ->
        D_t, its decoder's last-block features), ``outputs`` / ``kd`` (task -> the T prediction /
        its distillation side, :func:`head_outputs`), and with the S paths (``shallow``,
        default: when built) ``s_adapted`` / ``s_outputs`` / ``s_kd``.
        """
        check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        e = self._run_encoder(x, 1, side)
        out = {"encoded": e, "features": {}, "outputs": {}, "kd": {}}
        for name in self._tasks:
            d = self._run_decoder(name, e, self.depth + 1, side)
            out["features"][name] = d
            out["outputs"][name], out["kd"][name] = head_outputs(self.heads[name], d)
        use_s = self.shallow is not None if shallow is None else shallow
        if use_s:
            if self.shallow is None:
                raise RuntimeError("this MultiTaskNet has no S paths; build it with shallow=True")
            out["s_adapted"], out["s_outputs"], out["s_kd"] = {}, {}, {}
            for name, path in self.shallow.items():
                out["s_adapted"][name], out["s_outputs"][name], out["s_kd"][name] = path(e)
        return out

    def forward_shallow(self, x: torch.Tensor) -> dict:
        """The S rows' prediction: task -> the shallow path's prediction."""
        return self.forward_train(x, shallow=True)["s_outputs"]

    # ------------------------------------------------------------ the block protocol

    def block(self, n: int):
        n = self._check_block(n)
        return self.encoder[str(n)] if 1 <= n <= self.depth and str(n) in self.encoder else None

    def forward_until(self, x, n):
        n = self._check_block(n)
        check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        e = self._run_encoder(x, 1, side, stop=min(n, self.depth))
        if n <= self.depth:
            return e, side
        return {name: self._run_decoder(name, e, self.depth + 1, side, stop=n) for name in self._tasks}, side

    def forward_from(self, features, n, side):
        n = self._check_block(n, low=self.first_block - 1)
        side = dict(side)  # a suffix must not leak its side information to the caller
        if isinstance(features, Mapping):
            if n < self.depth:
                raise ValueError(f"block-{n} features are the shared encoder's: pass one tensor, not a dict")
            missing = sorted(set(self._tasks) - set(features))
            if missing:
                raise KeyError(f"features lack the stream(s) {missing} (got {sorted(features)})")
        else:
            features = self._run_encoder(features, n + 1, side) if n < self.depth else features
        outputs = {}
        for name in self._tasks:
            f = features[name] if isinstance(features, Mapping) else features
            d = self._run_decoder(name, f, max(n, self.depth) + 1, side)
            outputs[name] = head_outputs(self.heads[name], d)[0]
        return outputs

    def tail(self, n):
        n = self._check_block(n, low=self.first_block - 1)
        net = copy.deepcopy(self)
        for i in range(1, n + 1):
            if str(i) in net.encoder:
                del net.encoder[str(i)]
            for dec in net.decoders.values():
                if str(i) in dec:
                    del dec[str(i)]
        net.shallow = None  # the S paths read block `depth`, which a tail does not compute
        net.first_block = n + 1
        return net

    def as_trunk(self) -> SequentialBlockNet:
        """The shared encoder and the first task's decoder as one chain (a student template)."""
        if self.first_block != 1:
            raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks} only; a trunk needs all")
        first = next(iter(self._tasks))
        blocks = {int(k): copy.deepcopy(b) for k, b in self.encoder.items()}
        blocks.update({int(k): copy.deepcopy(b) for k, b in self.decoders[first].items()})
        return SequentialBlockNet(blocks, None, num_blocks=self.num_blocks, size_divisor=self.size_divisor,
                                  in_chans=self.in_chans)

    def side_keys(self, x):
        return set(self.forward_until(x, self.depth)[1])

    def extra_repr(self) -> str:
        return (f"tasks={list(self._tasks)}, depth={self.depth}, decoder={self.decoder!r}, channels={self.channels}, "
                f"shallow={self.shallow is not None}")

    # ------------------------------------------------------------ helpers

    def _run_encoder(self, x, start, side, stop=None):
        for i in range(start, (self.depth if stop is None else stop) + 1):
            if str(i) not in self.encoder:
                raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks}; "
                                 f"block {i} was cut away")
            x = self.encoder[str(i)](x, side)
        return x

    def _run_decoder(self, name, x, start, side, stop=None):
        dec = self.decoders[name]
        for i in range(start, (self.num_blocks if stop is None else stop) + 1):
            if str(i) not in dec:
                raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks}; "
                                 f"block {i} was cut away")
            x = dec[str(i)](x, side)
        return x

"""The block protocol: a network is N blocks followed by a task head (paper 001, §3).

A *block* is the part of a network between two pooling / up-sampling layers, so every feature
map inside it has one resolution. The amalgamation of §5 needs three things from a network:

* run it up to block n: :meth:`BlockNetwork.forward_until` -> (F^n, side);
* run it from block n+1 to the prediction with replacement features at block n:
  :meth:`BlockNetwork.forward_from`;
* carry *side information* between blocks: a plain ``dict`` that blocks write to and read
  from (SegNet's pooling indices, a U-Net's skip features).

:class:`BlockNet` implements it for a chain of block modules, each called as
``block(x, side) -> x``; a block that needs no side information simply ignores ``side``.
Block numbers are 1-based and global: a tail cut at block n (:meth:`BlockNet.tail`) still calls
its first block ``n + 1``, so side-information keys and state-dict names stay stable.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["Side", "BlockNetwork", "BlockNet", "block_shapes", "count_parameters", "check_input"]

Side = dict  # side information between blocks: str -> Tensor (pooling indices, skip features)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def check_input(x: Any, in_chans: int, size_divisor: int, name: str = "x") -> None:
    """Reject inputs the blocks cannot pool/unpool symmetrically, with the shape in the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name} must be (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point image batch, got {x.dtype}")
    h, w = x.shape[-2:]
    if h % size_divisor or w % size_divisor:
        raise ValueError(
            f"{name} has spatial size {h}x{w}, but H and W must be divisible by {size_divisor} "
            f"(one factor 2 per pooling stage); crop or pad to e.g. "
            f"{h - h % size_divisor or size_divisor}x{w - w % size_divisor or size_divisor}"
        )


class BlockNetwork(nn.Module):
    """Interface the amalgamation speaks (teachers, students and TargetNets implement it).

    Attributes:
        num_blocks: N, the number of blocks of the full network.
        size_divisor: H and W of an input must be divisible by it.
        in_chans: channels of the input image.
        tasks: output name -> :class:`pyamalgam.losses.Task` (one entry for a single-task network).
    """

    num_blocks: int
    size_divisor: int = 1
    in_chans: int = 3

    @property
    def tasks(self) -> dict:
        raise NotImplementedError

    def forward_until(self, x: torch.Tensor, n: int):
        """Run blocks 1..n on image ``x``; return (block-n features, side information)."""
        raise NotImplementedError

    def forward_from(self, features, n: int, side: Side):
        """Run blocks n+1..N and the head from block-n ``features``; ``side`` is not mutated."""
        raise NotImplementedError

    def tail(self, n: int) -> "BlockNetwork":
        """A copy holding only what :meth:`forward_from` at block >= n needs (blocks n+1..N, head)."""
        raise NotImplementedError

    def as_trunk(self) -> "BlockNet":
        """A copy of one chain of blocks 1..N, without a head: what a student copies (Step 1)."""
        raise NotImplementedError

    def _check_block(self, n: int, low: int = 0) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= self.num_blocks:
            raise ValueError(f"block index n must be an int in [{low}, {self.num_blocks}], got {n!r}")
        return n


class BlockNet(BlockNetwork):
    """A chain of blocks and a head: the block protocol for single-task encoder-decoders.

    Args:
        blocks: the N block modules in order, or a mapping block number -> module (a tail).
        head: maps block-N features to the prediction (None for a trunk without a head).
        task: what the network predicts (name or :class:`pyamalgam.losses.Task`); the
            amalgamation derives the supervision and the loss of its prediction from it.
        num_blocks: N of the full network; required when ``blocks`` is a tail mapping.
        size_divisor: the divisibility required of H and W.
        in_chans: channels of the input image.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module] | Mapping[int, nn.Module],
        head: nn.Module | None,
        task=None,
        *,
        num_blocks: int | None = None,
        size_divisor: int = 1,
        in_chans: int = 3,
    ):
        super().__init__()
        if not isinstance(blocks, Mapping):
            blocks = dict(enumerate(blocks, start=1))
        if not blocks:
            raise ValueError("blocks must not be empty")
        self.num_blocks = num_blocks if num_blocks is not None else max(blocks)
        if min(blocks) < 1 or max(blocks) > self.num_blocks:
            raise ValueError(f"block numbers must lie in [1, {self.num_blocks}], got {sorted(blocks)}")
        self.blocks = nn.ModuleDict({str(i): b for i, b in sorted(blocks.items())})
        self.head = head
        self.task = _resolve_task(task)
        self.size_divisor = size_divisor
        self.in_chans = in_chans

    @property
    def first_block(self) -> int:
        return min(int(k) for k in self.blocks)

    @property
    def tasks(self) -> dict:
        return {} if self.task is None else {self.task.name: self.task}

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, side: Side) -> torch.Tensor:
        """Run blocks start..stop (inclusive); writes the blocks' side information into ``side``."""
        for i in range(start, stop + 1):
            if str(i) not in self.blocks:
                raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks}; block {i} was cut away")
            x = self.blocks[str(i)](x, side)
        return x

    def forward_until(self, x, n):
        self._check_block(n)
        if self.first_block == 1:
            check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        return self.run_blocks(x, 1, n, side), side

    def forward_from(self, features, n, side):
        self._check_block(n)
        if self.head is None:
            raise RuntimeError("this BlockNet has no head (it is a trunk); it cannot predict")
        side = dict(side)  # a suffix must not leak its side information to the caller
        return self.head(self.run_blocks(features, n + 1, self.num_blocks, side))

    def forward(self, x):
        return self.forward_from(self.forward_until(x, 0)[0], 0, {})

    def tail(self, n):
        self._check_block(n, low=self.first_block - 1)
        kept = {i: copy.deepcopy(self.blocks[str(i)]) for i in range(n + 1, self.num_blocks + 1)}
        if not kept:  # cut after the last block: only the head remains
            return _HeadOnly(copy.deepcopy(self.head), self.task, self.num_blocks, self.size_divisor, self.in_chans)
        return BlockNet(
            kept, copy.deepcopy(self.head), self.task,
            num_blocks=self.num_blocks, size_divisor=self.size_divisor, in_chans=self.in_chans,
        )

    def as_trunk(self) -> "BlockNet":
        """A copy of blocks 1..N without the head: the student of Step 1 (§5.1.1)."""
        if self.first_block != 1:
            raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks} only; a trunk needs all")
        trunk = copy.deepcopy(self)
        trunk.head = None
        return trunk

    def reset_parameters(self) -> None:
        """Random re-initialisation of every sub-module that knows how (Step 1, random init)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


class _HeadOnly(BlockNet):
    """The tail after block N: no blocks, only the head (a task branching out at block N)."""

    def __init__(self, head, task, num_blocks, size_divisor, in_chans):
        BlockNetwork.__init__(self)
        self.num_blocks = num_blocks
        self.blocks = nn.ModuleDict()
        self.head = head
        self.task = task
        self.size_divisor = size_divisor
        self.in_chans = in_chans

    @property
    def first_block(self) -> int:
        return self.num_blocks + 1


def _resolve_task(task):
    if task is None:
        return None
    from ..losses import get_task  # same floor; imported late so models stay importable alone

    return get_task(task)


@torch.no_grad()
def block_shapes(net: BlockNetwork, x: torch.Tensor) -> list:
    """Feature shapes (C, H, W) of blocks 1..N on input ``x``; a multi-stream block gives a dict."""
    was_training = net.training
    net.eval()  # BatchNorm on a probe batch of one must not update or need batch statistics
    try:
        if isinstance(net, BlockNet) and net.first_block == 1:  # one pass instead of N prefixes
            check_input(x, net.in_chans, net.size_divisor)
            side: Side = {}
            shapes = []
            for n in range(1, net.num_blocks + 1):
                x = net.run_blocks(x, n, n, side)
                shapes.append(tuple(x.shape[1:]))
            return shapes
        shapes = []
        for n in range(1, net.num_blocks + 1):
            feat, _ = net.forward_until(x, n)
            if isinstance(feat, Mapping):
                shapes.append({k: tuple(v.shape[1:]) for k, v in feat.items()})
            else:
                shapes.append(tuple(feat.shape[1:]))
        return shapes
    finally:
        net.train(was_training)

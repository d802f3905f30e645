"""A chain of block modules and a head: the block protocol for single-task encoder-decoders.

:class:`SequentialBlockNet` runs its blocks in order, each called ``block(x, side) -> x`` (a block
that needs no side information ignores ``side``), then its head. With a head it is a teacher
(:class:`~pyamalgam.models.BlockNetwork`); without one (:meth:`SequentialBlockNet.as_trunk`) a
student template (:class:`~pyamalgam.models.BlockTrunk`) — the one class implements both.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .protocol import BlockNetwork, BlockTrunk, Side, check_input

__all__ = ["SequentialBlockNet"]


class SequentialBlockNet(BlockNetwork, BlockTrunk):
    """A chain of blocks and a head, speaking both interfaces of the block protocol.

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

    def block(self, n: int) -> nn.Module | None:
        return self.blocks[str(n)] if str(n) in self.blocks else None  # noqa: SIM401 (ModuleDict has no .get)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, side: Side) -> torch.Tensor:
        """Run blocks start..stop (inclusive); writes the blocks' side information into ``side``."""
        for i in range(start, stop + 1):
            if str(i) not in self.blocks:
                raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks}; block {i} was cut away")
            x = self.blocks[str(i)](x, side)
        return x

    def forward_until(self, x, n):
        n = self._check_block(n)
        if self.first_block == 1:
            check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        return self.run_blocks(x, 1, n, side), side

    def forward_from(self, features, n, side):
        n = self._check_block(n)
        if self.head is None:
            raise RuntimeError("this SequentialBlockNet has no head (it is a trunk); it cannot predict")
        side = dict(side)  # a suffix must not leak its side information to the caller
        return self.head(self.run_blocks(features, n + 1, self.num_blocks, side))

    def tail(self, n):
        n = self._check_block(n, low=self.first_block - 1)
        kept = {i: copy.deepcopy(self.blocks[str(i)]) for i in range(n + 1, self.num_blocks + 1)}
        if not kept:  # cut after the last block: only the head remains
            return _HeadOnly(copy.deepcopy(self.head), self.task, self.num_blocks, self.size_divisor, self.in_chans)
        return SequentialBlockNet(
            kept, copy.deepcopy(self.head), self.task,
            num_blocks=self.num_blocks, size_divisor=self.size_divisor, in_chans=self.in_chans,
        )

    def as_trunk(self) -> SequentialBlockNet:
        """A copy of blocks 1..N without the head: the student of Step 1 (§5.1.1)."""
        if self.first_block != 1:
            raise ValueError(f"this network holds blocks {self.first_block}..{self.num_blocks} only; a trunk needs all")
        trunk = copy.deepcopy(self)
        trunk.head = None
        return trunk

    def feature_shapes(self, x):
        # One pass through the chain instead of the default's N prefixes.
        if self.first_block == 1:
            check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        shapes = []
        for n in range(1, self.num_blocks + 1):
            x = self.run_blocks(x, n, n, side)
            shapes.append(tuple(x.shape[1:]))
        return shapes


class _HeadOnly(SequentialBlockNet):
    """The tail after block N: no blocks, only the head (a task branching out at block N)."""

    def __init__(self, head, task, num_blocks, size_divisor, in_chans):
        nn.Module.__init__(self)  # SequentialBlockNet refuses an empty chain; this one is empty on purpose
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
    # losses is on this floor; imported late, so that the models import on their own
    from ..losses import get_task

    return get_task(task)

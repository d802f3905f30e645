"""The block protocol: a network is N blocks followed by a task head (paper 001, §3).

A *block* is the part of a network between two pooling / up-sampling layers, so every feature
map inside it has one resolution. Block numbers are 1-based and global: a tail cut at block n
still calls its first block ``n + 1``, so side-information keys and state-dict names stay stable.
*Side information* is a plain ``dict`` that blocks write to and later blocks read from (SegNet's
pooling indices, a U-Net's skip features).

The amalgamation of §5 speaks two interfaces, and nothing else of a network:

* :class:`BlockNetwork`, what a **teacher** provides: Step 2 runs it up to block n and on from
  replacement block-n features (Eq. 5/6), Step 4 copies its blocks n+1..N into a branch;
* :class:`BlockTrunk`, what a **student template** provides: Step 1 copies one from a teacher
  (:meth:`BlockNetwork.as_trunk`), Step 2 trains its blocks one at a time, Step 4 copies blocks
  1..P into the TargetNet's trunk.

Each lists its required members in ``REQUIRED``; every other member has a default here.
:func:`missing_members` names what a network lacks. A network from another library joins by
subclassing :class:`BlockNetwork` and implementing the required members only.
:class:`~pyamalgam.models.SequentialBlockNet` implements both interfaces for a chain of block
modules; :class:`pyamalgam.amalgamation.TargetNet` is a multi-output :class:`BlockNetwork`.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .._checks import as_int

__all__ = ["BlockNetwork", "BlockTrunk", "Side", "block_shapes", "check_input", "count_parameters", "missing_members",
           "protocol_gap"]

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


class _Blocks(nn.Module):
    """What both interfaces share: N blocks, the images they take, running blocks 1..n."""

    num_blocks: int  # required: N, the blocks of the full network
    size_divisor: int = 1  # H and W of an input must be divisible by it
    in_chans: int = 3  # channels of the input image

    def forward_until(self, x: torch.Tensor, n: int):
        """Required: run blocks 1..n on image ``x``; return (block-n features, side information).

        ``n = 0`` returns the (checked) image and no side information.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_until()")

    def block(self, n: int) -> nn.Module | None:
        """Block n as one module, called ``block(x, side) -> x`` (it writes its own side
        information into ``side``); None where this network does not hold block n as one module
        (the default). A student template must give every block (Step 2 trains it, Step 4 chains
        it in the trunk); a teacher may (a TargetNet copies a branch's blocks from it)."""
        return None

    def feature_shapes(self, x: torch.Tensor) -> list:
        """Feature shapes (C, H, W) of blocks 1..N on ``x``, a dict stream -> shape for a
        multi-stream block. :func:`block_shapes` calls it in eval mode without grad. The default
        runs :meth:`forward_until` once per block; a network that can do one pass overrides it."""
        shapes = []
        for n in range(1, self.num_blocks + 1):
            feat, _ = self.forward_until(x, n)
            if isinstance(feat, Mapping):
                shapes.append({k: tuple(v.shape[1:]) for k, v in feat.items()})
            else:
                shapes.append(tuple(feat.shape[1:]))
        return shapes

    def side_keys(self, x: torch.Tensor) -> set | None:
        """The side-information keys blocks 1..N write on ``x``, or None where the network has no
        single set (a multi-stream TargetNet). Teachers and the student must agree on them: a
        teacher's blocks n+1..N run on the student's side information (Step 2 and Step 4)."""
        return set(self.forward_until(x, self.num_blocks)[1])

    def _check_block(self, n: int, low: int = 0) -> int:
        index = as_int(n)
        if index is None or not low <= index <= self.num_blocks:
            raise ValueError(f"block index n must be an int in [{low}, {self.num_blocks}], got {n!r}")
        return index


class BlockNetwork(_Blocks):
    """What a **teacher** provides: N blocks and a head, run in two halves around block n (§5.1.2).

    Required (``REQUIRED``):
        num_blocks: N.
        tasks: output name -> :class:`pyamalgam.losses.Task` (one entry for a single-task
            network): the supervision and the loss of each prediction (Eq. 1, 3, 4).
        forward_until(x, n): blocks 1..n on image ``x`` -> (F^n, side).
        forward_from(F, n, side): blocks n+1..N and the head from block-n features -> prediction.
        tail(n): a copy of what ``forward_from`` at block >= n needs (the branch of Step 4).

    Optional, with defaults on this class:
        size_divisor (1), in_chans (3).
        multi_output (False): ``forward`` returns one prediction, which the Amalgamator names
            after the teacher's key; True: a mapping output name -> prediction whose names are
            kept (a TargetNet teaching again, Eq. 9).
        task_weights (empty): output name -> the lambda it was trained with (reused, Eq. 9).
        forward(x): ``forward_from(*forward_until(x, 0))``.
        as_trunk(): the student template (Step 1); only the teacher the student is copied from
            needs it.
        block(n) (None), feature_shapes(x), side_keys(x): shared with :class:`BlockTrunk`,
            each documented at its method.
    """

    REQUIRED = ("num_blocks", "tasks", "forward_until", "forward_from", "tail")
    multi_output: bool = False
    task_weights: Mapping[str, float] = MappingProxyType({})
    tasks: Mapping  # required: output name -> Task (a plain attribute or a property)

    def forward(self, x):
        """The prediction on image ``x``: blocks 1..N, then the head."""
        features, side = self.forward_until(x, 0)
        return self.forward_from(features, 0, side)

    def forward_from(self, features, n: int, side: Side):
        """Required: run blocks n+1..N and the head from block-n ``features``; ``side`` is not mutated."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_from()")

    def tail(self, n: int) -> BlockNetwork:
        """Required: a copy holding what :meth:`forward_from` at block >= n needs (blocks n+1..N, head)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement tail()")

    def as_trunk(self) -> BlockTrunk:
        """A :class:`BlockTrunk` copy of blocks 1..N without a head: the student of Step 1 (§5.1.1)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement as_trunk(), "
                                  "so no student can be copied from it")


class BlockTrunk(_Blocks):
    """What a **student template** provides: blocks 1..N without a head (Steps 1, 2 and 4).

    Required (``REQUIRED``):
        num_blocks: N.
        forward_until(x, n): blocks 1..n on image ``x`` -> (F^n, side). Step 2 trains block n on
            ``forward_until(x, n - 1)``, so it must equal chaining :meth:`block` 1..n.
        block(n): block n as a module ``block(x, side) -> x``, for every n in 1..N.

    Optional, with defaults on this class:
        size_divisor (1), in_chans (3).
        reset_parameters(): random re-initialisation (``init="random"``).
        feature_shapes(x), side_keys(x): shared with :class:`BlockNetwork`, each documented at
            its method.
    """

    REQUIRED = ("num_blocks", "forward_until", "block")

    def reset_parameters(self) -> None:
        """Random re-initialisation of every sub-module that knows how (Step 1, random init)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


def missing_members(net: Any, interface: type = BlockNetwork) -> list:
    """The members of ``interface.REQUIRED`` that ``net`` lacks, in declaration order.

    A method counts as provided when ``net``'s class overrides the interface's stub (or default,
    for :meth:`BlockTrunk.block`), an attribute when ``net`` has it.
    """
    missing = []
    for name in interface.REQUIRED:
        stub = getattr(interface, name, None)
        provided = getattr(type(net), name, stub) is not stub if callable(stub) else hasattr(net, name)
        if not provided:
            missing.append(name)
    return missing


def protocol_gap(net: Any, interface: type = BlockNetwork) -> str | None:
    """Why ``net`` does not speak ``interface``, for an error message; None when it does.

    It must subclass the interface (whose defaults the amalgamation calls) and implement the
    required members (:func:`missing_members`).
    """
    missing = missing_members(net, interface)
    if missing:
        return f"it does not implement {', '.join(missing)}"
    if not isinstance(net, interface):
        return f"{type(net).__name__} does not subclass it"
    return None


@torch.no_grad()
def block_shapes(net: BlockNetwork | BlockTrunk, x: torch.Tensor) -> list:
    """Feature shapes (C, H, W) of blocks 1..N on input ``x``; a multi-stream block gives a dict."""
    was_training = net.training
    net.eval()  # BatchNorm on a probe batch of one must not update or need batch statistics
    try:
        return net.feature_shapes(x)
    finally:
        net.train(was_training)

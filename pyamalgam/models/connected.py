"""Connector modules of heterogeneous teachers, as they live on in a TargetNet (issue 13).

:class:`BlockConnector` maps features of the student's block shape onto a teacher's (a 1x1
convolution, thesis 003 §4.3.2, and a fixed-ratio resize), :class:`ConnectedCoding` is the channel
coding of paper 001 Fig. 3 followed by one, and :class:`ConnectedTail` is a teacher's blocks p+1..N
that read the trunk's side information through connectors. They are network modules (a branch of a
TargetNet holds them, Step 4), so they live on the models floor, where model files describe and
rebuild them (:mod:`pyamalgam.models.records`); how the Amalgamator plans and trains them is
:mod:`pyamalgam.amalgamation.connectors`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from fractions import Fraction

import torch.nn.functional as F
from torch import nn

from ..nn import Connector
from .protocol import BlockNetwork

__all__ = ["BlockConnector", "ConnectedCoding", "ConnectedTail", "map_side"]


class BlockConnector(nn.Module):
    """Maps features of the student's shape (Cs, Hs, Ws) onto a teacher's (Ct, Ht, Wt).

    A 1x1 convolution where the channels differ (:meth:`Connector.between`, the identity
    otherwise), then a resize by the fixed ratio Ht/Hs, Wt/Ws (bilinear where it enlarges, area
    averaging where it shrinks): the ratio, not the probe's size, so any admissible input works.
    """

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = tuple(student_shape), tuple(teacher_shape)
        self.student_shape, self.teacher_shape = (cs, hs, ws), (ct, ht, wt)
        self.conv = Connector.between(cs, ct)
        self.scale = None if (hs, ws) == (ht, wt) else (Fraction(ht, hs), Fraction(wt, ws))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.student_shape[0]:
            raise ValueError(f"connector {self.student_shape} -> {self.teacher_shape} expects x of shape "
                             f"(B, {self.student_shape[0]}, H, W), got {tuple(x.shape)}")
        x = self.conv(x)
        if self.scale is None:
            return x
        size = []
        for extent, ratio in zip(x.shape[-2:], self.scale):
            if (extent * ratio).denominator != 1:
                raise ValueError(f"connector {self.student_shape} -> {self.teacher_shape}: a feature map of size "
                                 f"{tuple(x.shape[-2:])} cannot be resized by {ratio} to whole pixels")
            size.append(int(extent * ratio))
        if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(x, size)

    def extra_repr(self) -> str:
        return f"{self.student_shape} -> {self.teacher_shape}"


class ConnectedCoding(nn.Module):
    """The coding of block n for a heterogeneous teacher: channel coding in the student's domain,
    then the connector onto the teacher's block-n shape.

    ``side`` holds the connectors of the side tensors block n writes (``side_keys[i]`` ->
    ``side[i]``); they are trained with block n (Step 2), but applied where the teacher reads
    them (:class:`ConnectedTeacher`), so :meth:`forward` does not use them.
    """

    def __init__(self, coding: nn.Module, connector: nn.Module, side: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.coding, self.connector = coding, connector
        self.side_keys = list(side or {})
        self.side = nn.ModuleList(list((side or {}).values()))

    def forward(self, x):
        return self.connector(self.coding(x))

    def side_map(self) -> dict:
        return dict(zip(self.side_keys, self.side))

    def for_branch(self) -> ConnectedCoding:
        """A copy without the side connectors: the branch holds its own (:class:`ConnectedTail`)."""
        return ConnectedCoding(copy.deepcopy(self.coding), copy.deepcopy(self.connector))


def map_side(side: Mapping, maps: Mapping[str, nn.Module]) -> dict:
    """The student's side information in a teacher's domain: each tensor with a connector mapped."""
    return {k: maps[k](v) if k in maps else v for k, v in side.items()}


class ConnectedTail(BlockNetwork):
    """A heterogeneous teacher's blocks p+1..N inside a branch, with its own side connectors
    (fine-tuned with the TargetNet): the trunk's side information is mapped before the blocks.

    ``block(n)`` is None: a stream's block alone would read unmapped side information, so a
    TargetNet with such a branch has no per-block features past that branch's point.
    """

    def __init__(self, inner: BlockNetwork, maps: Mapping[str, nn.Module]):
        super().__init__()
        self.inner = inner
        self.side_keys_mapped = list(maps)
        self.side = nn.ModuleList(list(maps.values()))

    num_blocks = property(lambda self: self.inner.num_blocks)
    tasks = property(lambda self: self.inner.tasks)
    size_divisor = property(lambda self: self.inner.size_divisor)
    in_chans = property(lambda self: self.inner.in_chans)
    multi_output = property(lambda self: self.inner.multi_output)

    def forward_from(self, features, n, side):
        return self.inner.forward_from(features, n, map_side(side, dict(zip(self.side_keys_mapped, self.side))))

    def forward_until(self, x, n):
        raise NotImplementedError("a connected branch holds only the blocks after its point; it has no forward_until")

    def tail(self, n):
        return ConnectedTail(self.inner.tail(n), copy.deepcopy(dict(zip(self.side_keys_mapped, self.side))))

"""Heterogeneous teachers: connectors between the student's block shapes and a teacher's.

Paper 001 amalgamates teachers of one architecture, so the student's block-n features F_u^n fit
every teacher's blocks n+1..N. When a teacher's block features differ from the student's (the
student is a copy of the first teacher, Step 1) in channels or resolution, a **connector** per
(block, teacher) follows the channel coding: a 1x1 convolution (:class:`pyamalgam.nn.Connector`,
thesis 003 §4.3.2, where it maps a student's channels onto a teacher's) and, where the resolution
differs, a resize. Eq. 5 then compares the connected projection with the teacher's features,
Eq. 6/8 run the teacher from it, and a branch (Step 4) is the coding, the connector and the
teacher's blocks p+1..N.

The teacher's suffix also reads the *student's* side information (docs/amalgamation.md): a
float side tensor (a U-Net skip) whose shape differs gets a connector too, owned by the block
that writes it (trained with that block, copied into every branch after it). Integer side
information (SegNet's pooling indices) cannot be mapped and is refused in ``setup.plan_blocks``.

Homogeneous teachers get none of this: :func:`make_codings` builds exactly the plain
:class:`~pyamalgam.nn.ChannelCoding` dict it always built (same modules, names and random
draws), and :func:`connect_teachers` leaves such teachers as they are.
"""
from __future__ import annotations

import copy
from fractions import Fraction
from typing import Mapping

import torch.nn.functional as F
from torch import nn

from ..models.protocol import BlockNetwork
from ..nn import ChannelCoding, Connector

__all__ = ["BlockConnector", "ConnectedCoding", "ConnectedTeacher", "ConnectedTail", "TeacherSide", "make_codings",
           "connect_teachers", "branch_coding", "map_side"]


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


class TeacherSide(dict):
    """Side information a teacher wrote itself (its own ``forward_until``): never re-mapped."""


def map_side(side: Mapping, maps: Mapping[str, nn.Module]) -> dict:
    """The student's side information in a teacher's domain: each tensor with a connector mapped."""
    return {k: maps[k](v) if k in maps else v for k, v in side.items()}


class ConnectedTeacher(BlockNetwork):
    """A heterogeneous teacher as the amalgamation sees it: the teacher itself, whose suffix
    (:meth:`forward_from`) reads the student's side information through the side connectors.

    The side connectors live in the Amalgamator's codings (each in the :class:`ConnectedCoding`
    of the block that writes it); this wrapper only refers to them (they are not its parameters,
    so the teacher stays frozen and its parameter count and state dict are the teacher's).
    ``owners`` maps each side key to the student block that writes it.
    """

    def __init__(self, teacher: BlockNetwork, maps: Mapping[str, nn.Module], owners: Mapping[str, int]):
        super().__init__()
        self.teacher = teacher
        object.__setattr__(self, "_maps", dict(maps))  # references, not submodules
        self.owners = dict(owners)

    num_blocks = property(lambda self: self.teacher.num_blocks)
    tasks = property(lambda self: self.teacher.tasks)
    size_divisor = property(lambda self: self.teacher.size_divisor)
    in_chans = property(lambda self: self.teacher.in_chans)
    multi_output = property(lambda self: self.teacher.multi_output)
    task_weights = property(lambda self: self.teacher.task_weights)

    def forward(self, x):
        return self.teacher(x)

    def forward_until(self, x, n):
        features, side = self.teacher.forward_until(x, n)
        return features, TeacherSide(side)

    def forward_from(self, features, n, side):
        if not isinstance(side, TeacherSide):  # the student's side information (Step 2)
            side = map_side(side, self._maps)
        return self.teacher.forward_from(features, n, side)

    def tail(self, n):
        """Blocks n+1..N and the head, with copies of the side connectors of blocks 1..n."""
        maps = {k: copy.deepcopy(m) for k, m in self._maps.items() if self.owners[k] <= n}
        return ConnectedTail(self.teacher.tail(n), maps)

    def as_trunk(self):
        return self.teacher.as_trunk()

    def feature_shapes(self, x):
        return self.teacher.feature_shapes(x)

    def side_keys(self, x):
        return self.teacher.side_keys(x)


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


def make_codings(plan, teachers: Mapping, reduction: int, gate) -> nn.ModuleDict:
    """One coding per (block, teacher): a :class:`ChannelCoding` in the student's domain, made a
    :class:`ConnectedCoding` where the teacher's block shape or block-written side shapes differ.

    The ChannelCodings are built in the order (block, teacher) as before connectors existed, each
    coding's connectors right after it: a homogeneous run draws the same numbers as ever.
    """
    codings = {}
    for n in range(1, len(plan.student) + 1):
        row = {}
        for key in teachers:
            coding = ChannelCoding(plan.student[n - 1][0], reduction, gate=gate)
            if key in plan.teachers:
                row[key] = _connected(coding, plan, key, n)
            else:
                row[key] = coding
        codings[str(n)] = nn.ModuleDict(row)
    return nn.ModuleDict(codings)


def _connected(coding, plan, key, n):
    student, teacher = plan.student[n - 1], plan.teachers[key][n - 1]
    connector = BlockConnector(student, teacher) if student != teacher else nn.Identity()
    side = {k: BlockConnector(s, t) for k, (s, t) in plan.side.get(key, {}).items() if plan.side_owner[k] == n}
    if isinstance(connector, nn.Identity) and not side:
        return coding  # nothing differs at this block
    return ConnectedCoding(coding, connector, side)


def connect_teachers(teachers: Mapping, codings: nn.ModuleDict, plan) -> dict:
    """The teachers as Step 2 runs them: heterogeneous ones wrapped in :class:`ConnectedTeacher`."""
    out = {}
    for key, t in teachers.items():
        if key not in plan.teachers:
            out[key] = t
            continue
        maps = {}
        for row in codings.values():
            if isinstance(row[key], ConnectedCoding):
                maps.update(row[key].side_map())
        out[key] = ConnectedTeacher(t, maps, {k: plan.side_owner[k] for k in maps}).eval()
    return out


def branch_coding(coding: nn.Module) -> nn.Module:
    """The copy of a block's coding that a branch holds (Step 4)."""
    return coding.for_branch() if isinstance(coding, ConnectedCoding) else copy.deepcopy(coding)

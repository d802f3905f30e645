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

The modules a TargetNet keeps (:class:`BlockConnector`, :class:`ConnectedCoding`,
:class:`ConnectedTail`) are defined in :mod:`pyamalgam.models.connected`, where model files
describe them; they are re-exported here.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

from ..models.connected import BlockConnector, ConnectedCoding, ConnectedTail, map_side
from ..models.protocol import BlockNetwork
from ..nn import ChannelCoding

__all__ = [
    "BlockConnector",
    "ConnectedCoding",
    "ConnectedTail",
    "ConnectedTeacher",
    "TeacherSide",
    "branch_coding",
    "connect_teachers",
    "make_codings",
    "map_side",
]


class TeacherSide(dict):
    """Side information a teacher wrote itself (its own ``forward_until``): never re-mapped."""


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

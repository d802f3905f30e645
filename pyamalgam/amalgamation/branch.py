"""Branch-out (Eq. 7) and the assembly of the TargetNet (paper 001, §5.1.3 and Step 4).

A TargetNet is a shared trunk (student blocks 1..P, P the last branch point) and, per teacher,
a branch: the channel coding trained at its point p and a copy of that teacher's blocks p+1..N
and head. It is a :class:`~pyamalgam.models.BlockNetwork` itself, a multi-output teacher, so that
the online scheme of Eq. 9 can amalgamate it again (TargetNet-2 teaching TargetNet-3).
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from ..models.protocol import BlockNetwork, BlockTrunk, Side, check_input
from ..models.sequential import SequentialBlockNet
from .connectors import branch_coding

__all__ = ["select_branch_points", "teacher_losses", "decoder_candidates", "Branch", "TargetNet", "assemble_target_net",
           "as_outputs"]


def decoder_candidates(num_blocks: int) -> range:
    """Blocks n with N/2 < n <= N: Eq. 7 lets tasks branch out only inside the decoder."""
    return range(num_blocks // 2 + 1, num_blocks + 1)


def select_branch_points(losses: Mapping[str, Mapping[int, float]], num_blocks: int, candidates=None) -> dict:
    """Eq. 7: ``p_t = argmin_n L_t^n`` over the candidate blocks (default N/2 < n <= N).

    Args:
        losses: per teacher, block -> final block-wise loss L_t^n.
        num_blocks: N.
        candidates: the blocks allowed (default :func:`decoder_candidates`).

    Ties go to the earliest block, as ``argmin`` does; NaN losses never win.
    """
    candidates = list(decoder_candidates(num_blocks) if candidates is None else candidates)
    points = {}
    for key, table in losses.items():
        missing = [n for n in candidates if n not in table]
        if missing:
            raise ValueError(f"no recorded loss for {key!r} at block(s) {missing}; train those blocks first or force branch points")
        finite = [(table[n], n) for n in candidates if not math.isnan(table[n])]
        if not finite:
            raise ValueError(f"all candidate losses of {key!r} are NaN: {dict((n, table[n]) for n in candidates)}")
        points[key] = min(finite)[1]  # (loss, block): equal losses pick the smaller block
    return points


def teacher_losses(loss_table: Mapping, outputs: Mapping, weights: Mapping) -> dict:
    """What Eq. 7 minimises per teacher: block -> sum of its outputs' weighted L_t^n.

    A multi-output teacher (Eq. 9) branches once for all its outputs, at the blocks where every
    one of them has a recorded loss.
    """
    table = {}
    for key, out in outputs.items():
        blocks = set.intersection(*(set(loss_table.get(name, {})) for name in out))
        table[key] = {n: sum(weights[name] * loss_table[name][n] for name in out) for n in blocks}
    return table


def as_outputs(key: str, prediction) -> dict:
    """A network's prediction as output name -> tensor (a single-task one is named by its key)."""
    return dict(prediction) if isinstance(prediction, Mapping) else {key: prediction}


class Branch(nn.Module):
    """One teacher's stream: its coding at branch point ``point`` and its blocks point+1..N, head.

    ``coding`` is None in the tail of a TargetNet cut after the branch point (already coded).
    """

    def __init__(self, point: int, coding: nn.Module | None, tail: BlockNetwork):
        super().__init__()
        self.point = point
        self.coding = coding
        self.tail = tail

    def forward(self, trunk_features: torch.Tensor, side: Side):
        if self.coding is None:
            raise RuntimeError(f"this branch was cut after its point {self.point}; feed it block features with forward_from")
        return self.tail.forward_from(code(self.coding, trunk_features), self.point, side)

    def extra_repr(self) -> str:
        return f"point={self.point}"


def code(coding: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply a channel coding; under autocast its input is cast to the coding's own dtype."""
    dtype = next(coding.parameters()).dtype
    return coding(features if features.dtype == dtype else features.to(dtype))


class TargetNet(BlockNetwork):
    """The amalgamated multi-task network; ``forward(x)`` returns output name -> prediction.

    Depth comes out decoded (metres, Eq. 2), segmentation as logits, normals as unit vectors.

    As a :class:`~pyamalgam.models.BlockNetwork` (a teacher for Eq. 9) it is ``multi_output``:
    its own output names are kept, with the lambdas it was trained with (``task_weights``).
    Block n's features are the trunk's while every branch point is >= n; past a branch point
    each stream has its own block-n features, so :meth:`forward_until` returns a dict stream ->
    features, and one tensor given to :meth:`forward_from` replaces the block-n features of
    every stream.

    Args:
        trunk: block number -> student block, for blocks 1..P.
        branches: teacher key -> :class:`Branch`.
        outputs: teacher key -> (output name -> Task), what each branch predicts.
        num_blocks, size_divisor, in_chans: those of the teachers.
        task_weights: output name -> lambda used to train it (reused when it teaches, Eq. 9).
    """

    multi_output = True

    def __init__(self, trunk: Mapping[int, nn.Module], branches: Mapping[str, Branch], outputs: Mapping[str, Mapping], *,
                 num_blocks: int, size_divisor: int = 1, in_chans: int = 3, task_weights: Mapping[str, float] | None = None):
        super().__init__()
        self.trunk = nn.ModuleDict({str(i): b for i, b in sorted(trunk.items())})
        self.branches = nn.ModuleDict(dict(branches))
        self.outputs = {k: dict(v) for k, v in outputs.items()}
        self.num_blocks = num_blocks
        self.size_divisor = size_divisor
        self.in_chans = in_chans
        self.task_weights = dict(task_weights or {})

    @property
    def points(self) -> dict:
        return {k: b.point for k, b in self.branches.items()}

    @property
    def tasks(self) -> dict:
        return {name: task for out in self.outputs.values() for name, task in out.items()}

    def forward_from(self, features, n, side):
        n = self._check_block(n)
        side = dict(side)
        outputs = {}
        for key, br in self.branches.items():
            if br.point < n:  # this stream left the trunk before n: its own block-n features continue
                outputs.update(as_outputs(key, br.tail.forward_from(_stream(features, key), n, side)))
        on_trunk = sorted((br.point, key) for key, br in self.branches.items() if br.point >= n)
        if on_trunk:
            x, at = _stream(features, on_trunk[0][1]), n
            for point, key in on_trunk:
                x, at = self._run_trunk(x, at + 1, point, side), point
                outputs.update(as_outputs(key, self.branches[key](x, side)))
        return {name: outputs[name] for name in self.tasks}

    def forward_until(self, x, n):
        n = self._check_block(n)
        check_input(x, self.in_chans, self.size_divisor)
        side: Side = {}
        trunk_at = {0: x}
        for i in range(1, min(n, max(self.points.values())) + 1):
            trunk_at[i] = self._run_trunk(trunk_at[i - 1], i, i, side)
        if all(p >= n for p in self.points.values()):
            return trunk_at[n], side
        streams = {key: trunk_at[n] if br.point >= n else self._run_stream(key, trunk_at[br.point], n, side)
                   for key, br in self.branches.items()}
        return streams, side

    def side_keys(self, x):
        # Past its branch point each stream writes side information of its own: no single set.
        return None

    def tail(self, n):
        n = self._check_block(n)
        trunk = {int(i): copy.deepcopy(b) for i, b in self.trunk.items() if int(i) > n}
        branches = {}
        for key, br in self.branches.items():
            if br.point >= n:
                branches[key] = copy.deepcopy(br)
            else:  # already coded before n: keep only what follows block n
                branches[key] = Branch(br.point, None, br.tail.tail(n))
        return TargetNet(trunk, branches, self.outputs, num_blocks=self.num_blocks, size_divisor=self.size_divisor,
                         in_chans=self.in_chans, task_weights=self.task_weights)

    def as_trunk(self) -> SequentialBlockNet:
        """The chain a student copies (Step 1 of Eq. 9): the trunk's blocks 1..P, then the blocks
        P+1..N of the stream that branches out last (P = max point; ties: the first stream).

        The coding at P is left out, so block P+1 first sees uncoded trunk features; block-wise
        training (Step 2) re-fits it before anything depends on it.
        """
        last = max(self.points.values())
        key = next(k for k, br in self.branches.items() if br.point == last)
        blocks = {int(i): copy.deepcopy(b) for i, b in self.trunk.items()}
        stream = [self.branches[key].tail.block(i) for i in range(last + 1, self.num_blocks + 1)]
        blocks.update({i: copy.deepcopy(b) for i, b in enumerate(stream, start=last + 1) if b is not None})
        if sorted(blocks) != list(range(1, self.num_blocks + 1)):
            raise ValueError(f"stream {key!r} does not hold blocks {last + 1}..{self.num_blocks}; cannot form a trunk")
        return SequentialBlockNet(blocks, None, num_blocks=self.num_blocks, size_divisor=self.size_divisor,
                                  in_chans=self.in_chans)

    def save(self, path, *, resolution=None, extra=None):
        """Write this TargetNet as one self-describing file (safetensors + architecture JSON, no
        pickle), atomically; ``pyamalgam.load(path)`` rebuilds it. See docs/deploy.md."""
        from ..models.serialize import save_model

        return save_model(self, path, resolution=resolution, extra=extra)

    def _run_trunk(self, x, start, stop, side):
        for i in range(start, stop + 1):
            x = self.trunk[str(i)](x, side)
        return x

    def _run_stream(self, key, trunk_features, n, side):
        """Stream ``key`` from its branch point p to block n: its coding, then blocks p+1..n."""
        br = self.branches[key]
        x, side = code(br.coding, trunk_features), dict(side)
        for i in range(br.point + 1, n + 1):
            block = br.tail.block(i)
            if block is None:  # e.g. a branch that is itself a TargetNet, multi-stream past its points
                raise NotImplementedError(f"branch {key!r} does not hold block {i} as one module; "
                                          f"its block-{n} features are not defined")
            x = block(x, side)
        return x


def _stream(features, key):
    return features[key] if isinstance(features, Mapping) else features


def assemble_target_net(student: BlockTrunk, codings: Mapping, teachers: Mapping[str, BlockNetwork], points: Mapping[str, int],
                        outputs: Mapping[str, Mapping], task_weights: Mapping[str, float] | None = None) -> TargetNet:
    """Step 4: shared student blocks 1..max(p), per teacher its coding at p and blocks p+1..N.

    The student's blocks after the last branch point are dropped. Everything is copied, so the
    TargetNet can be fine-tuned without touching the student, the codings or the teachers.
    """
    last = max(points.values())
    trunk = {i: copy.deepcopy(student.block(i)) for i in range(1, last + 1)}
    branches = {key: Branch(p, branch_coding(codings[str(p)][key]), teachers[key].tail(p)) for key, p in points.items()}
    net = TargetNet(trunk, branches, outputs, num_blocks=student.num_blocks, size_divisor=student.size_divisor,
                    in_chans=student.in_chans, task_weights=task_weights)
    return net.requires_grad_(True).train()

"""Step 1 of paper 001 and the checks before it: the teachers, their outputs and weights, the
student copied from one of them, the block shapes they must share, and the fixed probe images
of Eq. 7's final block losses. Everything here runs once, when an Amalgamator is built or fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .._checks import as_int, as_real
from ..engine import batch_len, module_device
from ..losses import get_task
from ..models.protocol import BlockNetwork, BlockTrunk, block_shapes, protocol_gap

__all__ = ["check_teachers", "resolve_outputs", "resolve_weights", "make_student", "validate_blocks",
           "plan_blocks", "BlockPlan", "fixed_batches", "check_choice", "check_hparams"]


def check_teachers(teachers) -> dict:
    """Every teacher must be a :class:`~pyamalgam.models.BlockNetwork` that implements the
    interface's required members (the error names the missing ones); all share N. Freezes them."""
    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError(f"teachers must be a non-empty mapping name -> network, got {type(teachers).__name__}")
    for key, t in teachers.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"teachers: names must be non-empty strings without '/', got {key!r}")
        why = protocol_gap(t, BlockNetwork)
        if why is not None:
            raise TypeError(f"teachers[{key!r}] must be an nn.Module speaking the block protocol "
                            f"(a pyamalgam.models.BlockNetwork); {why}")
    first_key, first_n = next((k, t.num_blocks) for k, t in teachers.items())
    for key, t in teachers.items():
        if t.num_blocks != first_n:
            raise ValueError(f"teachers must have the same number of blocks: teachers[{key!r}] has {t.num_blocks}, "
                             f"teachers[{first_key!r}] has {first_n}")
    for t in teachers.values():
        t.eval().requires_grad_(False)
        for p in t.parameters():
            p.grad = None  # e.g. a TargetNet-2 fresh from its fine-tune (Eq. 9): frozen from now on
    return dict(teachers)


def resolve_outputs(teachers, tasks) -> dict:
    """Teacher key -> (output name -> Task). A single-output teacher's one output is named after
    its key (``tasks=`` may give or override its task); a multi-output one keeps its names."""
    tasks = dict(tasks or {})
    unknown = set(tasks) - set(teachers)
    if unknown:
        raise ValueError(f"tasks: unknown teacher(s) {sorted(unknown)}; teachers are {sorted(teachers)}")
    outputs, seen = {}, {}
    for key, t in teachers.items():
        if key in tasks:
            outputs[key] = {key: get_task(tasks[key])}
        elif t.multi_output:  # e.g. a TargetNet (Eq. 9)
            outputs[key] = dict(t.tasks)
        else:
            outputs[key] = {key: _single_task(key, t)}
        for name in outputs[key]:
            if name in seen:
                raise ValueError(f"output {name!r} is predicted by both teachers[{seen[name]!r}] and teachers[{key!r}]")
            seen[name] = key
    return outputs


def _single_task(key, teacher):
    declared = list(teacher.tasks.values())
    if not declared:
        raise ValueError(f"teachers[{key!r}] declares no task; pass tasks={{{key!r}: ...}}")
    if len(declared) > 1:
        raise ValueError(f"teachers[{key!r}] declares tasks {sorted(teacher.tasks)} but is not multi_output; "
                         f"pass tasks={{{key!r}: ...}} or set multi_output = True")
    return declared[0]


def resolve_weights(teachers, outputs, weights):
    weights = dict(weights or {})
    names = {name for out in outputs.values() for name in out}
    unknown = set(weights) - names - set(teachers)
    if unknown:
        raise ValueError(f"weights: unknown name(s) {sorted(unknown)}; use output names {sorted(names)} or teacher names")
    for k, w in weights.items():
        if as_real(w) is None or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {w!r}")
    per_output, per_teacher = {}, {}
    for key, out in outputs.items():
        per_teacher[key] = float(weights.get(key, 1.0))
        inherited = teachers[key].task_weights  # a TargetNet keeps its own Eq. 6 lambdas
        for name in out:
            w = weights.get(name, 1.0) * (per_teacher[key] if name != key else 1.0) * inherited.get(name, 1.0)
            per_output[name] = float(w)
    return per_output, per_teacher


def make_student(teachers, init) -> BlockTrunk:
    """Step 1: the student is a copy of one teacher's chain of blocks 1..N, without a head.

    ``"teacher"`` copies the first teacher (in the mapping's order): SegNet for Eq. 6 / 8, and
    for Eq. 9 TargetNet-2, whose chain is its trunk continued by the stream that branches out
    last (:meth:`TargetNet.as_trunk`), so TargetNet-3 starts from what TargetNet-2 learnt
    rather than from NormNet. ``"random"`` re-initialises that copy. The copy must be a
    :class:`~pyamalgam.models.BlockTrunk` that holds every block as one module.
    """
    if init in ("teacher", "random"):
        source = next(iter(teachers))
    elif init in teachers:
        source = init
    else:
        raise ValueError(f"init must be 'teacher', 'random' or a teacher name {sorted(teachers)}, got {init!r}")
    try:
        student = teachers[source].as_trunk()
    except NotImplementedError as e:  # the protocol's default: this teacher offers no student template
        raise ValueError(f"init={init!r}: teachers[{source!r}] cannot be copied into the student: {e}") from None
    _check_student(student, f"init={init!r}: teachers[{source!r}].as_trunk()")
    if init == "random":
        student.reset_parameters()
    return student.requires_grad_(False)


def _check_student(student, origin) -> None:
    why = protocol_gap(student, BlockTrunk)
    if why is not None:
        raise TypeError(f"{origin} must return a student template (a pyamalgam.models.BlockTrunk); {why}")
    absent = [n for n in range(1, student.num_blocks + 1) if student.block(n) is None]
    if absent:
        raise ValueError(f"{origin} returned a trunk without a module for block(s) {absent}; a student trains every block")


@dataclass
class BlockPlan:
    """What the probe found: the student's block shapes, and for every teacher whose shapes differ
    (a heterogeneous teacher) its block shapes and the side tensors that need a connector.

    student: (C, H, W) of blocks 1..N of the student (a dict per stream for a TargetNet copy).
    teachers: teacher key -> its (C, H, W) per block, only for heterogeneous teachers.
    side: teacher key -> {side key: (student shape, teacher shape)} where they differ.
    side_owner: side key -> the student block that writes it.
    """

    student: list
    teachers: dict = field(default_factory=dict)
    side: dict = field(default_factory=dict)
    side_owner: dict = field(default_factory=dict)


def validate_blocks(teachers, student, probe_size) -> list:
    """Probe every teacher (:func:`plan_blocks`); returns the student's block shapes."""
    return plan_blocks(teachers, student, probe_size).student


def plan_blocks(teachers, student, probe_size) -> BlockPlan:
    """Probe every teacher: same block count (checked before), side keys, and block shapes.

    A teacher whose block features (or float side tensors) differ from the student's in channels
    or resolution is heterogeneous: it gets connectors (``connectors.py``). Refused: different
    input channels, different side keys, a multi-stream teacher (a TargetNet) of other shapes, and
    integer side information (pooling indices) of another shape, which no connector can map.
    """
    divisor = math.lcm(*(t.size_divisor for t in teachers.values()))
    in_chans = {key: t.in_chans for key, t in teachers.items()}
    if len(set(in_chans.values())) > 1:
        raise ValueError(f"teachers take different input channels: {in_chans}")
    h, w = probe_size if probe_size is not None else (2 * divisor, 2 * divisor)
    device = module_device(student)
    x = torch.rand(1, student.in_chans, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    plan = BlockPlan(block_shapes(student, x))
    student_side = None  # probed only when some teacher differs
    for key, t in teachers.items():
        shapes = block_shapes(t.to(device), x)
        with torch.no_grad():
            theirs = t.eval().side_keys(x)
            ours = None if theirs is None else student.eval().side_keys(x)
        if theirs is not None and theirs != ours:
            raise ValueError(f"teachers[{key!r}] carries side information {sorted(theirs)} but the student carries "
                             f"{sorted(ours)}; teachers must share the block structure")
        differ = _first_difference(key, shapes, plan.student)
        if theirs is None:  # multi-stream: no connectors for it
            if differ is not None:
                raise ValueError(f"{differ}; a multi-stream teacher (a TargetNet) must share the student's block shapes")
            continue
        if student_side is None:
            student_side, plan.side_owner = _student_side(student, x)
        side = _side_differences(key, t, x, student_side, differ)
        if differ is not None or side:
            plan.teachers[key], plan.side[key] = shapes, side
    return plan


def _first_difference(key, shapes, reference):
    """The message naming the first block whose shapes differ, or None."""
    for n, (got, want) in enumerate(zip(shapes, reference), start=1):
        for stream, shape in (got.items() if isinstance(got, dict) else [(None, got)]):
            if shape != want:
                where = f"teachers[{key!r}]" + ("" if stream is None else f" stream {stream!r}")
                return (f"block {n}: {where} gives features {shape} but the student (a copy of the "
                        f"first teacher) gives {want}")
    return None


@torch.no_grad()
def _student_side(student, x):
    """The student's side tensors on ``x`` and, per key, the block that writes it."""
    was_training = student.training
    student.eval()
    side, owner, feat = {}, {}, x
    try:
        for n in range(1, student.num_blocks + 1):
            before = set(side)
            feat = student.block(n)(feat, side)
            owner.update({k: n for k in set(side) - before})
    finally:
        student.train(was_training)
    return side, owner


@torch.no_grad()
def _side_differences(key, teacher, x, student_side, differ) -> dict:
    """side key -> (student shape, teacher shape) for the side tensors whose shapes differ."""
    _, theirs = teacher.eval().forward_until(x, teacher.num_blocks)
    out = {}
    for k in sorted(theirs):
        mine, t = student_side[k], theirs[k]
        if mine.shape == t.shape:
            continue
        if not (mine.is_floating_point() and t.is_floating_point()):
            lead = differ or f"teachers[{key!r}]'s side information differs from the student's"
            raise ValueError(f"{lead}, and its side information {k!r} ({t.dtype} {tuple(t.shape[1:])} vs the "
                             f"student's {tuple(mine.shape[1:])}, e.g. SegNet's pooling indices) cannot be mapped "
                             f"by a connector; teachers whose shapes differ need float side information (U-Net skips, "
                             f"e.g. unet_vgg) or none")
        if mine.dim() != 4 or t.dim() != 4:
            raise ValueError(f"teachers[{key!r}]: side information {k!r} has shape {tuple(t.shape)} but the student's "
                             f"has {tuple(mine.shape)}; only (B, C, H, W) feature maps can be connected")
        out[k] = (tuple(mine.shape[1:]), tuple(t.shape[1:]))
    return out


def fixed_batches(loader, count, probe_loader) -> list:
    """The probe batches of Eq. 7's final losses: every batch of ``probe_loader``, or ``count``
    images of ``loader.dataset`` at evenly spaced indices, batched like ``loader``.

    Read by index, not by iterating ``loader``, so that neither the loader's generator nor the
    global RNG moves: the training batches (and a resumed run's replay) stay what they were. A
    loader without an indexable data set gives its first batches instead.
    """
    if probe_loader is not None:
        batches = list(probe_loader)
        if not batches:
            raise ValueError("final_loss_loader yielded no batch")
        return batches
    n = as_int(count)
    if n is None or n < 1:
        raise ValueError(f"final_loss_images must be a positive int, got {count!r}")
    count = n
    dataset = getattr(loader, "dataset", None)
    indexable = (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
                 and not isinstance(dataset, torch.utils.data.IterableDataset))
    if not indexable:  # the first batches of one pass, the global RNG restored after
        with torch.random.fork_rng(devices=[]):
            batches, seen = [], 0
            for batch in loader:
                batches.append(batch)
                seen += batch_len(batch)
                if seen >= count:
                    break
        return batches
    size = len(dataset)
    count = min(count, size)
    indices = [i * size // count for i in range(count)]
    batch_size = getattr(loader, "batch_size", None) or 1
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    return [collate([dataset[i] for i in indices[j:j + batch_size]]) for j in range(0, count, batch_size)]


def check_choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return options[value]


def check_hparams(**values):
    for name, v in values.items():
        x = as_real(v)
        bad = x is None or not math.isfinite(x) or x < 0
        if bad or (name in ("lr", "reduction") and x <= 0) or (name == "momentum" and x >= 1):
            raise ValueError(f"{name} has an invalid value {v!r}")
    if as_int(values["reduction"]) is None:
        raise ValueError(f"reduction must be an int, got {values['reduction']!r}")

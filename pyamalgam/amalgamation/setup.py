"""Step 1 of paper 001 and the checks before it: the teachers, their outputs and weights, the
student copied from one of them, the block shapes they must share, and the fixed probe images
of Eq. 7's final block losses. Everything here runs once, when an Amalgamator is built or fit.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..engine import batch_len, module_device
from ..losses import get_task
from ..models.protocol import BlockNet, block_shapes

__all__ = ["check_teachers", "resolve_outputs", "resolve_weights", "make_student", "validate_blocks",
           "fixed_batches", "check_choice", "check_hparams"]


def check_teachers(teachers) -> dict:
    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError(f"teachers must be a non-empty mapping name -> network, got {type(teachers).__name__}")
    for key, t in teachers.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"teachers: names must be non-empty strings without '/', got {key!r}")
        missing = [a for a in ("forward_until", "forward_from", "tail", "num_blocks") if not hasattr(t, a)]
        if not isinstance(t, nn.Module) or missing:
            raise TypeError(f"teachers[{key!r}] must be an nn.Module speaking the block protocol "
                            f"(pyamalgam.models.BlockNetwork); it lacks {missing or 'nn.Module'}")
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
    tasks = dict(tasks or {})
    unknown = set(tasks) - set(teachers)
    if unknown:
        raise ValueError(f"tasks: unknown teacher(s) {sorted(unknown)}; teachers are {sorted(teachers)}")
    outputs, seen = {}, {}
    for key, t in teachers.items():
        if key in tasks:
            outputs[key] = {key: get_task(tasks[key])}
        elif isinstance(t, BlockNet):
            if t.task is None:
                raise ValueError(f"teachers[{key!r}] declares no task; pass tasks={{{key!r}: ...}}")
            outputs[key] = {key: t.task}
        else:  # a multi-output teacher (a TargetNet): its own output names
            outputs[key] = dict(t.tasks)
        for name in outputs[key]:
            if name in seen:
                raise ValueError(f"output {name!r} is predicted by both teachers[{seen[name]!r}] and teachers[{key!r}]")
            seen[name] = key
    return outputs


def resolve_weights(teachers, outputs, weights):
    weights = dict(weights or {})
    names = {name for out in outputs.values() for name in out}
    unknown = set(weights) - names - set(teachers)
    if unknown:
        raise ValueError(f"weights: unknown name(s) {sorted(unknown)}; use output names {sorted(names)} or teacher names")
    for k, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {w!r}")
    per_output, per_teacher = {}, {}
    for key, out in outputs.items():
        per_teacher[key] = float(weights.get(key, 1.0))
        inherited = getattr(teachers[key], "task_weights", {})  # a TargetNet keeps its own Eq. 6 lambdas
        for name in out:
            w = weights.get(name, 1.0) * (per_teacher[key] if name != key else 1.0) * inherited.get(name, 1.0)
            per_output[name] = float(w)
    return per_output, per_teacher


def make_student(teachers, init) -> BlockNet:
    """Step 1: the student is a copy of one teacher's chain of blocks 1..N, without a head.

    ``"teacher"`` copies the first teacher (in the mapping's order): SegNet for Eq. 6 / 8, and
    for Eq. 9 TargetNet-2, whose chain is its trunk continued by the stream that branches out
    last (:meth:`TargetNet.as_trunk`), so TargetNet-3 starts from what TargetNet-2 learnt
    rather than from NormNet. ``"random"`` re-initialises that copy.
    """
    if init in ("teacher", "random"):
        source = next(iter(teachers))
    elif init in teachers:
        source = init
    else:
        raise ValueError(f"init must be 'teacher', 'random' or a teacher name {sorted(teachers)}, got {init!r}")
    as_trunk = getattr(teachers[source], "as_trunk", None)
    if as_trunk is None:
        raise ValueError(f"init={init!r}: teachers[{source!r}] has no as_trunk() to copy the student from")
    student = as_trunk()
    if init == "random":
        student.reset_parameters()
    return student.requires_grad_(False)


def validate_blocks(teachers, student, probe_size) -> list:
    """Probe every teacher: same block count (checked before) and block feature shapes."""
    divisor = math.lcm(*(getattr(t, "size_divisor", 1) for t in teachers.values()))
    in_chans = {key: getattr(t, "in_chans", 3) for key, t in teachers.items()}
    if len(set(in_chans.values())) > 1:
        raise ValueError(f"teachers take different input channels: {in_chans}")
    h, w = probe_size if probe_size is not None else (2 * divisor, 2 * divisor)
    device = module_device(student)
    x = torch.rand(1, student.in_chans, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    reference = block_shapes(student, x)
    ref_name = "the student"
    for key, t in teachers.items():
        for n, (got, want) in enumerate(zip(block_shapes(t.to(device), x), reference), start=1):
            for stream, shape in (got.items() if isinstance(got, dict) else [(None, got)]):
                if shape != want:
                    where = f"teachers[{key!r}]" + ("" if stream is None else f" stream {stream!r}")
                    raise ValueError(f"block {n}: {where} gives features {shape} but {ref_name} (a copy of the "
                                     f"first teacher) gives {want}; teachers must share block shapes")
        if isinstance(t, BlockNet):
            with torch.no_grad():
                theirs = set(t.eval().forward_until(x, t.num_blocks)[1])
                ours = set(student.eval().forward_until(x, student.num_blocks)[1])
            if theirs != ours:
                raise ValueError(f"teachers[{key!r}] carries side information {sorted(theirs)} but the student carries "
                                 f"{sorted(ours)}; teachers must share the block structure")
    return reference


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
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"final_loss_images must be a positive int, got {count!r}")
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
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        if bad or v < 0 or (name in ("lr", "reduction") and v <= 0) or (name == "momentum" and v >= 1):
            raise ValueError(f"{name} has an invalid value {v!r}")
    if not isinstance(values["reduction"], int):
        raise ValueError(f"reduction must be an int, got {values['reduction']!r}")

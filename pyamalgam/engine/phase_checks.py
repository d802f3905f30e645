"""The checks a resumed phase's state passes before the engine uses it (docs/robustness.md).

A :class:`~pyamalgam.engine.PhaseState` comes from a checkpoint's meta and tensors, both
untrusted: :func:`check_phase_meta` checks the meta's fields (types, ranges, what a mid-phase
state must hold) and :func:`check_unpacked` the unpacked states; :func:`restore_optimizer`
loads the optimiser and scheduler state and checks it against the phase's parameters (PyTorch
accepts a momentum buffer of the wrong shape and fails steps later). Every problem is a
:class:`~pyamalgam.engine.schema.CorruptFileError` naming the file.
"""
from __future__ import annotations

import torch

from .schema import ANY, CorruptFileError, Int, ListOf, MapOf, Nullable, Num, Record, validate

__all__ = ["check_phase_meta", "check_unpacked", "restore_optimizer"]

_MID_PHASE = ("epoch_rng", "optimizer", "scheduler", "sums")
_META = Record({"rng": ANY}, {"step": Nullable(Int(0)), "total": Nullable(Int(1)), **{k: ANY for k in _MID_PHASE}})
_OPTIMIZER = Record({"state": MapOf(ANY, ANY), "param_groups": ListOf(Record({"params": ListOf(Int(0))}))})
_SCHEDULER = Record({"last_epoch": Int(-1), "base_lrs": ListOf(Num(finite=True))})


def check_phase_meta(meta, source) -> None:
    """The engine's fields of a checkpoint meta: ``step`` <= ``total``, and a mid-phase state
    (``step`` set) holds the epoch's RNG, the optimiser, the scheduler and the sums."""
    validate(meta, _META, source)
    step, total = meta.get("step"), meta.get("total")
    if step is not None:
        if total is None or step > total:
            raise CorruptFileError(f"{source}: meta['step'] = {step} needs a meta['total'] >= it, got {total!r}",
                                   source)
        missing = [k for k in _MID_PHASE if k not in meta]
        if missing:
            raise CorruptFileError(f"{source}: a checkpoint inside a phase (step {step}) lacks {missing}", source)


def check_unpacked(state: dict, source) -> None:
    """The unpacked states: RNG states are mappings, the optimiser and scheduler states have
    their PyTorch layout, the sums are float scalars (the RNG contents: ``Engine.check_rng``)."""
    for key in ("rng", "epoch_rng"):
        if key in state and not isinstance(state[key], dict):
            raise CorruptFileError(f"{source}: meta[{key!r}] must hold a mapping of generator states", source)
    if "optimizer" in state:
        validate(_plain(state["optimizer"]), _OPTIMIZER, source, "meta['optimizer']")
    if "scheduler" in state:
        validate(_plain(state["scheduler"]), _SCHEDULER, source, "meta['scheduler']")
    sums = state.get("sums", {})
    if not isinstance(sums, dict) or not all(isinstance(k, str) and _float_scalar(v) for k, v in sums.items()):
        raise CorruptFileError(f"{source}: meta['sums'] must map term names to float scalars", source)


def restore_optimizer(opt: torch.optim.Optimizer, sched, resume) -> None:
    """``opt`` and ``sched`` from the mid-phase state ``resume``; its optimiser buffers must
    have the shapes of the parameters they belong to."""
    source = resume.source or "the checkpoint"
    try:
        opt.load_state_dict(resume.optimizer)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CorruptFileError(f"{source}: its optimizer state does not fit this phase's parameters: {e}",
                               source) from None
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise CorruptFileError(f"{source}: optimizer buffer {name!r} has shape {list(value.shape)}, its "
                                           f"parameter {list(p.shape)}", source)
    sched.load_state_dict(resume.scheduler)


def _plain(obj):
    """A state with its tensors replaced by None: only the layout is checked."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return None if isinstance(obj, torch.Tensor) else obj


def _float_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == 1


"""The Distiller's checkpoint: what ``last.safetensors`` holds, its schema, and resuming from it.

Tensors: the student (``student/``), the terms' modules with their connectors (``terms/``), the
holistic critic and its optimiser (``ho/``, from its ``state_tensors()``), and the engine's
:class:`~pyamalgam.engine.PhaseState` inside the phase (optimiser, RNG). Meta: the phase
("train" inside it, "done" after it), the setup (``Distiller._config()``: a checkpoint of
another setup is refused), the planned steps, and the run log's history. Only rank 0 writes,
atomically; every rank reads.

The file is untrusted: the meta is checked against :func:`meta_schema` and the engine's
checks, the RNG states on scratch generators, every tensor's name and shape against this
Distiller, all before anything changes, so a bad file is one CorruptFileError naming it.
"""
from __future__ import annotations

from pathlib import Path

from ..engine import (
    CorruptFileError,
    PhaseState,
    check_tensors,
    check_weights,
    load_checkpoint,
    save_checkpoint,
)
from ..engine.lock import hold_folders
from ..engine.phase_checks import check_phase_meta
from ..engine.schema import ANY, Int, ListOf, MapOf, Record, Str, validate

__all__ = [
    "CHECKPOINT_NAME",
    "DONE",
    "MAX_HISTORY",
    "hold_folders",
    "open_run",
    "resume_run",
    "save_run",
    "split_parts",
    "write_run",
]

CHECKPOINT_NAME = "last.safetensors"
MAX_HISTORY = 100_000
DONE = "done"  # what resume_run returns for a checkpoint written after the phase
_PARTS = ("student/", "terms/", "ho/")
_ENGINE_PARTS = ("rng", "epoch_rng", "optimizer", "scheduler", "sums")  # PhaseState.to_meta's tensors


def checkpoint_path(d) -> Path | None:
    return None if d.checkpoint_dir is None else d.checkpoint_dir / CHECKPOINT_NAME


def _tensors(d) -> dict:
    tensors = {f"student/{k}": v for k, v in d.student.state_dict().items()}
    tensors.update({f"terms/{k}": v for k, v in d.step_module.losses.state_dict().items()})
    if d.holistic is not None:
        tensors.update({f"ho/{k}": v for k, v in d.holistic.state_tensors().items()})
    return tensors


def save_run(d, phase: str, steps: int, state: PhaseState | None = None) -> None:
    """Checkpoint ``d`` (rank 0): its networks and critic, where the run is, its log."""
    path = checkpoint_path(d)
    if path is None or d.rank != 0:  # one writer; every rank holds the same weights
        return
    write_run(d, path, _tensors(d), phase, steps, d._config(), state)


def write_run(owner, path, tensors: dict, phase: str, steps: int, config: dict, state: PhaseState | None) -> None:
    """Write a single-phase run's checkpoint (this module's layout; the MultiTaskTrainer's too):
    ``tensors`` (never a NaN one), and a meta of the phase, the planned steps, the setup
    ``config``, ``owner``'s log history and the engine's ``state`` (default: its RNG only)."""
    check_weights(tensors, f"checkpoint {path}", f"in the {phase} phase")  # never a NaN checkpoint
    state = state if state is not None else PhaseState(rng=owner.engine.rng_state())
    meta = {"phase": phase, "steps": steps, "config": config, "history": owner.history, **state.to_meta(tensors)}
    save_checkpoint(path, tensors, meta)


def meta_schema() -> Record:
    return Record({"phase": Str(("train", DONE)), "steps": Int(1), "config": MapOf(Str(), ANY),
                   "history": ListOf(Record({"event": Str()}), max_len=MAX_HISTORY)})


def resume_run(d, resume, loader, steps: int):
    """Restore ``d`` from the checkpoint ``resume`` names (True: ``checkpoint_dir``'s, if any;
    or a path): the PhaseState to continue, :data:`DONE` for a finished run, None to start
    afresh. ``loader`` (this fit's) gets the checkpoint's loader-generator state."""
    opened = open_run(d, resume, loader, steps, d._config())
    if opened is None:
        return None
    path, tensors, meta, state = opened
    parts = _check_parts(d, tensors, path)
    # Everything we can check fits: only now does d change, the critic first (its own
    # load_state_tensors has the last word on its layout; if it refuses, nothing else changed).
    if d.holistic is not None:
        try:
            d.holistic.load_state_tensors(parts["ho/"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptFileError(f"{path}: the holistic critic's state does not load: {e}", path) from None
    d.student.load_state_dict(parts["student/"])
    d.step_module.losses.load_state_dict(parts["terms/"])
    d.engine.log.restore(meta["history"])  # what a killed run logged after this checkpoint goes
    d.engine.restore_rng(state.rng, loader)
    return state if state.step is not None else DONE


def open_run(owner, resume, loader, steps: int, config: dict):
    """Read and check the checkpoint ``resume`` names for a single-phase run of ``steps`` steps
    (the Distiller's and the MultiTaskTrainer's): the meta against :func:`meta_schema`, the setup
    against ``config``, the engine's fields, the RNG states against ``loader``; nothing of
    ``owner`` changes. (path, tensors, meta, PhaseState), or None to start afresh."""
    path = _resume_path(resume, owner.checkpoint_dir)
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    validate(meta, meta_schema(), path)
    if meta["config"] != config:
        raise CorruptFileError(f"resume: {path} was written by a different setup:\n  checkpoint {meta['config']}\n"
                               f"  now        {config}", path)
    check_phase_meta(meta, path)
    mid_phase = meta.get("step") is not None
    if mid_phase != (meta["phase"] == "train") or (mid_phase and meta["total"] != meta["steps"]):
        raise CorruptFileError(f"{path}: a {meta['phase']!r} checkpoint with meta['step'] = {meta.get('step')!r} "
                               f"and meta['total'] = {meta.get('total')!r} (of {meta['steps']} steps)", path)
    if meta["steps"] != steps:
        raise ValueError(f"resume: {path} is a run of {meta['steps']} steps, this fit plans {steps} (another "
                         f"loader length, epochs or max_steps); fit as the run began, or pass resume=False")
    state = PhaseState.from_meta(meta, tensors, source=path)
    try:
        owner.engine.check_rng(state.rng, loader)
    except ValueError as e:
        raise CorruptFileError(f"{path}: {e}", path) from None
    return path, tensors, meta, state


def split_parts(tensors: dict, parts: tuple, path, what: str) -> dict:
    """``tensors`` by part: prefix -> its tensors without the prefix; a tensor of no part (nor
    of the engine's PhaseState) is a CorruptFileError naming the file (``what``: whose checkpoint)."""
    unknown = sorted(k for k in tensors if not k.startswith(parts) and not k.startswith(_ENGINE_PARTS))
    if unknown:
        raise CorruptFileError(f"{path}: tensors {unknown[:3]} belong to no part of a {what} checkpoint", path)
    return {p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in parts}


def _check_parts(d, tensors, path) -> dict:
    parts = split_parts(tensors, _PARTS, path, "Distiller")
    check_tensors(d.student.state_dict(), parts["student/"], f"{path}: the student", path)
    check_tensors(d.step_module.losses.state_dict(), parts["terms/"], f"{path}: the terms' connectors", path)
    if d.holistic is None and parts["ho/"]:
        raise CorruptFileError(f"{path}: holds a holistic critic, this Distiller has no 'ho' term", path)
    if d.holistic is not None:  # the names a critic keeps may grow (optimiser state): compare what both have
        now = d.holistic.state_tensors()
        for k in sorted(now.keys() & parts["ho/"].keys()):
            if tuple(now[k].shape) != tuple(parts["ho/"][k].shape):
                raise CorruptFileError(f"{path}: the holistic critic's {k!r} has shape {list(parts['ho/'][k].shape)}, "
                                       f"the critic needs {list(now[k].shape)}", path)
    return parts


def _resume_path(resume, checkpoint_dir) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:  # the default: resume when there is something to resume
        path = None if checkpoint_dir is None else checkpoint_dir / CHECKPOINT_NAME
        return path if path is not None and path.is_file() else None
    if not isinstance(resume, (str, Path)):
        raise TypeError(f"resume must be True, False or a checkpoint path, got {type(resume).__name__}")
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path



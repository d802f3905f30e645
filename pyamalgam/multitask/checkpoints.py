"""The multi-task trainer's checkpoint ``last.safetensors``: the step module (network, S paths,
adaptors, weighting state) under ``step/``, the engine's PhaseState inside the phase, and in the
meta the phase ("train" or "done"), the planned steps, the setup (a checkpoint of another setup is
refused) and the run log's history. Read as untrusted: everything is checked before anything
changes (the pattern of :mod:`pyamalgam.distill.checkpoints`)."""
from __future__ import annotations

from pathlib import Path

from ..engine import CorruptFileError, PhaseState, check_tensors, check_weights, load_checkpoint, save_checkpoint
from ..engine.phase_checks import check_phase_meta
from ..engine.schema import ANY, Int, ListOf, MapOf, Record, Str, validate

__all__ = ["CHECKPOINT_NAME", "DONE", "save_run", "resume_run"]

CHECKPOINT_NAME = "last.safetensors"
DONE = "done"
_PART = "step/"
_ENGINE_PARTS = ("rng", "epoch_rng", "optimizer", "scheduler", "sums")


def save_run(tr, phase: str, steps: int, state: PhaseState | None = None) -> None:
    """Checkpoint trainer ``tr`` (rank 0 only, atomically; never a NaN weight)."""
    if tr.checkpoint_dir is None or tr.rank != 0:
        return
    path = tr.checkpoint_dir / CHECKPOINT_NAME
    tensors = {_PART + k: v for k, v in tr.step_module.state_dict().items()}
    check_weights(tensors, f"checkpoint {path}", f"in the {phase} phase")
    state = state if state is not None else PhaseState(rng=tr.engine.rng_state())
    meta = {"phase": phase, "steps": steps, "config": tr.config(), "history": tr.history, **state.to_meta(tensors)}
    save_checkpoint(path, tensors, meta)


def resume_run(tr, resume, loader, steps: int):
    """The PhaseState to continue, :data:`DONE` (a finished run, restored) or None (start afresh)."""
    path = _resume_path(resume, tr.checkpoint_dir)
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    validate(meta, Record({"phase": Str(("train", DONE)), "steps": Int(1), "config": MapOf(Str(), ANY),
                           "history": ListOf(Record({"event": Str()}), max_len=100_000)}), path)
    if meta["config"] != tr.config():
        raise CorruptFileError(f"resume: {path} was written by a different setup:\n  checkpoint {meta['config']}\n"
                               f"  now        {tr.config()}", path)
    check_phase_meta(meta, path)
    mid_phase = meta.get("step") is not None
    if mid_phase != (meta["phase"] == "train"):
        raise CorruptFileError(f"{path}: a {meta['phase']!r} checkpoint with meta['step'] = {meta.get('step')!r}", path)
    if meta["steps"] != steps:
        raise ValueError(f"resume: {path} is a run of {meta['steps']} steps, this fit plans {steps}; fit as the run "
                         f"began, or pass resume=False")
    state = PhaseState.from_meta(meta, tensors, source=path)
    try:
        tr.engine.check_rng(state.rng, loader)
    except ValueError as e:
        raise CorruptFileError(f"{path}: {e}", path) from None
    unknown = sorted(k for k in tensors if not k.startswith(_PART) and not k.startswith(_ENGINE_PARTS))
    if unknown:
        raise CorruptFileError(f"{path}: tensors {unknown[:3]} belong to no part of a multi-task checkpoint", path)
    part = {k[len(_PART):]: v for k, v in tensors.items() if k.startswith(_PART)}
    check_tensors(tr.step_module.state_dict(), part, f"{path}: the multi-task network", path)
    tr.step_module.load_state_dict(part)  # everything checked: only now does the trainer change
    tr.engine.log.restore(meta["history"])
    tr.engine.restore_rng(state.rng, loader)
    return state if mid_phase else DONE


def _resume_path(resume, checkpoint_dir) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        path = None if checkpoint_dir is None else checkpoint_dir / CHECKPOINT_NAME
        return path if path is not None and path.is_file() else None
    if not isinstance(resume, (str, Path)):
        raise TypeError(f"resume must be True, False or a checkpoint path, got {type(resume).__name__}")
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path

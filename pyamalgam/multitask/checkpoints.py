"""The multi-task trainer's checkpoint ``last.safetensors``: the step module (network, S paths,
adaptors, weighting state) under ``step/``, the engine's PhaseState inside the phase, and in the
meta the phase ("train" or "done"), the planned steps, the setup (a checkpoint of another setup is
refused) and the run log's history. Read as untrusted: everything is checked before anything
changes. The layout and its checks are the Distiller's single-phase ones
(:mod:`pyamalgam.distill.checkpoints`: :func:`write_run`, :func:`open_run`, :func:`split_parts`)."""
from __future__ import annotations

from ..distill.checkpoints import (
    CHECKPOINT_NAME,
    DONE,
    open_run,
    split_parts,
    write_run,
)
from ..engine import PhaseState, check_tensors

__all__ = ["CHECKPOINT_NAME", "DONE", "resume_run", "save_run"]

_PART = "step/"


def save_run(tr, phase: str, steps: int, state: PhaseState | None = None) -> None:
    """Checkpoint trainer ``tr`` (rank 0 only, atomically; never a NaN weight)."""
    if tr.checkpoint_dir is None or tr.rank != 0:
        return
    tensors = {_PART + k: v for k, v in tr.step_module.state_dict().items()}
    write_run(tr, tr.checkpoint_dir / CHECKPOINT_NAME, tensors, phase, steps, tr.config(), state)


def resume_run(tr, resume, loader, steps: int):
    """The PhaseState to continue, :data:`DONE` (a finished run, restored) or None (start afresh)."""
    opened = open_run(tr, resume, loader, steps, tr.config())
    if opened is None:
        return None
    path, tensors, meta, state = opened
    part = split_parts(tensors, (_PART,), path, "multi-task")[_PART]
    check_tensors(tr.step_module.state_dict(), part, f"{path}: the multi-task network", path)
    tr.step_module.load_state_dict(part)  # everything checked: only now does the trainer change
    tr.engine.log.restore(meta["history"])
    tr.engine.restore_rng(state.rng, loader)
    return state if state.step is not None else DONE

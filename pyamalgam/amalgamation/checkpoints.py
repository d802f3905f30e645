"""The Amalgamator's checkpoint: what ``last.safetensors`` holds and how a run continues from it.

One file per run (docs/amalgamation.md, "Checkpoints and resume"). Its tensors are the student,
the codings and, once assembled, the TargetNet; its meta is where the run is (phase and block),
the setup it belongs to, the loss tables Eq. 7 reads, the log history, and the engine's
:class:`~pyamalgam.engine.PhaseState` inside a phase. Only rank 0 writes, atomically
(:func:`~pyamalgam.engine.save_checkpoint`); every rank reads.

These functions read and restore the state of an :class:`~pyamalgam.Amalgamator` ``am``: its
networks, ``completed_blocks``, ``loss_table``, ``feature_table``, ``branch_points``, history.

The file is untrusted: a resume checks all of it (the meta against :mod:`.run_meta`'s schema,
the engine's states, every tensor's name and shape) before it changes anything of ``am``, so a
corrupt checkpoint is one CorruptFileError naming the file and leaves ``am`` as it was. The log
follows the checkpoint (``docs/amalgamation.md``, "Checkpoints and resume"), and
:func:`hold_folders` keeps a second process out of ``checkpoint_dir`` and ``log_dir``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.lock import hold_folders
from ..engine import (CorruptFileError, PhaseState, check_tensors, check_weights, load_checkpoint,
                      save_checkpoint)
from .run_meta import check_run_meta

__all__ = ["CHECKPOINT_NAME", "Pending", "checkpoint_path", "resume_run", "save_run", "hold_folders",
           "branch_out_logged"]

CHECKPOINT_NAME = "last.safetensors"


@dataclass
class Pending:
    """Where a checkpoint left the run: the phase, its block, and the engine's state in it."""

    phase: str
    block: int
    state: PhaseState

    @property
    def step(self) -> int | None:
        return self.state.step


def checkpoint_path(checkpoint_dir) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME


def save_run(am, phase: str, n: int, state: PhaseState | None = None) -> None:
    """Checkpoint ``am``: the networks, the tables, and where the run is (``state`` inside a phase)."""
    path = checkpoint_path(am.checkpoint_dir)
    if path is None or am.rank != 0:  # one writer; every rank holds the same weights
        return
    tensors: dict = {}
    for prefix, module in (("student", am.student), ("codings", am.codings), ("target", am.target_net)):
        if module is not None:
            tensors.update({f"{prefix}/{k}": v for k, v in module.state_dict().items()})
    check_weights(tensors, f"checkpoint {path}", f"in the {phase} phase at block {n}")  # never a NaN checkpoint
    state = state if state is not None else PhaseState(rng=am.engine.rng_state())
    meta = {
        "phase": phase, "block": n, "config": am._config(), "completed_blocks": sorted(am.completed_blocks),
        "loss_table": _str_keys(am.loss_table), "feature_table": _str_keys(am.feature_table),
        "history": am.history, "branch_points": am.branch_points, **state.to_meta(tensors),
    }
    save_checkpoint(path, tensors, meta)


def resume_run(am, resume, phases, loader) -> Pending | None:
    """Restore ``am`` from the checkpoint ``resume`` names (True: the one in ``checkpoint_dir``,
    if any; or a path) when it was written in one of ``phases``; None: start afresh.

    A checkpoint of another setup, or one that does not fit (see the module docstring), is
    refused before ``am`` changes. ``loader`` (the loader of the call being resumed) gets the
    checkpoint's loader-generator state, so its shuffle continues.
    """
    path = _resume_path(resume, am.checkpoint_dir)
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    check_run_meta(am, meta, path)
    if meta["phase"] not in phases:
        return None  # e.g. finetune(resume=True) after a checkpoint of the block phase
    pending = Pending(meta["phase"], meta["block"], PhaseState.from_meta(meta, tensors, source=path))
    try:
        am.engine.check_rng(pending.state.rng, loader)
    except ValueError as e:
        raise CorruptFileError(f"{path}: {e}", path) from None
    student, codings = _prefixed(tensors, "student/"), _prefixed(tensors, "codings/")
    check_tensors(am.student.state_dict(), student, f"{path}: the student", path)
    check_tensors(am.codings.state_dict(), codings, f"{path}: the codings", path)
    target = None
    if meta["phase"] in ("finetune", "done"):
        target = _target_for(am, meta["branch_points"])
        check_tensors(target.state_dict(), _prefixed(tensors, "target/"), f"{path}: the TargetNet", path)
    # Everything fits: only now does am change.
    am.student.load_state_dict(student)
    am.codings.load_state_dict(codings)
    am.completed_blocks = set(meta["completed_blocks"])
    am.loss_table = _int_keys(meta["loss_table"])
    am.feature_table = _int_keys(meta["feature_table"])
    am.engine.log.restore(meta["history"])  # the log file too: what a killed run wrote after this checkpoint goes
    if target is not None:
        am.branch_points, am.target_net = dict(meta["branch_points"]), target
        target.load_state_dict(_prefixed(tensors, "target/"))
        am._logged_branch_out = dict(meta["branch_points"])  # in the history already: branch_out() won't repeat it
    am.engine.restore_rng(pending.state.rng, loader)  # the loader of this call continues its shuffle
    return pending


def branch_out_logged(am, points) -> bool:
    """True (once) when ``points`` is the branch-out of the checkpoint ``am`` resumed from: its
    record is in the restored log, and logging it again would duplicate it."""
    logged, am._logged_branch_out = getattr(am, "_logged_branch_out", None), None
    return logged is not None and logged == points




def _resume_path(resume, checkpoint_dir) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        path = checkpoint_path(checkpoint_dir)
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint's path)")
        return path if path.is_file() else None  # nothing to resume: a fresh run
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path


def _target_for(am, points):
    """The TargetNet a fine-tune checkpoint of branch ``points`` restores into (not yet am's)."""
    if am.target_net is not None:
        if am.branch_points != points:
            raise ValueError(f"resume: the checkpoint fine-tunes branch points {points}, but branch_out() chose "
                             f"{am.branch_points}")
        return am.target_net
    return am._build_target(points)


def _prefixed(tensors, prefix) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _str_keys(table) -> dict:
    return {name: {str(n): v for n, v in row.items()} for name, row in table.items()}


def _int_keys(table) -> dict:
    return {name: {int(n): v for n, v in row.items()} for name, row in table.items()}

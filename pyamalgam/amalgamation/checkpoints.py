"""The Amalgamator's checkpoint: what ``last.safetensors`` holds and how a run continues from it.

One file per run (docs/amalgamation.md, "Checkpoints and resume"). Its tensors are the student,
the codings and, once assembled, the TargetNet; its meta is where the run is (phase and block),
the setup it belongs to, the loss tables Eq. 7 reads, the log history, and the engine's
:class:`~pyamalgam.engine.PhaseState` inside a phase. Only rank 0 writes, atomically
(:func:`~pyamalgam.engine.save_checkpoint`); every rank reads.

These functions read and restore the state of an :class:`~pyamalgam.Amalgamator` ``am``: its
networks, ``completed_blocks``, ``loss_table``, ``feature_table``, ``branch_points``, history.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import PhaseState, load_checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_NAME", "Pending", "checkpoint_path", "resume_run", "save_run"]

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

    A checkpoint of another setup is refused. ``loader`` (the loader of the call being resumed)
    gets the checkpoint's loader-generator state, so its shuffle continues.
    """
    path = _resume_path(resume, am.checkpoint_dir)
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    if meta["config"] != am._config():
        raise ValueError(f"resume: {path} was written by a different setup:\n  checkpoint {meta['config']}\n"
                         f"  now        {am._config()}")
    if meta["phase"] not in phases:
        return None  # e.g. finetune(resume=True) after a checkpoint of the block phase
    am.student.load_state_dict(_prefixed(tensors, "student/"))
    am.codings.load_state_dict(_prefixed(tensors, "codings/"))
    am.completed_blocks = set(meta["completed_blocks"])
    am.loss_table = _int_keys(meta["loss_table"])
    am.feature_table = _int_keys(meta["feature_table"])
    am.history[:] = meta["history"]
    if meta["phase"] in ("finetune", "done"):
        _restore_target(am, meta["branch_points"], _prefixed(tensors, "target/"))
    pending = Pending(meta["phase"], meta["block"], PhaseState.from_meta(meta, tensors))
    am.engine.restore_rng(pending.state.rng, loader)  # the loader of this call continues its shuffle
    return pending


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


def _restore_target(am, points, state) -> None:
    if am.target_net is not None and am.branch_points != points:
        raise ValueError(f"resume: the checkpoint fine-tunes branch points {points}, but branch_out() chose {am.branch_points}")
    if am.target_net is None:
        am.branch_points = dict(points)
        am._assemble()
    am.target_net.load_state_dict(state)


def _prefixed(tensors, prefix) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _str_keys(table) -> dict:
    return {name: {str(n): v for n, v in row.items()} for name, row in table.items()}


def _int_keys(table) -> dict:
    return {name: {int(n): v for n, v in row.items()} for name, row in table.items()}

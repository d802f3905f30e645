"""The Amalgamator's final TargetNet as one model file (issue 13; docs/deploy.md).

``Amalgamator.save_target(path)`` (and ``finetune(..., save=True)``) write
:attr:`~pyamalgam.Amalgamator.target_net` with :meth:`TargetNet.save`: safetensors weights and
the architecture as JSON, no pickle, atomically, so ``pyamalgam.load`` / ``pyamalgam predict`` /
``pyamalgam export`` read it without the run that trained it. The default place is
``<checkpoint_dir>/target_net.safetensors``, beside the run's resume checkpoint
(``last.safetensors``, which holds training state, not a deployable model).
"""
from __future__ import annotations

from pathlib import Path

from ..models.serialize import describe, model_meta

__all__ = ["TARGET_NAME", "check_savable", "save_target"]

TARGET_NAME = "target_net.safetensors"


def check_savable(am, path=None) -> Path:
    """The file ``am``'s TargetNet goes to (``path``, or ``<checkpoint_dir>/target_net.safetensors``),
    after checking that there is a TargetNet and that a model file can describe it; a ValueError
    naming the branch and the module otherwise (checked before a fine-tune spends its steps)."""
    if am.target_net is None:
        raise RuntimeError("save_target() needs a TargetNet: call branch_out() (then finetune()) first")
    if path is None:
        if am.checkpoint_dir is None:
            raise ValueError(f"save_target() needs a path, or an Amalgamator with checkpoint_dir (the file is then "
                             f"<checkpoint_dir>/{TARGET_NAME})")
        path = am.checkpoint_dir / TARGET_NAME
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save_target(): {path} is a folder; give the model file's path (e.g. {path / TARGET_NAME})")
    _check_describable(am.target_net)
    return path


def _check_describable(net) -> None:
    """A ValueError naming the first branch whose tail a model file cannot hold, then whatever
    else the architecture record refuses (the trunk, a coding, a task given as a loss callable).
    Heterogeneous teachers' connectors and smp blocks are described (docs/deploy.md)."""
    for key, branch in net.branches.items():
        try:
            describe(branch.tail)
        except ValueError as e:
            _refuse(f"the tail of branch {key!r} ({type(branch.tail).__name__}): {e}")
    try:
        model_meta(net)
    except ValueError as e:
        _refuse(str(e))


def _refuse(why: str):
    raise ValueError(f"cannot save this TargetNet as a model file: {why}. It stays usable in Python and in the "
                     f"run's checkpoint (last.safetensors)")


def save_target(am, path: Path, resolution=None):
    """Write ``am.target_net`` to ``path`` (rank 0 only; None on the other ranks)."""
    if am.rank != 0:
        return None
    extra = {"branch_points": dict(am.branch_points or {}), "teachers": sorted(am.teachers),
             "objective": am.objective, "parameters": am.parameter_report()}
    if am.structured is not None:
        extra["terms"] = am.structured.config()
    return am.target_net.save(path, resolution=resolution, extra=extra)

"""The schema of an Amalgamator checkpoint's meta, checked before a resume acts on it.

``last.safetensors`` is untrusted (torn, foreign, crafted). Before anything of the Amalgamator
changes, :func:`check_run_meta` checks every field the resume reads: its type, its range for
this setup (blocks 1..N, this run's outputs and teachers, finite losses), and that the fields
agree with each other (a completed block has a loss for every output; a checkpoint past the
branch-out has a branch point per teacher). Every problem is a CorruptFileError naming the file
and the field (``docs/robustness.md``).
"""
from __future__ import annotations

from ..engine.phase_checks import check_phase_meta
from ..engine.schema import ANY, CorruptFileError, Int, IntKey, ListOf, MapOf, Nullable, Num, Record, Str, validate

__all__ = ["check_run_meta", "MAX_HISTORY"]

MAX_HISTORY = 100_000  # log records a checkpoint may carry (a run writes N + a few)
PHASES = ("blocks", "finetune", "done")


def check_run_meta(am, meta, path) -> None:
    """``meta`` (a dict: load_checkpoint checked that) fits ``am``'s setup, else CorruptFileError."""
    validate(meta, Record({"config": MapOf(Str(), ANY)}), path)
    if meta["config"] != am._config():
        raise CorruptFileError(f"resume: {path} was written by a different setup:\n  checkpoint {meta['config']}\n"
                               f"  now        {am._config()}", path)
    validate(meta, _schema(am), path)
    check_phase_meta(meta, path)  # the engine's fields: step, total, what a mid-phase state holds
    _check_consistent(am, meta, path)


def _schema(am) -> Record:
    n_blocks, teachers = am.num_blocks, list(am.teachers)
    outputs = [name for out in am._outputs.values() for name in out]
    per_block = MapOf(IntKey(1, n_blocks), Num(finite=True), max_len=n_blocks)
    return Record({
        "phase": Str(PHASES),
        "block": Int(1, n_blocks + 1),
        "completed_blocks": ListOf(Int(1, n_blocks), max_len=n_blocks, unique=True),
        "loss_table": MapOf(Str(outputs), per_block),
        "feature_table": MapOf(Str(teachers), per_block),
        "history": ListOf(Record({"event": Str()}), max_len=MAX_HISTORY),
        "branch_points": Nullable(MapOf(Str(teachers), Int(1, n_blocks))),
    })


def _check_consistent(am, meta, path) -> None:
    def fail(problem):
        raise CorruptFileError(f"{path}: {problem}", path)

    phase, block, done = meta["phase"], meta["block"], set(meta["completed_blocks"])
    mid_phase = meta.get("step") is not None
    if phase == "blocks" and block > am.num_blocks:
        fail(f"meta['block'] = {block} is past the last block {am.num_blocks} of the block phase")
    if phase == "blocks" and mid_phase == (block in done):
        fail(f"block {block} is {'listed' if block in done else 'not listed'} in meta['completed_blocks'] "
             f"{sorted(done)} but the checkpoint is {'inside' if mid_phase else 'after'} it")
    if phase != "blocks":
        points = meta["branch_points"] or {}
        if block != am.num_blocks + 1 or sorted(points) != sorted(am.teachers):
            fail(f"a {phase!r} checkpoint needs meta['block'] = {am.num_blocks + 1} and a branch point per teacher "
                 f"{sorted(am.teachers)}; got block {block}, points {meta['branch_points']}")
    if phase == "done" and mid_phase:
        fail("a 'done' checkpoint cannot be inside a phase (meta['step'] is set)")
    tables = [("loss_table", name) for out in am._outputs.values() for name in out]
    if am.objective == "feature":
        tables += [("feature_table", key) for key in am.teachers]
    for table, name in tables:
        recorded = {int(b) for b in meta[table].get(name, {})}
        if recorded != done:
            fail(f"meta[{table!r}][{name!r}] has losses for blocks {sorted(recorded)}, but the completed blocks are "
                 f"{sorted(done)}")

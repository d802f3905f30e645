"""What a non-finite loss means in an amalgamation: which block, which output, which teacher.

The engine stops a phase at its first non-finite step (:class:`~pyamalgam.engine.NonFiniteLossError`,
naming the terms). Here a term becomes what the user can act on: Eq. 6 / 8 / 9 have one task
term per output and Eq. 5 one feature term per teacher, so a NaN ``"seg"`` term points at the
output ``seg`` and the teacher that predicts it (NaN weights or predictions); every term
non-finite at once points at what they share (the images, the student, the learning rate).
"""
from __future__ import annotations

import math

from ..engine import NonFiniteLossError

__all__ = ["check_final_losses", "explain"]

_FEATURE = "feature/"


def explain(am, err: NonFiniteLossError, phase: str, n: int) -> NonFiniteLossError:
    """``err`` of the engine, reworded for phase ``phase`` ("blocks" at block ``n``, or "finetune")."""
    where = _where(am, phase, n)
    if err.step is None:  # weights about to be checkpointed
        return NonFiniteLossError(f"{where}: {err}", phase=where, terms=err.terms)
    named = [t for t in err.terms if t != "loss"]
    if not named:
        what = "the weighted sum of the loss terms (each term finite: a weight or a term overflowed)"
    else:
        what = ", ".join(_describe(am, t, err.terms[t]) for t in named)
    hint = _hint(am, named)
    return NonFiniteLossError(f"{where}: non-finite loss at step {err.step}: {what}; {hint}. No checkpoint holds "
                              f"this step or a later one", phase=where, step=err.step, terms=err.terms)


def check_final_losses(am, n: int, final: dict) -> None:
    """The final block losses L_t^n of Eq. 7 (probe images) must be finite: a NaN table would
    make ``branch_out()`` fail later and name the wrong output."""
    bad = {k: v for k, v in final.items() if not math.isfinite(v)}
    if bad:
        where = f"{_where(am, 'blocks', n)}, final losses on the probe images (Eq. 7)"
        what = ", ".join(_describe(am, t, v) for t, v in bad.items())
        raise NonFiniteLossError(f"{where}: {what}; {_hint(am, list(bad))}", phase=where, terms=bad)


def _where(am, phase: str, n: int) -> str:
    if phase == "finetune":
        return "finetune (Step 4)"
    objective = "Eq. 5" if am.objective == "feature" else "Eq. 6/8/9"
    return f"fit, block {n} of {am.num_blocks} ({objective})"


def _describe(am, term: str, value) -> str:
    if term.startswith(_FEATURE):
        return f"the feature term of teacher {term[len(_FEATURE):]!r} = {value}"
    if "/" in term:  # a structured term of Amalgamator(terms=...): "pi/<output>", "pa/<teacher>"
        name, what = term.split("/", 1)
        return f"the structured term {name!r} of {what!r} = {value}"
    teacher = next((key for key, out in am._outputs.items() if term in out), None)
    return f"output {term!r} (teacher {teacher!r}) = {value}"


def _hint(am, terms: list) -> str:
    teachers = sorted({key for key, out in am._outputs.items() for t in terms
                       if t in out or t == _FEATURE + key})
    if terms and len(teachers) < len(am.teachers):
        return f"check teacher(s) {teachers} (NaN or inf weights or predictions; the other teachers' terms are finite)"
    return (f"check the images (NaN or inf pixels), the student (init= copies a teacher's weights) and the "
            f"teachers, or lower lr (now {am.lr:g})")

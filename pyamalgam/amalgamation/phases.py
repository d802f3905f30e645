"""What the Amalgamator's two training phases compute besides one block's objective (:mod:`.blockwise`).

Step 2 ends every block n with the final losses L_t^n that Eq. 7 compares (paper 001, §5.1.3):
:func:`final_losses` measures them on the fixed probe images, :func:`record_final_losses` checks
them and writes them into the loss tables. Step 4 fine-tunes the whole TargetNet against the
teachers' own predictions with the losses of Eq. 6 (:func:`finetune_loss`), the targets coming
from :func:`teacher_targets` (through the target cache, when there is one).

These functions read and write the state of an :class:`~pyamalgam.Amalgamator` ``am``.
"""
from __future__ import annotations

import torch

from .blockwise import cache_lookup, supervision, weighted_sum
from .nonfinite import check_final_losses

__all__ = ["final_losses", "finetune_loss", "record_final_losses", "teacher_targets"]


@torch.no_grad()
def final_losses(am, n: int, step_module, probe) -> dict:
    """L_t^n of Eq. 7: the trained block n in eval mode on the fixed probe images.

    The mean over images of every term (task losses, and Eq. 5's feature terms with that
    objective), so that blocks are compared where they ended, on the same images.
    """
    step_module.eval()
    sums: dict = {}
    count = 0
    for x in probe:
        x = am._images(x)
        _, terms = am._block_loss(n, step_module, x, eq7=True)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() * x.shape[0]
        count += x.shape[0]
    step_module.train()
    if not count:
        raise RuntimeError("no probe image to measure the final block losses (Eq. 7) on: the loader yielded none")
    return {k: float(v) / count for k, v in sums.items()}


def record_final_losses(am, n: int, final: dict) -> None:
    """Block ``n``'s final losses into ``am.loss_table`` (task terms) and ``am.feature_table``
    (Eq. 5's ``feature/<teacher>`` terms), once all are finite (else nothing is written)."""
    check_final_losses(am, n, final)
    for name, value in final.items():
        table, key = (am.feature_table, name[8:]) if name.startswith("feature/") else (am.loss_table, name)
        table.setdefault(key, {})[n] = value


def teacher_targets(am, x) -> dict:
    """Output name -> the teachers' supervision for images ``x`` (with pi's soft targets), from
    the target cache when it holds them; the teachers' predictions fill it otherwise."""
    keys, targets = cache_lookup(am, x)
    if targets is not None:
        return targets
    targets = {}
    for key, teacher in am.teachers.items():
        targets.update(supervision(key, teacher(x), am._outputs, am._soft))
    if keys is not None:
        am.target_cache.put(keys, targets)
    return targets


def finetune_loss(am, trainable, x):
    """(loss, terms) of one Step-4 batch: every output's task loss of the TargetNet ``trainable``
    against the teachers' targets, weighted (Eq. 6 / 8), plus the structured terms if any."""
    with torch.no_grad(), am.engine.autocast():
        targets = teacher_targets(am, x)
    with am.engine.autocast():
        predictions = trainable(x)
    terms = {name: task.loss(predictions[name], targets[name])
             for out in am._outputs.values() for name, task in out.items()}
    loss = weighted_sum(terms, am._weights)
    if am.structured is not None:
        extra = am.structured.finetune_terms(predictions, targets)
        if extra:
            loss, terms = loss + am.structured.weighted(extra), {**terms, **extra}
    return loss, terms

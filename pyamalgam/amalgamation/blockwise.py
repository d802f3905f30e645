"""One block's objective (paper 001, §5.1.2 and §5.2): Eq. 5, 6, 8 and 9.

For block n the student's amalgamated features F_u^n are projected into every teacher's
domain by that teacher's channel coding. Eq. 6 lets the projection *replace* the teacher's
block-n features, runs the rest of the teacher and scores its prediction against the teacher's
original one; Eq. 5 scores the projection against the teacher's block-n features directly.
Eq. 8 is Eq. 6 with K teachers, and Eq. 9 is Eq. 6 with a TargetNet among the teachers (its
coding is the U-channel coding): one code path serves all three.

Compute is split by what learns. The frozen part of a step (the teachers' own predictions and
the student's blocks 1..n-1) runs once per batch under ``no_grad``; only block n and its codings
build a graph, and the teacher suffixes, whose parameters have ``requires_grad=False``, pass
gradients through to the projected features without computing any weight gradient.

Side information: the teacher suffix runs on the *student's* side information for blocks 1..n
(its pooling indices, its skips). After branch-out a teacher's copied blocks run inside the
TargetNet, where only the TargetNet's own side information exists; training block n under the
same condition makes L_t^n the loss a TargetNet branched at n starts from, which is what Eq. 7
compares.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import feature_loss
from .branch import as_outputs, code
from .structured import soft_key

__all__ = ["BlockStep", "FrozenPass", "block_loss", "cache_lookup", "feature_losses", "frozen_pass", "prediction_losses",
           "supervision", "weighted_sum"]


class BlockStep(nn.Module):
    """What learns at block n: the student's block n and its codings, one per teacher.

    ``forward(prev, side)`` returns (teacher key -> projected features F_u^n coded for that
    teacher, side information including block n's). A module of its own so that
    DistributedDataParallel synchronises exactly these parameters.
    """

    def __init__(self, block: nn.Module, codings: nn.ModuleDict):
        super().__init__()
        self.block = block
        self.codings = codings

    def forward(self, prev: torch.Tensor, side: dict):
        side = dict(side)
        amalgamated = self.block(prev, side)
        return {key: code(coding, amalgamated) for key, coding in self.codings.items()}, side


@dataclass
class FrozenPass:
    """The no-grad part of a block-n step for one batch.

    prev: student features at block n-1 (the image for n = 1); side: the student's side
    information of blocks 1..n-1; targets: output name -> supervision from the teachers' own
    predictions; features: teacher key -> teacher block-n features (Eq. 5 only).
    """

    prev: torch.Tensor
    side: dict
    targets: dict
    features: dict | None = None


@torch.no_grad()
def frozen_pass(student, teachers: Mapping, outputs: Mapping, x: torch.Tensor, n: int, *,
                targets: bool = True, features: bool = False, soft=()) -> FrozenPass:
    """Run everything that does not learn at block n, once per batch.

    With ``features`` (Eq. 5, or the pair-wise terms of ``structured.py``) each teacher runs to
    block n, and when ``targets`` is also asked its prediction continues from those features:
    each teacher still runs once (``forward_from`` after ``forward_until`` is ``net(x)`` exactly).
    The outputs named in ``soft`` also keep the teacher's raw prediction (pi's soft targets).
    """
    prev, side = student.forward_until(x, n - 1)
    out_targets, out_features = {}, ({} if features else None)
    for key, teacher in teachers.items():
        if features:
            feat, teacher_side = teacher.forward_until(x, n)
            out_features[key] = feat
            prediction = teacher.forward_from(feat, n, teacher_side) if targets else None
        else:
            prediction = teacher(x) if targets else None
        if prediction is not None:
            out_targets.update(supervision(key, prediction, outputs, soft))
    return FrozenPass(prev, side, out_targets, out_features)


def supervision(key, prediction, outputs: Mapping, soft=()) -> dict:
    """Teacher ``key``'s ``prediction`` as supervision: output name -> its task's target (the
    ground truth of Eq. 1/3/4), plus the raw prediction under ``soft_key(name)`` for the names
    in ``soft`` (pi's soft targets). The block steps and the fine-tune both read targets so."""
    targets = {}
    for name, p in as_outputs(key, prediction).items():
        targets[name] = outputs[key][name].target(p)
        if name in soft:
            targets[soft_key(name)] = p.detach()
    return targets


def prediction_losses(teachers: Mapping, outputs: Mapping, projected: Mapping, n: int, side: dict,
                      targets: Mapping, predictions: dict | None = None) -> dict:
    """The task terms of Eq. 6 / 8 / 9, output name -> loss.

    Each teacher continues from block n with ``projected[key]`` in place of its own block-n
    features (and the given side information); its prediction is scored by its task's loss
    (Eq. 1, 3, 4, or the user's) against the teacher's original prediction ``targets``.
    ``predictions``, a dict, receives those predictions (what the structured terms read).
    """
    losses = {}
    for key, teacher in teachers.items():
        prediction = teacher.forward_from(projected[key], n, side)
        for name, p in as_outputs(key, prediction).items():
            losses[name] = outputs[key][name].loss(p, targets[name])
            if predictions is not None:
                predictions[name] = p
    return losses


def feature_losses(projected: Mapping, features: Mapping) -> dict:
    """The terms of Eq. 5, teacher key -> ``||F_u^n coded - F_teacher^n||^2`` (element mean)."""
    return {key: feature_loss(projected[key], features[key]) for key in projected}


def weighted_sum(losses: Mapping, weights: Mapping) -> torch.Tensor:
    """``sum_t lambda_t L_t`` (Eq. 5, 6, 8, 9), lambda defaulting to 1."""
    return torch.stack([weights.get(name, 1.0) * loss.float() for name, loss in losses.items()]).sum()


def cache_lookup(am, x):
    """(keys, targets) of the batch ``x`` from ``am``'s target cache (targets None on a miss);
    (None, None) without a cache."""
    if am.target_cache is None:
        return None, None
    keys = am.target_cache.keys(x)
    return keys, am.target_cache.get(keys, x.device)


def block_loss(am, n: int, trainable, x: torch.Tensor, eq7: bool):
    """(loss to minimise, terms) of one block-n batch; ``eq7`` also scores the task losses
    under Eq. 5 (Eq. 7 compares task losses whatever the objective)."""
    feature = am.objective == "feature"
    structured = None if eq7 else am.structured  # Eq. 7 compares the task losses alone
    need_targets = not feature or eq7  # Eq. 5 runs no teacher suffix: pi waits for the fine-tune
    keys, cached = cache_lookup(am, x) if need_targets else (None, None)
    with torch.no_grad(), am.engine.autocast():
        frozen = frozen_pass(am.student, am.teachers, am._outputs, x, n, targets=need_targets and cached is None,
                             features=feature or (structured is not None and structured.features), soft=am._soft)
    if cached is not None:
        frozen.targets = cached
    elif keys is not None:
        am.target_cache.put(keys, frozen.targets)
    with am.engine.autocast():
        projected, side = trainable(frozen.prev, frozen.side)
        predictions = {} if structured is not None and not feature else None
        if not feature:  # Eq. 6 / 8 / 9
            terms = prediction_losses(am.teachers, am._outputs, projected, n, side, frozen.targets, predictions)
            loss = weighted_sum(terms, am._weights)
        else:
            terms = {f"feature/{k}": v for k, v in feature_losses(projected, frozen.features).items()}  # Eq. 5
            loss = weighted_sum({k[8:]: v for k, v in terms.items()}, am._teacher_weights)
        if structured is not None:  # the thesis' terms, added to the paper's objective
            extra = structured.block_terms(projected, frozen.features, predictions or {}, frozen.targets)
            loss, terms = loss + structured.weighted(extra), {**terms, **extra}
    if not feature:
        return loss, terms
    if eq7:
        with torch.no_grad(), am.engine.autocast():
            detached = {k: v.detach() for k, v in projected.items()}
            terms.update(prediction_losses(am.teachers, am._outputs, detached, n, side, frozen.targets))
    return loss, terms

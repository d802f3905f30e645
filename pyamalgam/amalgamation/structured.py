"""Optional structured-distillation terms inside the Amalgamator (issue 12; thesis 003, ch. 3-4).

Paper 001 supervises every block (Eq. 6 / 8 / 9) and the fine-tune (Step 4) with the teachers'
*hard* predictions only: the arg-max labels of a segmentation teacher (Eq. 1), the depth and
normal maps (Eqs. 3-4). ``Amalgamator(..., terms=...)`` adds terms of the thesis' family to those
objectives; with ``terms=None`` (the default) nothing here runs and the paper's method is
unchanged, bit for bit. The terms are the Distiller's (:mod:`pyamalgam.distill.terms`: the same
names, default weights, options and loss modules), applied where an amalgamation has what they read:

=====  ===============================================  ==========================  ================
name   what it compares                                 where                       default weight
=====  ===============================================  ==========================  ================
pi     pixel-wise, thesis Eq. 3.1: the soft class        blocks (Eq. 6/8/9) and the  10 (lambda_1)
       distributions of every segmentation output,       fine-tune
       student side vs. the teacher's own logits
pa     pair-wise, thesis Eq. 3.2: the affinities of the  blocks only                 10 (lambda_1)
       block-n features coded for teacher t (after its
       connector) vs. teacher t's own block-n features
cwd    channel-wise, thesis Eqs. 4.2-4.4, on the same    blocks only                 3 (§4.4.1)
       pair of block features as pa
=====  ===============================================  ==========================  ================

Each term is added with its weight to the block's (or the fine-tune's) weighted task loss:
``loss = sum_t lambda_t L_t + sum_terms w * l_term``. Where the papers are silent we chose:

* pi on the "student side" of a block step is the teacher suffix's prediction from the
  projection (what Eq. 6 scores), and the TargetNet's own logits in the fine-tune; under Eq. 5
  (``objective="feature"``) the block steps run no teacher suffix, so pi applies to the fine-tune
  only. pi needs class logits, which only segmentation outputs give (a depth head's bin logits
  stay inside the head; normals are no distribution): a run without one refuses pi.
* pa and cwd read block features, which exist per teacher only while block n trains: after the
  branch-out a branch *is* the teacher's copied blocks, so the fine-tune leaves them out.
* The final block losses L_t^n that Eq. 7 compares stay the task losses alone: the terms change
  how a block trains, not what the branch-out minimises.
* The holistic term (ho) needs a critic trained alternately with the student; it is the
  Distiller's and is refused here, as are taps and terms of one's own.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..distill.taps import OUTPUT
from ..distill.terms import FEATURES, build_loss, parse_terms
from ..losses import SegmentationTask

__all__ = ["TERMS", "StructuredTerms", "parse_structured", "soft_key"]

TERMS = ("pi", "pa", "cwd")
_BLOCK_FEATURES = ("pa", "cwd")


def soft_key(name: str) -> str:
    """The targets' key of output ``name``'s raw teacher logits (pi reads them)."""
    return f"{name}:logits"


class StructuredTerms:
    """The parsed ``terms`` of an Amalgamator: their losses, and the terms of one step.

    ``outputs``: teacher key -> (output name -> Task), the amalgamation's outputs.
    """

    def __init__(self, specs: list, outputs: Mapping):
        self.specs = specs
        self.weights = {s.name: s.weight for s in specs}
        # every loss of the thesis' terms is parameter-free here: block features of student and
        # teacher have the same shape (a connector already maps a heterogeneous teacher's)
        self.losses = {s.name: build_loss(s, 1, 1) for s in specs}
        self.soft = tuple(name for out in outputs.values() for name, task in out.items()
                          if isinstance(task, SegmentationTask)) if "pi" in self.weights else ()
        if "pi" in self.weights and not self.soft:
            names = [name for out in outputs.values() for name in out]
            raise ValueError(f"terms['pi']: pixel-wise distillation (thesis Eq. 3.1) compares class distributions, "
                             f"which only segmentation outputs have; the outputs are {names}")

    @property
    def features(self) -> bool:
        """Whether the block steps need the teachers' block-n features (pa, cwd)."""
        return any(name in self.weights for name in _BLOCK_FEATURES)

    def config(self) -> dict:
        """The terms as the checkpoint's setup records them (a resume with other terms is refused)."""
        return {s.name: {"weight": s.weight, **s.options} for s in self.specs}

    def block_terms(self, projected: Mapping, features, predictions: Mapping, targets: Mapping) -> dict:
        """The unweighted terms of one block-n batch, ``"pi/<output>"``, ``"pa/<teacher>"``, ...

        ``projected``: teacher key -> block-n features coded for it; ``features``: teacher key ->
        its own block-n features (None without pa/cwd); ``predictions``: output name -> the
        teacher suffix's prediction from the projection (empty under Eq. 5).
        """
        values = self._soft_terms(predictions, targets)
        for name in _BLOCK_FEATURES:
            if name in self.losses:
                for key, coded in projected.items():
                    values[f"{name}/{key}"] = _per_stream(self.losses[name], coded, features[key])
        return values

    def finetune_terms(self, predictions: Mapping, targets: Mapping) -> dict:
        """The unweighted terms of one fine-tune batch (pi only, see the module docstring)."""
        return self._soft_terms(predictions, targets)

    def weighted(self, values: Mapping) -> torch.Tensor:
        """``sum w * l`` over ``values`` (keys ``"<term>/<what>"``), in float32."""
        return torch.stack([self.weights[k.split("/", 1)[0]] * v.float() for k, v in values.items()]).sum()

    def _soft_terms(self, predictions, targets) -> dict:
        if "pi" not in self.losses:
            return {}
        return {f"pi/{name}": self.losses["pi"](predictions[name], targets[soft_key(name)])
                for name in self.soft if name in predictions}


def _per_stream(loss, coded, target) -> torch.Tensor:
    """``loss(coded, target)``; a multi-output teacher (Eq. 9) past a branch point has one block-n
    map per stream: their mean, as Eq. 5's feature term does."""
    if isinstance(target, Mapping):
        return torch.stack([_per_stream(loss, coded, t) for t in target.values()]).mean()
    return loss(coded.float(), target.float())


def parse_structured(terms, outputs: Mapping) -> StructuredTerms | None:
    """``terms`` of :class:`~pyamalgam.Amalgamator` checked (errors name the entry); None when
    there are none, so that the paper's objectives run exactly as without this module."""
    if terms is None:
        return None
    specs = parse_terms(terms)
    for spec in specs:
        where = f"terms[{spec.name!r}]"
        if spec.name not in TERMS:
            extra = " (it needs a critic trained alternately: use pyamalgam.Distiller)" if spec.name == "ho" else ""
            raise ValueError(f"{where}: the Amalgamator takes the terms {list(TERMS)}{extra}; got {spec.name!r}")
        if spec.loss is not None:
            raise ValueError(f"{where}: the Amalgamator builds the thesis' loss itself; a loss object is the "
                             f"Distiller's option")
        default = (OUTPUT, OUTPUT) if spec.name == "pi" else (FEATURES, FEATURES)
        if (spec.student, spec.teacher) != default:
            raise ValueError(f"{where}: the Amalgamator takes no 'tap' (pi reads the outputs, pa and cwd the "
                             f"block-n features of the block that trains)")
    return StructuredTerms(specs, outputs) if specs else None


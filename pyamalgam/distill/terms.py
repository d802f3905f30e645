"""The distillation terms a :class:`~pyamalgam.distill.Distiller` combines, from its ``terms=``.

Thesis 003 names four (docs/distiller.md):

=====  ==========================  ==================  ==========================================
name   loss                        default weight      reads (default tap)
=====  ==========================  ==================  ==========================================
pi     pixel-wise, Eq. 3.1         10 (lambda_1)       the outputs (logits)
pa     pair-wise, Eq. 3.2          10 (lambda_1)       the feature tap (default: block N)
cwd    channel-wise, Eqs. 4.2-4.4  3 (§4.4.1, T = 3)   the feature tap (default: block N)
ho     holistic, Eq. 3.3           0.1 (lambda_2)      the outputs and the image; *subtracted*
=====  ==========================  ==================  ==========================================

Each entry of ``terms`` is a weight, a spec dict (``weight``, ``tap``, ``loss`` and the loss's
options: ``temperature``/``order`` for pi, ``radius``/``patch`` for pa, ``temperature`` for
cwd, the :class:`HolisticDistillation` keywords for ho) or a loss object. A name of one's own
takes a callable ``loss(student, teacher) -> scalar`` (default tap: the outputs).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .._checks import as_real
from ..losses import ChannelWiseLoss, PairWiseLoss, PixelWiseLoss
from ..nn import Connector
from .taps import OUTPUT, parse_side_taps

__all__ = ["TERM_NAMES", "DEFAULT_WEIGHTS", "TermSpec", "parse_terms", "build_loss", "describe",
           "resolve_features", "HOLISTIC_METHODS", "FEATURES"]

TERM_NAMES = ("pi", "pa", "cwd", "ho")
DEFAULT_WEIGHTS = {"pi": 10.0, "pa": 10.0, "cwd": 3.0, "ho": 0.1}
_OPTIONS = {"pi": ("temperature", "order"), "pa": ("radius", "patch"), "cwd": ("temperature",)}
_RESERVED = ("mc", "total", "labelled")  # names of the logged values that are not terms
HOLISTIC_METHODS = ("critic_step", "state_tensors", "load_state_tensors")
FEATURES = object()  # "the Distiller's feature tap" (pa, cwd), resolved per side


@dataclass
class TermSpec:
    """One term: its weight, where it reads each network, its loss (None: built from
    ``options`` once the channel counts are known) and the options."""

    name: str
    weight: float
    student: Any  # a Tap, or FEATURES
    teacher: Any
    loss: Optional[Any] = None
    options: dict = field(default_factory=dict)

    @property
    def holistic(self) -> bool:
        return self.name == "ho"


def parse_terms(terms) -> list:
    """The :class:`TermSpec` of each entry of ``terms`` (checked; errors name the entry). No
    entry is the student trained on its labels alone (the ablation's baseline row)."""
    if not isinstance(terms, Mapping):
        raise TypeError(f"terms must be a mapping term name -> weight, spec or loss, got {type(terms).__name__}")
    return [_parse_one(name, value) for name, value in terms.items()]


def _parse_one(name, value) -> TermSpec:
    if not isinstance(name, str) or not name or "/" in name or name in _RESERVED:
        raise ValueError(f"terms: a term name must be a non-empty string without '/', not one of {list(_RESERVED)}; "
                         f"got {name!r}")
    where = f"terms[{name!r}]"
    spec = _as_spec(value, where)
    loss = spec.pop("loss", None)
    if name not in TERM_NAMES and loss is None:
        raise ValueError(f"{where}: unknown term {name!r}; the terms are {list(TERM_NAMES)} (or give a term of your "
                         f"own a callable: terms={{{name!r}: loss}} or {{'loss': loss, 'weight': w}})")
    if loss is not None and not callable(loss):
        raise TypeError(f"{where}['loss'] must be callable (student, teacher) -> scalar, got {type(loss).__name__}")
    if name == "ho" and loss is not None:
        missing = [m for m in HOLISTIC_METHODS if not callable(getattr(loss, m, None))]
        if missing:
            raise TypeError(f"{where} must be a HolisticDistillation-like object with forward(student_map, image), "
                            f"{', '.join(HOLISTIC_METHODS)}; {type(loss).__name__} lacks {missing}")
    weight = _weight(spec.pop("weight", DEFAULT_WEIGHTS.get(name, 1.0)), where)
    default = (FEATURES, FEATURES) if name in ("pa", "cwd") else (OUTPUT, OUTPUT)
    student, teacher = parse_side_taps(spec.pop("tap"), f"{where}['tap']", default) if "tap" in spec else default
    if name == "ho" and (student, teacher) != (OUTPUT, OUTPUT):
        raise ValueError(f"{where}: the holistic term reads the prediction maps (Eq. 3.3); it takes no tap")
    allowed = _OPTIONS.get(name, ())
    if name != "ho" and (loss is not None and spec or set(spec) - set(allowed)):
        bad = sorted(spec) if loss is not None else sorted(set(spec) - set(allowed))
        known = ["weight", "tap", "loss", *([] if loss is not None else allowed)]
        raise ValueError(f"{where}: unknown option(s) {bad}; it takes {known}")
    if name == "ho" and loss is not None and spec:
        raise ValueError(f"{where}: options {sorted(spec)} go to HolisticDistillation, but a loss object is given")
    return TermSpec(name, weight, student, teacher, loss, spec)


def _as_spec(value, where) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if callable(value):
        return {"loss": value}
    if as_real(value) is not None:
        return {"weight": value}
    raise TypeError(f"{where} must be a weight, a spec dict or a loss object, got {type(value).__name__}")


def _weight(value, where) -> float:
    w = as_real(value)
    if w is None or not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: the weight must be a finite number >= 0 (the holistic term's sign is Eq. 3.4's "
                         f"minus, not a negative weight), got {value!r}")
    return w


def build_loss(spec: TermSpec, student_channels: int, teacher_channels: int):
    """The loss module of a thesis term (the user's object where given): Eq. 3.1, Eq. 3.2, or
    Eqs. 4.2-4.4 with a 1x1 :class:`~pyamalgam.nn.Connector` on the student side when the
    channel counts differ (§4.3.2; it trains and is checkpointed with the student)."""
    if spec.loss is not None:
        return spec.loss if isinstance(spec.loss, nn.Module) else _Callable(spec.loss)
    try:
        if spec.name == "pi":
            return PixelWiseLoss(**spec.options)
        if spec.name == "pa":
            return PairWiseLoss(**spec.options)
        connector = None if student_channels == teacher_channels else Connector(student_channels, teacher_channels)
        return ChannelWiseLoss(**spec.options, connector=connector)
    except (TypeError, ValueError) as e:
        raise type(e)(f"terms[{spec.name!r}]: {e}") from None


class _Callable(nn.Module):
    """A plain function as a module, so that every term's loss sits in one ModuleDict."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, student, teacher):
        return self.fn(student, teacher)

    def extra_repr(self) -> str:
        return describe(self.fn)


def describe(obj) -> str:
    """A description of a loss that is the same in every process (no memory address), for the
    checkpoint's setup: a module's class and ``extra_repr``, a function's qualified name."""
    if isinstance(obj, _Callable):
        return describe(obj.fn)
    if isinstance(obj, nn.Module):
        children = ", ".join(f"{n}={describe(m)}" for n, m in obj.named_children())
        inner = ", ".join(filter(None, [obj.extra_repr(), children]))
        return f"{type(obj).__qualname__}({inner})"
    qualname = getattr(obj, "__qualname__", None)
    return qualname if isinstance(qualname, str) else type(obj).__qualname__


def resolve_features(spec: TermSpec, feature_taps: tuple) -> None:
    """Replace FEATURES by the Distiller's feature tap of each side."""
    if spec.student is FEATURES:
        spec.student = feature_taps[0]
    if spec.teacher is FEATURES:
        spec.teacher = feature_taps[1]

"""Structured knowledge distillation: one frozen teacher -> one compact student (thesis 003,
ch. 3-4) on the shared training engine (docs/distiller.md).

- :class:`Distiller` — ``Distiller(teacher, student, terms={"pi": 10, "pa": 10}).fit(loader)``;
- :mod:`.terms` — the terms (pi, pa, cwd, ho), their default weights and options;
- :mod:`.taps` — where a term reads the networks: ``"output"``, ``("block", n)``,
  ``("module", name)``, in one forward pass.
"""
from .distiller import LOG_NAME, Distiller
from .taps import OUTPUT, Tap, TapRunner, parse_tap
from .terms import DEFAULT_WEIGHTS, TERM_NAMES

__all__ = ["Distiller", "LOG_NAME", "Tap", "TapRunner", "parse_tap", "OUTPUT", "TERM_NAMES", "DEFAULT_WEIGHTS"]

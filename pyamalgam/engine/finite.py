"""Stopping a phase at its first non-finite loss, before it reaches a checkpoint.

A NaN teacher, NaN images or a diverging learning rate make a loss NaN or inf; one step later
every weight the phase trains is NaN, and without a check the run would go on, checkpoint those
weights and log NaN tables. :class:`FiniteGuard` watches the loss and every logged term of each
step without a GPU/CPU sync per step: it queues a few tiny device ops that keep the first
non-finite step and its values on the device, and :meth:`FiniteGuard.check` reads one flag
every ``every`` steps, before every checkpoint and at the phase end. On the CPU (``every`` 1,
where reading a value costs microseconds) each value is simply read, before the step's backward
pass, so the parameters stay those of the last finite step. :func:`check_weights` is the last
line before a checkpoint write.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["NonFiniteLossError", "FiniteGuard", "non_finite_tensors", "default_check_every"]

LOSS = "loss"  # the name of the total loss among the watched values


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """A loss (or a term of it) became NaN or inf, or weights about to be checkpointed hold one.

    ``phase``: what was training (the engine's ``desc``); ``step``: the 1-based step (None for
    weights); ``terms``: name -> value of the non-finite ones (``"loss"`` is the total). A
    FloatingPointError, so the command line ends it with exit code 1 ("a failed run")."""

    def __init__(self, message: str, *, phase: Optional[str] = None, step: Optional[int] = None,
                 terms: Optional[Mapping[str, float]] = None):
        super().__init__(message)
        self.phase, self.step, self.terms = phase, step, dict(terms or {})


def default_check_every(device: torch.device) -> int:
    """Every step on the CPU (a check costs microseconds there); every 16 steps elsewhere, where
    reading the flag waits for the device."""
    return 1 if device.type == "cpu" else 16


class FiniteGuard:
    """Watches one phase's losses: ``observe`` each step, ``check`` when due (``due``)."""

    def __init__(self, phase: str, total: int, every: int, world_size: int = 1):
        self.phase, self.total, self.every, self.world_size = phase, total, every, world_size
        self._names: Optional[tuple] = None
        self._first = self._bad = self._values = None  # device tensors: first bad step, its flags and values

    def due(self, done: int) -> bool:
        return self.every == 1 or done % self.every == 0 or done == self.total

    def observe(self, step: int, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Remember ``step`` (0-based) if it is the first with a non-finite value; no sync."""
        names = (LOSS, *terms)
        if names != self._names:  # the first step, or a trainer whose terms changed: settle what was seen
            self.check()
            self._names, self._first = names, None
        if self.every == 1 and self.world_size == 1:  # read now anyway: plain floats, no device bookkeeping
            if all(math.isfinite(float(_scalar(v))) for v in (loss, *terms.values())):
                return
        device = loss.device  # a term on another device (a CPU scalar) joins the loss's
        values = torch.stack([_scalar(loss), *(_scalar(v).to(device) for v in terms.values())])
        bad = ~torch.isfinite(values)
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=values.device)
            self._bad, self._values = torch.zeros_like(bad), torch.zeros_like(values)
        new = bad.any() & (self._first < 0)
        self._first = torch.where(new, step, self._first)
        self._bad = torch.where(new, bad, self._bad)
        self._values = torch.where(new, values, self._values)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a watched value was non-finite (one sync).

        Under torchrun every rank takes part, so that all stop together (one rank alone
        stopping would leave the others waiting in DDP's all-reduce)."""
        if self._first is None:
            return
        first = self._first
        if self.world_size > 1:
            big = torch.where(first < 0, torch.full_like(first, 2**62), first)
            dist.all_reduce(big, op=dist.ReduceOp.MIN)
            first_any = int(big)
            if first_any >= 2**62:
                return
        elif int(first) < 0:
            return
        else:
            first_any = int(first)
        mine = int(first) == first_any
        terms = {n: v for n, b, v in zip(self._names, self._bad.tolist(), self._values.tolist()) if b} if mine else {}
        shown = ", ".join(f"{n} = {v}" for n, v in terms.items()) or "on another rank"
        raise NonFiniteLossError(f"{self.phase}: the loss became non-finite at step {first_any + 1} of {self.total} "
                                 f"({shown})", phase=self.phase, step=first_any + 1, terms=terms)


def _scalar(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return value if value.dim() == 0 else value.sum()  # NaN / inf anywhere survives the sum


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list:
    """Names of the floating-point tensors that hold a NaN or inf (one sync for all of them)."""
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    ok = torch.stack([torch.isfinite(t).all().to(floats[0][1].device) for _, t in floats]).tolist()
    return [k for (k, _), good in zip(floats, ok) if not good]


def check_weights(tensors: Mapping[str, torch.Tensor], phase: str, where: str) -> None:
    """Refuse to checkpoint non-finite weights: a NonFiniteLossError naming the first ones."""
    bad = non_finite_tensors(tensors)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteLossError(f"{phase}: {', '.join(bad[:3])}{more} hold non-finite values {where}; "
                                 f"not writing a checkpoint of them", phase=phase, terms={k: math.nan for k in bad})

"""Feature taps: where a distillation term reads a network's features, in one forward pass.

A tap is one of

* ``"output"`` — what the network returns (the logits of a segmentation network);
* ``("block", n)`` — the features of block n of the block protocol (``forward_until(x, n)``,
  1 <= n <= N), the thesis' feature map F when n = N (the input of the classifier, §3.3);
* ``("module", name)`` — the output of ``net.get_submodule(name)``, read by a forward hook.

:class:`TapRunner` returns a network's output and the tapped features of one batch with **one**
pass through the network: block taps run ``forward_until(x, n)`` and then ``forward_from`` from
the same features (taps at several blocks chain the blocks in between with ``net.block(k)``), and
module taps hook the modules only for the duration of that pass. :meth:`TapRunner.check_forward`
checks on a probe image that this pass gives exactly what ``net(x)`` gives.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .._checks import as_int
from ..models.protocol import BlockNetwork, protocol_gap

__all__ = ["Tap", "OUTPUT", "parse_tap", "parse_side_taps", "TapRunner"]

_KINDS = ("block", "module")


@dataclass(frozen=True)
class Tap:
    """Where a term reads a network: ``kind`` "output", "block" (``target`` the block number)
    or "module" (``target`` the submodule's name)."""

    kind: str
    target: Union[int, str, None] = None

    @property
    def key(self) -> str:
        """A name for the tap, unique per network ("output", "block:5", "module:head.conv")."""
        return "output" if self.kind == "output" else f"{self.kind}:{self.target}"

    def to_json(self):
        return "output" if self.kind == "output" else [self.kind, self.target]

    def __str__(self) -> str:
        return "'output'" if self.kind == "output" else f"({self.kind!r}, {self.target!r})"


OUTPUT = Tap("output")


def parse_tap(spec, where: str) -> Tap:
    """A :class:`Tap` from ``"output"``, ``("block", n)``, ``("module", name)`` (tuple or list)
    or a Tap; a TypeError/ValueError naming ``where`` otherwise."""
    if isinstance(spec, Tap):
        return spec
    if isinstance(spec, str) and spec == "output":
        return OUTPUT
    if not isinstance(spec, (tuple, list)) or len(spec) != 2 or spec[0] not in _KINDS:
        raise ValueError(f"{where} must be 'output', ('block', n) or ('module', name), got {spec!r}")
    kind, target = spec
    if kind == "block":
        n = as_int(target)
        if n is None or n < 1:
            raise ValueError(f"{where}: the block number must be an int >= 1, got {target!r}")
        return Tap("block", n)
    if not isinstance(target, str) or not target:
        raise TypeError(f"{where}: the module name must be a non-empty string, got {target!r}")
    return Tap("module", target)


def parse_side_taps(spec, where: str, default: tuple) -> tuple:
    """(student tap, teacher tap) from one tap spec (both sides) or a mapping with "student"
    and/or "teacher" (a side it leaves out keeps ``default``'s)."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"student", "teacher"})
        if unknown:
            raise ValueError(f"{where}: a per-side tap mapping has the keys 'student' and 'teacher', got {unknown}")
        return (parse_tap(spec["student"], f"{where}['student']") if "student" in spec else default[0],
                parse_tap(spec["teacher"], f"{where}['teacher']") if "teacher" in spec else default[1])
    tap = parse_tap(spec, where)
    return tap, tap


class TapRunner:
    """Runs ``net`` once on a batch and returns ``(output, {tap.key: features})`` for ``taps``.

    Checks the taps against ``net`` when built (``name``, "student" or "teacher", names the
    network in the errors): block taps need a network of the block protocol and a block in
    [1, N] (taps at several blocks also need ``net.block(k)`` for the blocks between them); a
    module tap needs a submodule of that name (the error lists close names).
    """

    def __init__(self, net: nn.Module, taps, name: str):
        self.net, self.name = net, name
        taps = list(dict.fromkeys(t for t in taps if t.kind != "output"))
        self.blocks = sorted({t.target for t in taps if t.kind == "block"})
        self.modules = {t.key: self._submodule(t.target) for t in taps if t.kind == "module"}
        if self.blocks:
            self._check_blocks()

    def _submodule(self, target: str) -> nn.Module:
        names = [n for n, _ in self.net.named_modules() if n]
        if target not in names:
            close = difflib.get_close_matches(target, names, n=5, cutoff=0.5) or names[:5]
            raise ValueError(f"{self.name} tap ('module', {target!r}): {type(self.net).__name__} has no submodule "
                             f"{target!r}; close names: {close}")
        return self.net.get_submodule(target)

    def _check_blocks(self) -> None:
        why = protocol_gap(self.net, BlockNetwork)
        if why is not None:
            raise TypeError(f"{self.name} tap ('block', {self.blocks[0]}) needs a network of the block protocol "
                            f"(a pyamalgam.models.BlockNetwork); {why}. Tap a module by name instead: "
                            f"('module', name)")
        if self.blocks[-1] > self.net.num_blocks:
            raise ValueError(f"{self.name} tap ('block', {self.blocks[-1]}): {type(self.net).__name__} has blocks "
                             f"1..{self.net.num_blocks}")
        missing = [k for k in range(self.blocks[0] + 1, self.blocks[-1] + 1) if self.net.block(k) is None]
        if missing:
            raise ValueError(f"{self.name} taps at blocks {self.blocks} need {type(self.net).__name__}.block(k) for "
                             f"k in {missing} (to run from one tap to the next in one pass); it has none: tap one "
                             f"block only, or modules by name")

    def run(self, x: torch.Tensor) -> tuple:
        """(output, features by tap key) of one pass through ``net`` on ``x``."""
        features: dict = {}
        calls: dict = {}
        handles = [m.register_forward_hook(self._hook(key, features, calls)) for key, m in self.modules.items()]
        try:
            output = self._run_blocks(x, features) if self.blocks else self.net(x)
        finally:
            for h in handles:  # a tap lives for one pass: no hook stays on the user's network
                h.remove()
        for key in self.modules:
            if calls.get(key, 0) != 1:
                raise ValueError(f"{self.name} tap ('module', {key[7:]!r}) ran {calls.get(key, 0)} times in one "
                                 f"forward pass; tap a module that runs exactly once")
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the {self.name}'s forward returns a {type(output).__name__}; the Distiller needs one "
                            f"tensor (the prediction map)")
        return output, features

    def _run_blocks(self, x, features) -> torch.Tensor:
        first, last = self.blocks[0], self.blocks[-1]
        feat, side = self.net.forward_until(x, first)
        features[f"block:{first}"] = feat
        for k in range(first + 1, last + 1):  # forward_until's own chain, continued from the first tap
            feat = self.net.block(k)(feat, side)
            if k in self.blocks:
                features[f"block:{k}"] = feat
        return self.net.forward_from(feat, last, side)

    def _hook(self, key, features, calls):
        def hook(module, args, output):
            calls[key] = calls.get(key, 0) + 1
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{self.name} tap ('module', {key[7:]!r}) returns a {type(output).__name__}, "
                                f"not a tensor; tap a module that returns one feature map")
            # A copy: a later in-place op (ReLU(inplace=True) after a BatchNorm) would change the
            # tapped value, and for the student make autograd refuse the backward.
            features[key] = output.clone()
        return hook

    @torch.no_grad()
    def check_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """On a probe ``x`` (the network in eval mode): the tapped pass must give ``net(x)``, else
        a ValueError (a network whose ``forward_until``/``forward_from`` disagree with its forward
        would distil features of another computation). Returns the output."""
        output, _ = self.run(x)
        if self.blocks:
            direct = self.net(x)
            if not isinstance(direct, torch.Tensor) or direct.shape != output.shape or not torch.allclose(
                    direct, output, rtol=1e-5, atol=1e-6, equal_nan=True):
                raise ValueError(f"the {self.name}'s forward_until(x, {self.blocks[0]}) -> forward_from(...) pass "
                                 f"differs from {type(self.net).__name__}(x): its block protocol is inconsistent")
        return output

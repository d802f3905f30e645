"""pyamalgam: amalgamate single-task dense-prediction teachers into one multi-task student.

Implements "Student Becoming the Master" (Ye et al., CVPR 2019) on top of fused PyTorch custom
operators. Sub-packages load lazily, so ``pyamalgam.data`` and ``pyamalgam.metrics`` work without
the compiled extension; ``pyamalgam.ops`` (and everything built on it) loads it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"ops", "nn", "data", "metrics", "models", "losses", "amalgamation", "distill", "deploy"}
_EXPORTS = {
    "Amalgamator": ("pyamalgam.amalgamation", "Amalgamator"),
    "TargetNet": ("pyamalgam.amalgamation", "TargetNet"),
    "Distiller": ("pyamalgam.distill", "Distiller"),
    "load": ("pyamalgam.deploy", "load"),
    "build_info": ("pyamalgam._extension", "build_info"),
}

__all__ = sorted(_SUBMODULES | set(_EXPORTS) | {"__version__"})


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"pyamalgam.{name}")
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pyamalgam' has no attribute {name!r}")


def __dir__():
    return __all__

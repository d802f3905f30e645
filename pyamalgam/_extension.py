"""Loads pyamalgam's compiled operators, after checking they match the running torch.

A C++ extension is tied to the exact torch it was compiled against. An isolated ``pip install .``
compiles against whatever torch pip put into the build environment, which need not be the torch
you run with; loading such a build fails with an undefined-symbol error, or worse, loads and
misbehaves. So the build records its torch in ``_build_info.json`` and we compare before loading.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
REBUILD_HINT = (
    "Rebuild pyamalgam against the torch you run with:\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(from a pyamalgam checkout, in the environment that has the torch you want; it needs\n"
    "scikit-build-core, and ninja or make, installed there)."
)


def _recorded_build() -> dict:
    path = _HERE / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        hint = REBUILD_HINT
        if (_HERE.parent / "pyproject.toml").exists():
            # The usual cause: `python` started inside a checkout imports the source tree, which
            # shadows the installed (built) package.
            hint = (
                f"This pyamalgam is a source checkout ({_HERE}); if you installed pyamalgam, run "
                "from another directory (or `python -P`) so that the installed package is "
                "imported. Otherwise install it:\n" + REBUILD_HINT
            )
        raise ImportError(f"pyamalgam's compiled operators are not built ({path} is missing).\n" + hint) from None


def check_torch_matches(built: dict, running: str = torch.__version__) -> None:
    """Raise ImportError when the extension was compiled against another torch than ``running``."""
    if built.get("torch_version") != running:
        raise ImportError(
            f"pyamalgam was compiled against torch {built.get('torch_version')} but is running with "
            f"torch {running}; a C++ extension only works with the exact torch it was built for.\n"
            + REBUILD_HINT
        )


def _load():
    if os.environ.get("PYAMALGAM_SKIP_TORCH_CHECK") != "1":
        check_torch_matches(_recorded_build())
    return importlib.import_module("pyamalgam._C")


_C = _load()


def build_info() -> dict:
    """What the compiled operators were built with.

    Keys: ``torch_version`` (the torch compiled against), ``cpu_isas`` (the instruction sets the CPU
    kernels were compiled for, ``"base,avx2"`` on x86-64), ``cpu_isa`` (the one in use: AVX2 when
    the CPU and ATen use it; ``ATEN_CPU_CAPABILITY=default`` selects ``"base"``), ``with_cuda``
    (whether CUDA kernels were compiled), ``cuda_version`` (nvcc's version, or None) and
    ``cuda_archs`` (TORCH_CUDA_ARCH_LIST).
    """
    return dict(_C.build_info())


def has_cuda_kernels() -> bool:
    return bool(_C.build_info()["with_cuda"])

"""Helpers for pyamalgam's own tests and benchmarks."""
from __future__ import annotations

import os
from pathlib import Path


def subprocess_env() -> dict:
    """Environment for a ``python -c`` subprocess that must import this same pyamalgam
    (the source tree in a dev build, site-packages after ``pip install .``)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

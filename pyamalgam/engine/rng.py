"""Every random number generator a training step can draw from, as one checkpointable state.

A resumed run must draw what the uninterrupted run would have drawn: data-loader shuffles
(torch), augmentation (torch, Python's ``random``, NumPy) and CUDA kernels. The state is a dict
of tensors and JSON-able values, so :func:`~pyamalgam.engine.checkpoint.pack_state` can store it.
"""
from __future__ import annotations

import random

import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state(device: torch.device) -> dict:
    """The torch, Python, NumPy (if installed) and, on a CUDA ``device``, CUDA generator states."""
    state = {"torch": torch.get_rng_state(), "python": _pyrandom_to_json(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_pyrandom_from_json(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"]))


def _pyrandom_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _pyrandom_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)

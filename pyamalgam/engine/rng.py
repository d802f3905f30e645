"""Every random number generator a training step can draw from, as one checkpointable state.

A resumed run must draw what the uninterrupted run would have drawn: data-loader shuffles
(torch), augmentation (torch, Python's ``random``, NumPy) and CUDA kernels. The state is a dict
of tensors and JSON-able values, so :func:`~pyamalgam.engine.checkpoint.pack_state` can store it.
"""
from __future__ import annotations

import random

import torch

__all__ = ["get_rng_state", "set_rng_state", "check_rng_state"]


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


def check_rng_state(state, device: torch.device) -> None:
    """A ValueError naming the generator unless :func:`set_rng_state` can apply ``state``.

    Tried on scratch generators, the global ones untouched: a resume checks a checkpoint's
    states before it changes anything, so a corrupt one leaves the run as it was."""
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise ValueError("an RNG state must hold 'torch' and 'python' generator states")
    _try("torch", lambda: torch.Generator().set_state(_bytes(state["torch"])))
    python = state["python"]
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
        raise ValueError("the Python RNG state must be [version, 625 ints, gauss]")
    _try("python", lambda: random.Random().setstate(_pyrandom_from_json(python)))
    if "cuda" in state and device.type == "cuda":
        _try("cuda", lambda: torch.Generator(device=device).set_state(_bytes(state["cuda"])))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        _try("numpy", lambda: np.random.RandomState().set_state(
            (s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"])))


def _bytes(t):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise TypeError(f"a generator state must be a 1-D uint8 tensor, got {type(t).__name__}")
    return t


def _try(name, apply) -> None:
    try:
        apply()
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise ValueError(f"the {name} RNG state does not apply: {e}") from None


def _pyrandom_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _pyrandom_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)

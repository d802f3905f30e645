"""Crash-safe checkpoints: one safetensors file, written atomically.

A checkpoint is a flat name -> tensor mapping (weights, optimiser buffers, RNG states) plus a
JSON document (progress, loss tables, optimiser/scheduler scalars) stored in the safetensors
header. It is written to a temporary file in the same directory, fsync'ed, and moved over the
previous one with ``os.replace`` (atomic on POSIX), then the directory entry is fsync'ed: a
``kill -9`` or a power cut at any moment leaves either the previous checkpoint or the new one,
never a torn file. Nothing is unpickled on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from .._io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "pack_state", "unpack_state", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "pyamalgam"


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON-able ``meta`` to ``path``."""
    data = safetensors_bytes(_to_cpu(tensors), metadata={_META_KEY: json.dumps({"format": FORMAT_VERSION, **meta})})
    return atomic_write(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: (tensors, meta).

    The file is read in one go, from one open file: a reader that runs while training replaces the
    checkpoint gets the old version or the new one, never the header of one and the data of the
    other (``safe_open`` opens the path twice).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        tensors = safetensors_load(data)
    except (ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if _META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a pyamalgam checkpoint")
    meta = json.loads(header[_META_KEY])
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {meta.get('format')}, this pyamalgam reads {FORMAT_VERSION}")
    return tensors, meta


def pack_state(obj: Any, prefix: str, tensors: dict) -> Any:
    """Make a nested state (``optimizer.state_dict()``...) JSON-able, moving tensors to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        # JSON keys are strings; remember int keys (optimiser state is keyed by parameter index).
        return {"__dict__": [[pack_state(k, f"{prefix}/k{i}", tensors), pack_state(v, f"{prefix}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}")


def unpack_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


def _to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict:
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses shared storage
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out

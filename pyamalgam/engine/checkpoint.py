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
from typing import Any, Callable, Mapping

import torch
from torch.overrides import TorchFunctionMode
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from .._io import atomic_write
from .schema import MAX_JSON_BYTES, CorruptFileError, loads_limited

__all__ = ["save_checkpoint", "load_checkpoint", "pack_state", "unpack_state", "FORMAT_VERSION", "load_tensors",
           "check_tensors", "expected_state"]

FORMAT_VERSION = 1
#: The safetensors header holds the meta (escaped) and an entry per tensor: a few times the meta's limit.
MAX_HEADER_BYTES = 4 * MAX_JSON_BYTES
_META_KEY = "pyamalgam"


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON-able ``meta`` to ``path``."""
    text = json.dumps({"format": FORMAT_VERSION, **meta})
    if len(text) > MAX_JSON_BYTES:  # load_checkpoint would refuse it: fail now, not at the resume
        raise ValueError(f"{path}: {len(text)} bytes of checkpoint metadata, more than the {MAX_JSON_BYTES} "
                         f"load_checkpoint reads")
    data = safetensors_bytes(_to_cpu(tensors), metadata={_META_KEY: text})
    if int.from_bytes(data[:8], "little") > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: a safetensors header over {MAX_HEADER_BYTES} bytes, which load_checkpoint refuses")
    return atomic_write(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: (tensors, meta).

    The file is read in one go, from one open file: a reader that runs while training replaces the
    checkpoint gets the old version or the new one, never the header of one and the data of the
    other (``safe_open`` opens the path twice). The file is untrusted: a torn or empty file, a
    header over ``MAX_HEADER_BYTES`` or a meta over ``MAX_JSON_BYTES``, JSON nested deeper than
    ``MAX_JSON_DEPTH``, or a meta that is not a JSON object of this format, is a
    :class:`~pyamalgam.engine.schema.CorruptFileError` naming the file (before any parsing that
    could recurse); the meta's own fields are the caller's to check (:mod:`pyamalgam.engine.schema`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + size > len(data):
        raise CorruptFileError(f"{path} is not a safetensors file: {len(data)} bytes, torn or empty", path)
    header = loads_limited(data[8 : 8 + size], f"{path} is not a safetensors file: its header", path,
                           max_bytes=MAX_HEADER_BYTES)
    try:
        tensors = safetensors_load(data)
    except (ValueError, SafetensorError) as e:
        raise CorruptFileError(f"{path} is not a safetensors file: {e}", path) from None
    stored = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(stored, dict) or _META_KEY not in stored:
        raise CorruptFileError(f"{path} is a safetensors file but not a pyamalgam checkpoint", path)
    meta = loads_limited(stored[_META_KEY], f"{path}: its pyamalgam metadata", path)
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: its pyamalgam metadata must be a JSON object, got {type(meta).__name__}", path)
    if meta.get("format") != FORMAT_VERSION:
        raise CorruptFileError(f"{path} has checkpoint format {meta.get('format')!r}, this pyamalgam reads "
                               f"{FORMAT_VERSION}", path)
    return tensors, meta


def load_tensors(path, expected: Mapping[str, Any] | None = None, what: str | None = None) -> dict:
    """The tensors of the safetensors file ``path``; with ``expected`` (e.g. a module's state
    dict on the meta device, :func:`expected_state`) their names and shapes are checked against
    it from the header first, before any tensor is read (:func:`check_tensors`). One open file:
    a writer replacing it meanwhile gives the old file or the new one. A CorruptFileError names
    the file if it does not read or does not fit."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
            if expected is not None:
                check_tensors(expected, {k: (tuple(f.get_slice(k).get_shape()),) for k in names}, what or str(path), path)
            return {k: f.get_tensor(k) for k in names}
    except (OSError, SafetensorError) as e:
        raise CorruptFileError(f"{path} is not a safetensors file: {e}", path) from None


def expected_state(factory: Callable[[], torch.nn.Module]) -> dict:
    """The state dict ``factory()`` would have, built on the meta device: shapes without memory,
    so that a file's config can be checked against its tensors before the network is allocated
    (a 1 KB file whose config says width 4 would otherwise allocate gigabytes first). Random
    initialisation is skipped (on meta it goes through a slow Python path and means nothing)."""
    with torch.device("meta"), _NoRandomInit():
        return dict(factory().state_dict())


class _NoRandomInit(TorchFunctionMode):
    _SKIP = frozenset(getattr(torch.Tensor, name) for name in ("normal_", "uniform_", "random_", "bernoulli_",
                                                               "exponential_", "geometric_", "log_normal_", "cauchy_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIP:
            return args[0]
        return func(*args, **(kwargs or {}))


def check_tensors(expected: Mapping[str, Any], found: Mapping[str, Any], what: str, path) -> None:
    """The names and shapes of ``found`` (tensors, or :func:`tensor_shapes`) must be those of
    ``expected`` (e.g. a module's ``state_dict()``, possibly on the meta device); else a
    CorruptFileError naming ``what`` (the file and its part), before anything is allocated or
    copied (``load_state_dict`` would copy the tensors that fit, then raise)."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CorruptFileError(f"{what}: {_few(missing)} missing, {_few(unexpected)} unexpected", path)
    for k, want in expected.items():
        got = _shape(found[k])
        if got != _shape(want):
            raise CorruptFileError(f"{what}: {k!r} has shape {list(got)}, the network needs {list(_shape(want))}",
                                   path)


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t[0])


def _few(names) -> str:
    if not names:
        return "none"
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


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
    """Inverse of :func:`pack_state`. A reference to a tensor the file lacks, or a malformed
    entry, is a ValueError (the checkpoint's reader names the file)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"the state refers to a tensor {key!r} that the file does not hold")
            return tensors[key]
        if "__dict__" in obj:
            items = obj["__dict__"]
            if not isinstance(items, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
                raise ValueError("a packed mapping must be a list of [key, value] pairs")
            keys = [unpack_state(k, tensors) for k, _ in items]
            if not all(isinstance(k, (str, int, float, bool, type(None))) for k in keys):
                raise ValueError("a packed mapping has a key that is not a plain value")
            return {k: unpack_state(v, tensors) for k, (_, v) in zip(keys, items)}
        if "__tuple__" in obj:
            if not isinstance(obj["__tuple__"], list):
                raise ValueError("a packed tuple must be a list")
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

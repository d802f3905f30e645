"""Untrusted metadata: JSON with limits, and small schemas checked before anything acts on it.

A checkpoint header or a teacher's JSON sidecar may be torn, foreign or crafted: a list where a
dict belongs, a number where a list belongs, 200 000 nested brackets (Python's parser recurses:
a RecursionError), a missing key, or values no run could have written (``completed_blocks``
1..998 of a 6-block network). Each reader checks what it reads here first, and every problem
is one :class:`CorruptFileError` (a ValueError) that names the file and the field, instead of
an AttributeError, KeyError or RecursionError from deep inside the code that trusted it.

A schema is a callable ``spec(value, where) -> value`` that raises :class:`SchemaError`; the
building blocks below compose (``MapOf(Str(), ListOf(Int(1, 6)))``). :func:`validate` checks a
document against one and names the file in the error.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["CorruptFileError", "SchemaError", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "loads_limited", "read_json",
           "validate", "ANY", "Int", "Num", "Str", "Bool", "Nullable", "ListOf", "MapOf", "Record", "IntKey"]

#: What a reader parses at most: larger or deeper JSON is refused before ``json.loads`` runs.
#: A teacher's sidecar keeps every step's loss (~22 bytes a step), so 8 MiB is ~380 000 steps;
#: pyamalgam's own documents nest about 15 levels deep (a packed optimizer state).
MAX_JSON_BYTES = 8 * 2**20
MAX_JSON_DEPTH = 64

Spec = Callable[[Any, str], Any]


class CorruptFileError(ValueError):
    """A file that is not what it should be (unreadable, torn, foreign, or with metadata that
    fails its schema). The message names the file; ``path`` holds it, so that a caller that
    keeps caches (the demo) can rebuild exactly that file."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = Path(path)


class SchemaError(ValueError):
    """A value that does not fit its schema; the message names where (``meta['block']``)."""


def loads_limited(text, what: str, path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` once ``text`` (str or bytes) is at most ``max_bytes`` long and nests
    at most ``max_depth`` levels; else (or if it is not JSON) a CorruptFileError for the file
    ``path``, its message starting with ``what`` (e.g. "runs/x/last.safetensors: its header")."""
    if len(text) > max_bytes:
        raise CorruptFileError(f"{what}: {len(text)} bytes of JSON, more than the {max_bytes} pyamalgam reads", path)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptFileError(f"{what} is not UTF-8 JSON: {e}", path) from None
    if json_depth(text, max_depth) > max_depth:
        raise CorruptFileError(f"{what}: JSON nested more than {max_depth} levels deep", path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CorruptFileError(f"{what} is not valid JSON: {e}", path) from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)  # linear: the two alternatives start differently
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, stop: int) -> int:
    """The deepest bracket nesting of JSON ``text`` (strings skipped), or ``stop + 1`` as soon
    as it goes deeper than ``stop``: counted without parsing, so without recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > stop:
                return deepest
    return deepest


def read_json(path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """The JSON document in the file ``path``, read only if it is at most ``max_bytes`` long
    (a CorruptFileError naming the file otherwise, before reading it)."""
    path = Path(path)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise CorruptFileError(f"{path}: {size} bytes, more than the {max_bytes} pyamalgam reads as JSON", path)
    return loads_limited(path.read_bytes(), str(path), path, max_bytes=max_bytes, max_depth=max_depth)


def validate(document, spec: Spec, path, what: str = "meta"):
    """``document`` checked against ``spec``; a CorruptFileError naming ``path`` and the field."""
    try:
        return spec(document, what)
    except SchemaError as e:
        raise CorruptFileError(f"{path}: {e}", path) from None


# ---------------------------------------------------------------------------------- building blocks

def _short(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__} of {len(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, expected: str, value):
    raise SchemaError(f"{where} must be {expected}, got {_short(value)}")


def ANY(value, where):  # noqa: N802 (a schema constant)
    return value


class Int:
    """An int (not a bool) in [lo, hi]."""

    def __init__(self, lo: Optional[int] = None, hi: Optional[int] = None):
        self.lo, self.hi = lo, hi

    def __call__(self, value, where):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            _fail(where, f"an int in [{self.lo}, {self.hi}]", value)
        return value


class Num:
    """A number (int or float, not a bool); ``finite`` refuses NaN and inf; ``positive`` also 0."""

    def __init__(self, finite: bool = False, positive: bool = False, hi: Optional[float] = None):
        self.finite, self.positive, self.hi = finite or positive or hi is not None, positive, hi

    def __call__(self, value, where):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and self.finite:
            ok = math.isfinite(value) and (not self.positive or value > 0) and (self.hi is None or value <= self.hi)
        if not ok:
            kind = "a positive finite number" if self.positive else "a finite number" if self.finite else "a number"
            _fail(where, kind + ("" if self.hi is None else f" <= {self.hi:g}"), value)
        return value


class Str:
    """A string, one of ``choices`` if given, at most ``max_len`` characters."""

    def __init__(self, choices=None, max_len: int = 4096):
        self.choices, self.max_len = (tuple(choices) if choices is not None else None), max_len

    def __call__(self, value, where):
        if not isinstance(value, str) or len(value) > self.max_len:
            _fail(where, f"a string of at most {self.max_len} characters", value)
        if self.choices is not None and value not in self.choices:
            _fail(where, f"one of {list(self.choices)}", value)
        return value


def Bool(value, where):  # noqa: N802
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


class IntKey(Int):
    """A JSON object key that spells an int in [lo, hi] ("3")."""

    def __call__(self, value, where):
        if not isinstance(value, str) or not re.fullmatch(r"-?\d{1,18}", value):
            _fail(where, "an int written as a string", value)
        super().__call__(int(value), where)
        return value


class Nullable:
    def __init__(self, spec: Spec):
        self.spec = spec

    def __call__(self, value, where):
        return None if value is None else self.spec(value, where)


class ListOf:
    """A list of ``item``s, at most ``max_len`` of them; ``unique`` refuses repeats."""

    def __init__(self, item: Spec, max_len: Optional[int] = None, unique: bool = False):
        self.item, self.max_len, self.unique = item, max_len, unique

    def __call__(self, value, where):
        if not isinstance(value, list) or (self.max_len is not None and len(value) > self.max_len):
            _fail(where, "a list" + ("" if self.max_len is None else f" of at most {self.max_len} items"), value)
        for i, v in enumerate(value):
            self.item(v, f"{where}[{i}]")
        if self.unique and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            _fail(where, "a list without repeats", value)
        return value


class MapOf:
    """A JSON object with string keys that fit ``key`` and values that fit ``value``."""

    def __init__(self, key: Spec, value: Spec, max_len: Optional[int] = None):
        self.key, self.value, self.max_len = key, value, max_len

    def __call__(self, value, where):
        if not isinstance(value, dict) or (self.max_len is not None and len(value) > self.max_len):
            _fail(where, "an object" + ("" if self.max_len is None else f" of at most {self.max_len} entries"), value)
        for k, v in value.items():
            self.key(k, f"{where} key {k!r}")
            self.value(v, f"{where}[{k!r}]")
        return value


class Record:
    """A JSON object with ``required`` and ``optional`` fields (name -> spec); other fields fit
    ``extra`` (None: refused)."""

    def __init__(self, required: Mapping[str, Spec], optional: Optional[Mapping[str, Spec]] = None,
                 extra: Optional[Spec] = ANY):
        self.required, self.optional, self.extra = dict(required), dict(optional or {}), extra

    def __call__(self, value, where):
        if not isinstance(value, dict):
            _fail(where, "an object", value)
        missing = [k for k in self.required if k not in value]
        if missing:
            raise SchemaError(f"{where} lacks {missing}")
        for k, v in value.items():
            spec = self.required.get(k) or self.optional.get(k)
            if spec is None and self.extra is None:
                raise SchemaError(f"{where} has an unknown field {k!r}")
            (spec or self.extra)(v, f"{where}[{k!r}]")
        return value

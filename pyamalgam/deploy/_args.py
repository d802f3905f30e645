"""What the export and predict commands share: the MODEL argument and its loading (imported by the
CLI's parser: torch and the operators load only when a command runs)."""
from __future__ import annotations

import argparse
from pathlib import Path


def model_path(text: str) -> str:
    """An argparse type: a file that exists (its contents are checked when it is loaded)."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no model file {text!r} (write one with TargetNet.save, or train a "
                                         f"teacher with pyamalgam train-teacher)")
    return text


def load_or_exit(args, device=None):
    """The :class:`~pyamalgam.deploy.LoadedModel` of ``args.model``; a file that does not load is a
    bad argument: usage line, exit 2."""
    from ..engine import CorruptFileError
    from .loading import load_record

    try:
        return load_record(args.model, device=device)
    except (CorruptFileError, FileNotFoundError, ValueError) as e:
        args.subparser.error(f"MODEL {args.model!r}: {e}")


def check_divisor(args, resolution, divisor: int, given: str) -> tuple:
    """``resolution`` if both sides are positive multiples of ``divisor``, else exit 2 naming ``given``."""
    if resolution is not None and any(s < 1 or s % divisor for s in resolution):
        args.subparser.error(f"{given} {resolution[0]}x{resolution[1]}: both sides must be multiples of the "
                             f"model's size divisor {divisor} (2^depth: SegNet's max-unpooling needs exact halvings)")
    return resolution

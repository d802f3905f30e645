"""The ``pyamalgam train-teacher`` command behind the CLI: every argument checked before any data
is opened or any folder written, data sets opened by name, then :func:`train_teacher`."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from .._checks import as_int, as_real
from ..engine import OPTIMIZERS
from ..models.vgg import VGG16_CHANNELS, VGG16_CONVS
from . import canonical_task, teacher_paths, train_teacher

# ---------------------------------------------------------------------- data sets by name

def parse_resolution(text) -> tuple | None:
    """``"96x128"`` -> (96, 128); ``"64"`` -> (64, 64); None stays None."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        parts = [int(p) for p in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"resolution must look like HxW (e.g. 96x128), got {text!r}")
    return tuple(parts)


def open_dataset(spec: str, split: str, *, resolution=None, size: int | None = None, seed: int = 0, targets=()):
    """A labelled data set from a spec: ``synthetic``, ``nyuv2:/path`` or ``cityscapes:/path``.

    ``split`` is ``"train"``, ``"unlabelled"`` or ``"test"``; the real data sets have no
    unlabelled split, so their training images stand in for it (their labels are never read
    by the amalgamation) and their validation split is the test set. ``size`` applies to the
    synthetic data only; ``resolution`` (H, W) resizes real data (default: stored size).
    ``targets``: the synthetic data's extra targets (``"edges"``, ``"keypoints"``); the real data
    sets have none, and asking them for one is an error.
    """
    from .. import data

    kind, _, root = str(spec).partition(":")
    kind = kind.lower()
    if kind == "synthetic":
        return data.SyntheticScenes(split, size=size, resolution=resolution or (96, 128), seed=seed,
                                    targets=tuple(targets))
    if kind in ("nyuv2", "cityscapes"):
        if targets:
            raise ValueError(f"--data {kind} has no {', '.join(targets)} ground truth; those tasks need --data synthetic")
        if not root:
            raise ValueError(f"--data {kind} needs a folder: {kind}:/path/to/{kind}")
        real_split = {"train": "train", "unlabelled": "train", "test": "val"}[split]
        cls = data.NYUv2 if kind == "nyuv2" else data.Cityscapes
        return cls(root, real_split, resolution=resolution)
    raise ValueError(f"unknown data spec {spec!r}; expected 'synthetic', 'nyuv2:/path' or 'cityscapes:/path'")


#: The teacher architectures that run_train_teacher and the demo accept: ``depth`` pooling stages
#: of the VGG16 layout (which has 5), ``width`` up to 4x its channels (16x its 29.5 M parameters).
MAX_DEPTH = min(len(VGG16_CHANNELS), len(VGG16_CONVS))
MAX_WIDTH = 4.0
#: Seeds are offset per stage (+ a few hundred) and torch takes at most 2^64 - 1: stay far below.
MAX_SEED = 2**63 - 1
_SYNTHETIC_RESOLUTION = (96, 128)  # open_dataset's default for synthetic data


def check_output_folder(folder, argument: str = "out") -> Path:
    """Create ``folder`` (and its parents) if needed and check that a file can be written in it;
    an ``OSError`` naming ``argument`` and the folder otherwise. Called before any work, so an
    unwritable output fails in a second, not after the training it would have saved."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # os.access() says yes to root even on a read-only mount
            pass
    except OSError as e:
        raise type(e)(f"{argument}: cannot write to the folder {str(folder)!r} "
                      f"({e.strerror or type(e).__name__})") from None
    return folder


def _check_train_kwargs(kwargs: dict) -> None:
    """The train_teacher keywords run_train_teacher passes on, checked before any data is opened."""
    def integer(name, default, minimum, maximum=None):
        value = as_int(kwargs.get(name, default))
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ValueError(f"{name} must be an int {bound}, got {kwargs.get(name, default)!r}")

    def positive(name, default, maximum=math.inf):
        value = as_real(kwargs.get(name, default))  # nan and inf fail every comparison-based check
        if value is None or not (math.isfinite(value) and 0 < value <= maximum):
            bound = "> 0" if maximum == math.inf else f"in (0, {maximum:g}]"
            raise ValueError(f"{name} must be a finite number {bound}, got {kwargs.get(name, default)!r}")

    integer("depth", 5, 1, MAX_DEPTH)
    integer("num_bins", 64, 2)
    integer("steps", 1000, 1)
    integer("batch_size", 8, 1)
    integer("num_workers", 0, 0)
    integer("seed", 0, 0, MAX_SEED)
    positive("width", 1.0, MAX_WIDTH)
    positive("lr", 1e-3)
    if kwargs.get("optimizer", "adam") not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {kwargs['optimizer']!r}")


def _check_resolution(resolution, depth: int, where: str) -> None:
    divisor = 2**depth  # every pooling stage halves the image (SegNet's max-unpool needs it exact)
    if any(s % divisor for s in resolution):
        raise ValueError(f"resolution {resolution[0]}x{resolution[1]} ({where}): both sides must be multiples "
                         f"of 2^depth = {divisor}; pass a resolution or another depth")


def run_train_teacher(task: str, out, *, data: str = "synthetic", resolution=None, size: int | None = None,
                      **kwargs) -> dict:
    """The ``pyamalgam train-teacher`` command: check every argument, open the data, train, save,
    return a summary. Arguments are checked before any data is opened or any folder written."""
    task = canonical_task(task)
    resolution = parse_resolution(resolution)
    _check_train_kwargs(kwargs)
    if size is not None and (as_int(size) is None or as_int(size) < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    depth = as_int(kwargs.get("depth", 5))
    synthetic = str(data).lower() == "synthetic"
    if resolution is not None or synthetic:
        _check_resolution(resolution or _SYNTHETIC_RESOLUTION, depth, "given" if resolution else "synthetic default")
    weights, meta = teacher_paths(out)
    if weights.is_dir():
        raise IsADirectoryError(f"out: {str(weights)!r} is a folder; give a checkpoint path such as "
                                f"{str(weights / task)!r}")
    check_output_folder(weights.parent)
    targets = (task,) if task in ("edges", "keypoints") else ()
    dataset = open_dataset(data, "train", resolution=resolution, size=size, seed=kwargs.get("seed", 0), targets=targets)
    if resolution is None and not synthetic:  # the stored size: known once a sample is read
        _check_resolution(tuple(dataset[0]["image"].shape[-2:]), depth, f"stored size of {data}")
    record = train_teacher(task, dataset, out=out, data_name=str(data), **kwargs).record
    return {"task": task, "weights": str(weights), "config": str(meta), "parameters": record.parameters,
            "steps": record.steps, "loss_first": record.loss_first, "loss_final": record.loss_final,
            "seconds": record.seconds}

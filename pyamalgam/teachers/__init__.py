"""Training the single-task teachers with labels (paper 001, §4): SegNet, DepthNet, NormNet.

A teacher is the reference VGG encoder-decoder of :mod:`pyamalgam.models` with a task head,
trained on a labelled data set with the task's loss:

* ``"seg"``: Eq. 1, pixel-wise cross-entropy (the ``lambda R(theta)`` term is weight decay);
* ``"depth"``: Eq. 3, the scale-invariant loss (:func:`pyamalgam.ops.si_depth_loss`) on the
  depth decoded by Eq. 2 (soft-argmax over ``num_bins`` bins, :class:`~pyamalgam.models.DepthHead`);
* ``"normal"``: Eq. 4, the negative mean cosine between predicted and true unit normals;
* ``"edges"``, ``"keypoints"`` (seed 002's two further tasks, on ``SyntheticScenes(...,
  targets=...)``): the class-balanced BCE of :func:`~pyamalgam.losses.edge_loss` and the MSE of
  :func:`~pyamalgam.losses.keypoint_loss`, over every pixel (these targets have no invalid pixel).

Depth and normal losses are taken over the valid pixels of the sample's ``"mask"``; segmentation
skips ``ignore_index``. A checkpoint is two files written atomically: ``PATH.safetensors`` (the
weights) and ``PATH.json`` (its :class:`TeacherRecord`: what is needed to rebuild the network, plus
the training record), so :func:`load_teacher` needs nothing else. :func:`train_teacher` and
:func:`load_teacher` return a :class:`Teacher`, the pair ``(net, record)``; the Amalgamator and
the demo take its ``net``.

Usage::

    from pyamalgam.data import SyntheticScenes
    from pyamalgam.teachers import train_teacher, load_teacher

    net, record = train_teacher("depth", SyntheticScenes("train", resolution=(96, 128)), steps=500,
                                out="teachers/depth.safetensors")
    net, record = load_teacher("teachers/depth.safetensors")
    record.loss_final, record.config["width"]
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader

from .._checks import check_int
from .._io import atomic_write
from ..engine import (
    CorruptFileError,
    Engine,
    NonFiniteLossError,
    expected_state,
    load_tensors,
)
from ..engine.schema import (
    Bool,
    Int,
    ListOf,
    Nullable,
    Num,
    Record,
    Str,
    read_json,
    validate,
)
from ..losses import depth_loss, edge_loss, keypoint_loss, normal_loss, segmentation_loss
from ..models import VGGEncoderDecoder, count_parameters

__all__ = [
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_WIDTH",
    "TASKS",
    "Teacher",
    "TeacherRecord",
    "build_teacher",
    "canonical_task",
    "evaluate_teacher",
    "check_output_folder",
    "load_teacher",
    "open_dataset",
    "parse_resolution",
    "run_train_teacher",
    "save_teacher",
    "teacher_loss",
    "teacher_paths",
    "train_teacher",
]

#: Canonical task names (the output names teachers use) and the aliases accepted for them.
TASKS = ("seg", "depth", "normal", "edges", "keypoints")
_ALIASES = {"seg": "seg", "segmentation": "seg", "parsing": "seg",
            "depth": "depth",
            "normal": "normal", "normals": "normal", "surface_normals": "normal",
            "edges": "edges", "edge": "edges",
            "keypoints": "keypoints", "keypoint": "keypoints", "key_points": "keypoints"}
_MODEL_TASK = {"seg": "segmentation", "depth": "depth", "normal": "normals", "edges": "edges", "keypoints": "keypoints"}
FORMAT = "pyamalgam-teacher"
FORMAT_VERSION = 1
#: Top-level keys of the JSON sidecar that are not :attr:`TeacherRecord.extra`.
_RESERVED_KEYS = ("format", "version", "config", "weights", "train", "losses")


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """What a teacher is and how it was trained: the JSON sidecar of its checkpoint, as an object.

    ``config`` holds the :func:`build_teacher` arguments (``task``, ``width``, ``depth``,
    ``decoder``, ``num_classes``, ``num_bins``, ``max_depth``, ``in_chans``): ``build_teacher(
    **record.config)`` rebuilds the network. The training fields are those of
    :func:`train_teacher` plus what it measured (``seconds`` of training, the first loss, the mean
    loss over the last tenth of the steps (at most 50), ``parameters``); they are None for a
    teacher saved without training (``TeacherRecord(config=...)``). ``losses``: the loss of every
    step. ``extra``: further top-level JSON keys stored with the checkpoint (the demo keeps its
    cache key there).
    """

    config: dict[str, Any]
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    power: float | None = None
    flip: bool | None = None
    channels_last: bool | None = None
    seed: int | None = None
    data: str | None = None
    seconds: float | None = None
    loss_first: float | None = None
    loss_final: float | None = None
    parameters: int | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, Mapping) or "task" not in self.config:
            raise ValueError(f"TeacherRecord.config must be the build_teacher arguments, with 'task'; "
                             f"got {self.config!r}")
        clash = sorted(set(self.extra) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"TeacherRecord.extra must not hold the checkpoint's own keys {clash}")

    @property
    def task(self) -> str:
        """``"seg"``, ``"depth"``, ``"normal"``, ``"edges"`` or ``"keypoints"``."""
        return self.config["task"]

    def to_json(self, weights_name: str) -> dict[str, Any]:
        """The checkpoint's JSON document (``weights_name``: the weights file beside it)."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("config", "losses", "extra") and getattr(self, f.name) is not None}
        return {"format": FORMAT, "version": FORMAT_VERSION, "config": dict(self.config), "weights": weights_name,
                "train": train, "losses": list(self.losses), **self.extra}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> TeacherRecord:
        """Inverse of :meth:`to_json` (training fields missing from the file stay None)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"config", "losses", "extra"}
        train = {k: v for k, v in (meta.get("train") or {}).items() if k in names}
        return cls(config=dict(meta["config"]), losses=list(meta.get("losses") or []),
                   extra={k: v for k, v in meta.items() if k not in _RESERVED_KEYS}, **train)


class Teacher(NamedTuple):
    """A teacher network (in eval mode) and its :class:`TeacherRecord`; unpacks as ``net, record``."""

    net: VGGEncoderDecoder
    record: TeacherRecord


def canonical_task(task: str) -> str:
    """The canonical name (one of :data:`TASKS`) of a task name or alias; a clear error otherwise."""
    if not isinstance(task, str) or task.lower() not in _ALIASES:
        raise ValueError(f"unknown teacher task {task!r}; expected one of {list(TASKS)} "
                         f"(aliases: {sorted(set(_ALIASES) - set(TASKS))})")
    return _ALIASES[task.lower()]


def build_teacher(task: str, *, width: float = 1.0, depth: int = 5, decoder: str = "unpool", num_classes: int = 40,
                  num_bins: int = 64, max_depth: float = 10.0, in_chans: int = 3) -> VGGEncoderDecoder:
    """An untrained reference teacher (SegNet-VGG16-BN layout, scaled by ``width``) for ``task``."""
    task = canonical_task(task)
    return VGGEncoderDecoder(_MODEL_TASK[task], width=width, depth=depth, decoder=decoder, num_classes=num_classes,
                             num_bins=num_bins, max_depth=max_depth, in_chans=in_chans, name=task)


def teacher_loss(task: str, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor],
                 ignore_index: int = 255) -> torch.Tensor:
    """The supervised loss of a teacher's prediction against a labelled batch (Eq. 1, 3 or 4; the
    edge and key-point losses of :mod:`pyamalgam.losses` on the sample keys of the same names)."""
    task = canonical_task(task)
    if task == "seg":
        return segmentation_loss(prediction, batch["seg"], ignore_index=ignore_index)
    if task == "edges":
        return edge_loss(prediction, batch["edges"])
    if task == "keypoints":
        return keypoint_loss(prediction, batch["keypoints"])
    mask = batch["mask"]
    if task == "depth":
        mask = mask & (batch["depth"] > 0)
        return depth_loss(prediction, batch["depth"], mask)
    mask = mask & (batch["normal"].abs().sum(dim=1) > 0)
    return normal_loss(prediction, batch["normal"], mask)


def _hflip(batch: dict) -> dict:
    """Mirror a batch left-right; normals in camera coordinates (x right) flip the sign of x."""
    out = {k: v.flip(-1) for k, v in batch.items()}
    if "normal" in out:
        out["normal"] = out["normal"] * out["normal"].new_tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    return out


def train_teacher(
    task: str,
    dataset,
    *,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 4e-6,
    power: float = 0.9,
    width: float = 1.0,
    depth: int = 5,
    decoder: str = "unpool",
    num_bins: int = 64,
    max_depth: float | None = None,
    flip: bool = True,
    channels_last: bool = False,
    device=None,
    seed: int = 0,
    num_workers: int = 0,
    out=None,
    progress: bool = True,
    data_name: str | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Teacher:
    """Train a reference teacher for ``task`` on a labelled ``dataset`` and optionally save it.

    Args:
        task: one of :data:`TASKS` (aliases such as ``"segmentation"`` work).
        dataset: a :mod:`pyamalgam.data` data set (dict samples with ``image`` and the task's
            labels); its ``num_classes``, ``ignore_index`` and ``max_depth`` configure the head.
        steps: optimiser steps (batches); the data set is cycled.
        batch_size, lr, weight_decay: optimiser settings; the learning rate follows the poly
            policy of §6.1 with ``power``.
        optimizer: ``"adam"`` (default: teachers here are trained from scratch, in few steps) or
            ``"sgd"`` (momentum 0.9, the paper's choice for its ImageNet-initialised networks).
        width, depth, decoder: the architecture (:class:`~pyamalgam.models.VGGEncoderDecoder`).
        num_bins, max_depth: N_d and the range of the depth head (default: the data set's).
        flip: random horizontal flips (normals are mirrored with the image).
        channels_last: train in the channels_last memory format (on 2 CPU cores about 15 % faster
            per step for the 1/8-width demo teachers; the numbers differ in the last bits).
        device: where to train (default: cuda if available, else cpu).
        seed: seeds the initialisation and the data order.
        out: if given, save the trained teacher there (see :func:`save_teacher`).
        progress: show a tqdm progress bar.
        data_name: a description of the data for the checkpoint record.
        callback: called as ``callback(step, loss)`` after every step.

    Returns a :class:`Teacher`: the trained network in eval mode and its :class:`TeacherRecord`
    (settings, per-step losses, seconds).
    """
    task = canonical_task(task)
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if task not in getattr(dataset, "tasks", TASKS):
        raise ValueError(f"the data set {type(dataset).__name__} has no ground truth for {task!r} "
                         f"(it has {list(dataset.tasks)})")
    if len(dataset) < 1:
        raise ValueError("the data set is empty")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    max_depth = float(max_depth if max_depth is not None else getattr(dataset, "max_depth", 10.0))
    ignore_index = getattr(dataset, "ignore_index", 255)
    config = {
        "task": task, "width": width, "depth": depth, "decoder": decoder,
        "num_classes": int(getattr(dataset, "num_classes", 40)), "num_bins": num_bins, "max_depth": max_depth,
        "in_chans": 3,
    }
    torch.manual_seed(seed)
    net = build_teacher(**config).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
                        generator=generator, num_workers=num_workers, pin_memory=device.type == "cuda")
    # check_finite_every=1: on_step reads every loss anyway, so the engine stops at the first non-finite one
    engine = Engine(device=device, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=weight_decay, power=power,
                    progress=progress, check_finite_every=1)
    flip_rng = torch.Generator().manual_seed(seed + 1)
    losses = []

    def step_loss(module, batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if flip and torch.rand((), generator=flip_rng) < 0.5:
            batch = _hflip(batch)
        return teacher_loss(task, module(batch["image"].contiguous(memory_format=fmt)), batch, ignore_index), {}

    def on_step(step, loss):  # a finite loss: the engine stopped the phase before a non-finite one got here
        value = float(loss.detach())
        losses.append(value)
        if callback is not None:
            callback(step, value)

    try:
        run = engine.run_phase(net, step_loss, loader, steps, desc=f"teacher {task}", tag=f"teacher/{task}/loss",
                               on_step=on_step)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; lower lr (now {lr}) or check the data", phase=e.phase, step=e.step,
                                 terms=e.terms) from None
    net.to(memory_format=torch.contiguous_format).eval()
    window = max(1, min(len(losses) // 10, 50))
    record = TeacherRecord(
        config=config, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        power=power, flip=flip, channels_last=bool(channels_last), seed=seed, data=data_name or repr(dataset),
        seconds=round(run.seconds, 3), loss_first=losses[0], loss_final=sum(losses[-window:]) / window,
        parameters=count_parameters(net), losses=losses)
    if out is not None:
        save_teacher(net, out, record)
    return Teacher(net, record)


def teacher_paths(path) -> tuple[Path, Path]:
    """(weights, JSON) paths of a teacher checkpoint given either file or a stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_teacher(net: nn.Module, path, record: TeacherRecord) -> Path:
    """Write ``path`` (.safetensors weights) and its ``.json`` sidecar (``record``), each atomically.

    ``record`` is the one :func:`train_teacher` returned, or ``TeacherRecord(config=...)`` (the
    :func:`build_teacher` arguments) for a network trained elsewhere. The JSON is written last, so
    a checkpoint whose JSON exists is complete. Returns the weights path.
    """
    if not isinstance(record, TeacherRecord):
        raise TypeError(f"save_teacher needs a TeacherRecord (from train_teacher, or TeacherRecord(config=the "
                        f"build_teacher arguments)), got {type(record).__name__}")
    weights, meta_path = teacher_paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    atomic_write(weights, safetensors_bytes(state, metadata={"format": FORMAT}))
    atomic_write(meta_path, (json.dumps(record.to_json(weights.name), indent=1) + "\n").encode())
    return weights


def load_teacher(path, device=None) -> Teacher:
    """Rebuild a teacher saved by :func:`save_teacher` (weights + JSON): a :class:`Teacher`, the
    network in eval mode and its :class:`TeacherRecord`.

    ``path`` is the ``.safetensors`` file, its ``.json`` sidecar, or their common stem.
    """
    weights, meta_path = teacher_paths(path)
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no teacher checkpoint at {weights} (+ {meta_path.name}); "
                                f"train one with `pyamalgam train-teacher --out {weights}`")
    # Both files are untrusted: the JSON is checked (size, depth, schema) and the shapes its config
    # implies are compared with the weights' header before the network is allocated.
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CorruptFileError(f"{meta_path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint", meta_path)
    record = TeacherRecord.from_json(validate(meta, _sidecar_schema(), meta_path))
    try:
        expected = expected_state(lambda: build_teacher(**record.config))
    except (ValueError, TypeError) as e:
        raise CorruptFileError(f"{meta_path}: its config {record.config} builds no teacher: {e}", meta_path) from None
    state = load_tensors(weights, expected, f"{weights} (the weights of config {record.config})")
    net = build_teacher(**record.config)
    net.load_state_dict(state, strict=True)
    if device is not None:
        net.to(device)
    return Teacher(net.eval(), record)


def _sidecar_schema() -> Record:
    """What :func:`load_teacher` accepts in a sidecar: the build_teacher arguments in their
    ranges (nothing else), training fields of their types, per-step losses as numbers."""
    config = Record({"task": Str(tuple(_ALIASES))}, {
        "width": Num(positive=True, hi=MAX_WIDTH), "depth": Int(1, MAX_DEPTH), "decoder": Str(("unpool", "concat")),
        "num_classes": Int(1, 100_000), "num_bins": Int(1, 100_000), "max_depth": Num(positive=True),
        "in_chans": Int(1, 1024)}, extra=None)
    kinds = {"steps": Int(0), "batch_size": Int(1), "seed": Int(0), "parameters": Int(0), "flip": Bool,
             "channels_last": Bool, "optimizer": Str(), "data": Str(max_len=2**20)}
    train = Record({}, {f.name: Nullable(kinds.get(f.name, Num())) for f in dataclasses.fields(TeacherRecord)
                        if f.name not in ("config", "losses", "extra")})
    return Record({"config": config}, {"weights": Str(), "train": Nullable(train), "losses": Nullable(ListOf(Num()))})


from .evaluate import evaluate_teacher  # noqa: E402  (uses nothing above; kept beside the command)

# The train-teacher command (argument checks, data sets by name) lives in command.py; imported
# last because it uses the names above.
from .command import (MAX_DEPTH, MAX_SEED, MAX_WIDTH, check_output_folder, open_dataset,  # noqa: E402
                      parse_resolution, run_train_teacher)

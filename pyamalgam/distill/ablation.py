"""The thesis' distillation ablation (Tables 3.1 and 4.2) on the embedded synthetic scenes: the
engine of ``pyamalgam distill``.

A wide teacher (the VGG SegNet at ``teacher_width``, 1/4) is trained with labels on the
rendered train split; then for each student width (1/8, and the width-halved 1/16, as the
thesis' ResNet18 (1.0) and (0.5)) and each row — no distillation, +PI, +PI+PA (full graph),
+PI+PA (local: alpha = 9, beta = 2x2), +PI+PA+HO, +CWD — a student is trained with labels and
the row's terms for ``student_steps`` steps, once per seed, and evaluated on the test split
(mIoU). Tables (markdown + JSON) and one figure go to ``out``; :func:`run_ablation` returns the
results. Budgets (2 idle AVX2 CPU cores, measured: docs/distiller.md): the full preset 13 min,
``quick`` 2.5 min.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .._checks import as_int
from ..data import SyntheticScenes
from ..engine import FolderLock
from ..metrics import SegmentationMetric
from ..models import count_parameters, segnet_vgg
from ..teachers import train_teacher
from .ablation_report import write_results
from .distiller import Distiller

__all__ = ["ROWS", "AblationConfig", "ablation_config", "run_ablation"]

CRITIC_WIDTH = 16  # the HO row's Discriminator width (its first block's channels)

#: (label, terms) of Table 3.1's rows, Table 3.2's local graph and Table 4.2's CWD (thesis weights).
ROWS = (
    ("student", {}),
    ("+PI", {"pi": 10.0}),
    # not in the thesis: Eq. 3.1 in the soft-target order of the public implementations, KL(q^t || q^s)
    # (the printed KL(q^s || q^t) destabilised small students here: docs/distiller.md)
    ("+PI, KL(t‖s)", {"pi": {"weight": 10.0, "order": "teacher"}}),
    ("+PI+PA", {"pi": 10.0, "pa": 10.0}),
    ("+PI+PA local (α=9, β=2×2)", {"pi": 10.0, "pa": {"weight": 10.0, "radius": 1, "patch": 2}}),
    # the critic at width 16 (16..128 channels, 0.33 M parameters), not the public code's 64 (5.3 M):
    # scaled to these 0.06-0.24 M students, and a third of the time per ablation step (docs/distiller.md)
    ("+PI+PA+HO", {"pi": 10.0, "pa": 10.0, "ho": {"weight": 0.1, "width": CRITIC_WIDTH}}),
    ("+CWD", {"cwd": 3.0}),
)
_DATA_SEED = 0  # the rendered scenes are the same for every seed: the seeds vary the training


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """Sizes and budgets of one ablation (see :func:`ablation_config` for the presets)."""

    resolution: tuple = (64, 64)
    depth: int = 4                # pooling stages of the SegNets: N = 8 blocks
    teacher_width: float = 1 / 4
    student_widths: tuple = (1 / 8, 1 / 16)
    train_size: int = 400         # labelled images (teacher and students)
    test_size: int = 100
    batch_size: int = 8
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    student_steps: int = 200
    student_lr: float = 3e-3
    optimizer: str = "adam"       # from scratch in few steps (the thesis: SGD for 40k iterations)
    weight_decay: float = 4e-6
    channels_last: bool = True    # faster on the CPU

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resolution"], d["student_widths"] = list(self.resolution), list(self.student_widths)
        return d


_PRESETS = {
    "full": AblationConfig(),
    "quick": AblationConfig(resolution=(32, 32), train_size=160, test_size=48, teacher_steps=300, student_steps=60),
    "micro": AblationConfig(resolution=(16, 16), depth=2, train_size=8, test_size=4, batch_size=4, teacher_steps=3,
                            student_steps=2),  # the smoke test's
}


def ablation_config(preset: str = "full", **overrides) -> AblationConfig:
    """The ``"full"``, ``"quick"`` or ``"micro"`` preset, with fields replaced by ``overrides``."""
    return preset_config(_PRESETS, preset, overrides)


def preset_config(presets: dict, preset: str, overrides: dict):
    """What every experiment's ``*_config`` does first (this ablation, the video table, ``pyamalgam
    mtl``): the dataclass ``presets[preset]`` with fields replaced by ``overrides``, unknown names
    refused, its ``resolution`` multiples of ``2^depth``."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    cls = type(presets[preset])
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
    cfg = dataclasses.replace(presets[preset], **overrides)
    if any(s % 2**cfg.depth for s in cfg.resolution):
        raise ValueError(f"resolution {cfg.resolution} must be multiples of 2^depth = {2**cfg.depth}")
    return cfg


def holistic_available() -> bool:
    return importlib.util.find_spec("pyamalgam.losses.holistic") is not None


def run_ablation(out, *, quick: bool = False, seeds=(0, 1), device="cpu", threads: int | None = None,
                 progress: bool = True, config: AblationConfig | None = None) -> dict:
    """Run the ablation into the folder ``out`` (``ablation.md``, ``ablation.json``,
    ``ablation.png``) and return its results. ``config`` replaces the preset ``quick`` picks."""
    cfg = config if config is not None else ablation_config("quick" if quick else "full")
    return run_in_folder(out, seeds, device, threads, lambda o, s, d: _run(o, cfg, s, d, progress))


def run_in_folder(out, seeds, device, threads, run) -> dict:
    """What every experiment driver (this ablation, the video table, ``pyamalgam mtl``) does before
    its work: check the seeds, make the device, set torch's threads, hold ``out`` (one run per
    folder); then ``run(out, seeds, device)``."""
    seeds = check_seeds(seeds)
    device = torch.device(device)
    out = Path(out)
    if threads is not None:
        torch.set_num_threads(as_int(threads))
    lock = FolderLock(out, "out").acquire()
    try:
        return run(out, seeds, device)
    finally:
        lock.release()


def _run(out, cfg, seeds, device, progress) -> dict:
    t0 = time.perf_counter()
    train, test = (_render(split, size, cfg, progress) for split, size in (("train", cfg.train_size),
                                                                           ("test", cfg.test_size)))
    teacher, record = train_teacher("seg", train, steps=cfg.teacher_steps, batch_size=cfg.batch_size,
                                    lr=cfg.teacher_lr, width=cfg.teacher_width, depth=cfg.depth,
                                    channels_last=cfg.channels_last, device=device, seed=_DATA_SEED,
                                    progress=progress, data_name="synthetic train")
    results = {"config": cfg.to_json(), "seeds": list(seeds), "device": str(device),
               "teacher": {"width": cfg.teacher_width, "parameters": count_parameters(teacher),
                           "miou": evaluate_miou(teacher, test, device),
                           "ms_per_step": round(1000 * record.seconds / cfg.teacher_steps, 2)},
               "rows": []}
    ho = holistic_available()
    for width in cfg.student_widths:
        for label, terms in ROWS:
            if "ho" in terms and not ho:
                results["rows"].append({"width": width, "row": label, "terms": terms, "skipped":
                                        "pyamalgam.losses.holistic is not available"})
                continue
            runs = [_student_run(cfg, teacher, train, test, width, terms, seed, device, progress) for seed in seeds]
            results["rows"].append(_summary(width, label, terms, runs))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["files"] = write_results(out, results)
    return results


def _student_run(cfg, teacher, train, test, width, terms, seed, device, progress) -> dict:
    torch.manual_seed(1000 + seed)  # the student's initialisation, the same for every row of a seed
    student = segnet_vgg("segmentation", width=width, depth=cfg.depth, num_classes=train.num_classes)
    loader = DataLoader(train, batch_size=min(cfg.batch_size, len(train)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    d = Distiller(teacher, student, terms=terms, optimizer=cfg.optimizer, lr=cfg.student_lr,
                  weight_decay=cfg.weight_decay, device=device, progress=progress,
                  channels_last=cfg.channels_last, ignore_index=train.ignore_index)
    d.fit(loader, math.ceil(cfg.student_steps / len(loader)), max_steps=cfg.student_steps)
    record = d.history[-1]
    return {"seed": seed, "miou": evaluate_miou(student, test, device), "parameters": count_parameters(student),
            "ms_per_step": 1000 * record["seconds"] / record["steps"], "losses": record["losses"]}


def _summary(width, label, terms, runs) -> dict:
    mious = [r["miou"] for r in runs]
    return {"width": width, "row": label, "terms": terms, "parameters": runs[0]["parameters"],
            "miou": statistics.fmean(mious), "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
            "ms_per_step": round(statistics.fmean(r["ms_per_step"] for r in runs), 2), "runs": runs}


@torch.no_grad()
def evaluate_miou(net, dataset, device, batch_size: int = 16) -> float:
    """Test mIoU of a segmentation network (:class:`~pyamalgam.metrics.SegmentationMetric`)."""
    net.eval()
    metric = SegmentationMetric(dataset.num_classes, dataset.ignore_index)
    for batch in DataLoader(dataset, batch_size=batch_size):
        metric.update(net(batch["image"].to(device)).float(), batch["seg"].to(device))
    return float(metric.compute()["miou"])


class _Rendered(Dataset):
    """A rendered split held in memory (images and segmentation labels), with its attributes."""

    def __init__(self, images, seg, source):
        self.images, self.seg = images, seg
        self.num_classes, self.ignore_index = source.num_classes, source.ignore_index
        self.max_depth, self.tasks, self.class_names = source.max_depth, ("seg",), source.class_names

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "seg": self.seg[i]}


def _render(split, size, cfg, progress) -> _Rendered:
    """Render a split once (every run reads the same tensors, instead of rendering per epoch)."""
    ds = SyntheticScenes(split, size=size, resolution=tuple(cfg.resolution), seed=_DATA_SEED)
    images, seg = [], []
    for batch in tqdm(DataLoader(ds, batch_size=32), desc=f"render {split}", disable=not progress, leave=False):
        images.append(batch["image"])
        seg.append(batch["seg"])
    return _Rendered(torch.cat(images), torch.cat(seg), ds)


def check_seeds(seeds) -> tuple:
    values = tuple(as_int(s) for s in seeds) if isinstance(seeds, (tuple, list)) else ()
    if not values or any(s is None or s < 0 for s in values) or len(set(values)) != len(values):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints >= 0, got {seeds!r}")
    return values

"""Seed 002's Table 1 on the embedded synthetic scenes: the engine of ``pyamalgam mtl``.

Rows (docs/multitask.md): Vanilla SegNet (Baseline-1), SD-Vanilla T/S (★, ★★; Baseline-2),
Trad. KD (Baseline-3), SD-MTCNN T/S (★, ★★, ★ full, ★★ full; Baseline-4 and the method), the
U-Net ablation (vanilla, ★ full, ★★ full), and the amalgamated TargetNet of the same tasks from
single-task teachers (paper 001, :class:`~pyamalgam.amalgamation.Amalgamator`, no labels). Every
trained row runs once per seed (the rendered data are the same for every seed); the single-task
teachers (of Trad. KD and of the amalgamation) are trained once, with labels. Columns: seed 002's
(segmentation pixel accuracy and mIoU, depth abs / rel error, normal cosine, key-point and edge
abs error where those tasks are in the run).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
from torch.utils.data import DataLoader

from ..amalgamation import Amalgamator
from ..distill.ablation import preset_config, run_in_folder
from ..models.multitask import MultiTaskNet
from ..models.protocol import count_parameters
from ..teachers import train_teacher
from .data import render_split
from .evaluation import evaluate
from .objectives import SelfDistillation
from .report import write_results
from .trainer import MultiTaskTrainer

__all__ = ["ROWS", "Row", "TableConfig", "run_table", "table_config"]

_DATA_SEED = 0
_TEACHER_SEED = 100


@dataclasses.dataclass(frozen=True)
class Row:
    """One trained configuration: ``label``, decoder ("unpool" | "concat"), self-distillation,
    traditional KD, and which of seed 002's baselines it is."""

    label: str
    decoder: str = "unpool"
    sd: SelfDistillation | None = None
    kd: bool = False
    baseline: str = ""


_E, _D = "encoder", "decoder"
ROWS = (
    Row("Vanilla SegNet", baseline="Baseline-1"),
    Row("SD-Vanilla Seg. (★)", sd=SelfDistillation(_D, "star"), baseline="Baseline-2"),
    Row("SD-Vanilla Seg. (★★)", sd=SelfDistillation(_D, "star2"), baseline="Baseline-2"),
    Row("Trad. K.D.", kd=True, baseline="Baseline-3"),
    Row("SD-MTCNN (★)", sd=SelfDistillation(_E, "star"), baseline="Baseline-4"),
    Row("SD-MTCNN (★★)", sd=SelfDistillation(_E, "star2"), baseline="Baseline-4"),
    Row("SD-MTCNN (★) full", sd=SelfDistillation(_E, "star", full=True)),
    Row("SD-MTCNN (★★) full", sd=SelfDistillation(_E, "star2", full=True)),
    Row("U-Net", decoder="concat", baseline="ablation"),
    Row("U-Net (★) full", decoder="concat", sd=SelfDistillation(_E, "star", full=True), baseline="ablation"),
    Row("U-Net (★★) full", decoder="concat", sd=SelfDistillation(_E, "star2", full=True), baseline="ablation"),
)
AMALGAMATED = "Amalgamated TargetNet"


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """Sizes and budgets of one table (see :func:`table_config` for the presets)."""

    tasks: tuple = ("seg", "depth", "normal")
    resolution: tuple = (48, 48)
    depth: int = 4                # pooling stages: N = 8 blocks
    width: float = 1 / 8          # every network of the table (multi-task nets and teachers)
    num_bins: int = 32
    train_size: int = 320
    test_size: int = 80
    batch_size: int = 8
    steps: int = 150              # every multi-task row
    lr: float = 3e-3
    teacher_steps: int = 150      # each single-task teacher
    block_steps: int = 15         # the amalgamation's Step 2, per block
    finetune_steps: int = 60      # its Step 4
    amalgam_lr: float = 3e-3
    kd_weight: float = 1.0
    optimizer: str = "adam"       # from scratch in few steps
    weight_decay: float = 4e-6

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"], d["resolution"] = list(self.tasks), list(self.resolution)
        return d


_PRESETS = {
    "full": TableConfig(),
    "quick": TableConfig(resolution=(32, 32), depth=3, width=1 / 16, num_bins=16, train_size=96, test_size=32,
                         steps=30, teacher_steps=40, block_steps=4, finetune_steps=12),
    "micro": TableConfig(resolution=(16, 16), depth=2, width=1 / 16, num_bins=8, train_size=8, test_size=4,
                         batch_size=4, steps=2, teacher_steps=2, block_steps=1, finetune_steps=1),
}


def table_config(preset: str = "full", **overrides) -> TableConfig:
    """The ``"full"``, ``"quick"`` or ``"micro"`` preset, fields replaced by ``overrides``."""
    cfg = preset_config(_PRESETS, preset, overrides)
    MultiTaskNet(cfg.tasks, width=cfg.width, depth=1)  # the task names: a clear error now, not after rendering
    return cfg


def run_table(out, *, quick: bool = False, seeds=(0, 1), device="cpu", threads: int | None = None,
              progress: bool = True, config: TableConfig | None = None, rows=ROWS, amalgamated: bool = True) -> dict:
    """Run the table into the folder ``out`` (``mtl.md``, ``mtl.json``, ``mtl.png``); its results."""
    cfg = config if config is not None else table_config("quick" if quick else "full")
    return run_in_folder(out, seeds, device, threads, lambda o, s, d: _run(o, cfg, s, d, progress, rows, amalgamated))


def _run(out, cfg, seeds, device, progress, rows, amalgamated) -> dict:
    t0 = time.perf_counter()
    train = render_split("train", cfg.train_size, cfg.resolution, cfg.tasks, _DATA_SEED, progress)
    test = render_split("test", cfg.test_size, cfg.resolution, cfg.tasks, _DATA_SEED, progress)
    teachers, teacher_info = {}, {}
    if amalgamated or any(r.kd for r in rows):
        teachers, teacher_info = _teachers(cfg, train, test, device, progress)
    results = {"config": cfg.to_json(), "seeds": list(seeds), "device": str(device), "teachers": teacher_info,
               "rows": []}
    for row in rows:
        runs = [_row_run(cfg, row, train, test, teachers, seed, device, progress) for seed in seeds]
        results["rows"] += _summaries(row.label, row.baseline, runs)
    if amalgamated:
        runs = [_amalgamated_run(cfg, teachers, train, test, seed, device, progress) for seed in seeds]
        results["rows"] += _summaries(AMALGAMATED, "paper 001", runs)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["files"] = write_results(out, results)
    return results


def _net(cfg, train, decoder, shallow) -> MultiTaskNet:
    return MultiTaskNet(cfg.tasks, width=cfg.width, depth=cfg.depth, decoder=decoder, num_classes=train.num_classes,
                        num_bins=cfg.num_bins, max_depth=train.max_depth, shallow=shallow)


def _loader(train, cfg, seed):
    return DataLoader(train, batch_size=min(cfg.batch_size, len(train)), shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def _row_run(cfg, row, train, test, teachers, seed, device, progress) -> dict:
    torch.manual_seed(1000 + seed)  # the same initialisation for every row of a seed (and decoder)
    net = _net(cfg, train, row.decoder, row.sd is not None)
    tr = MultiTaskTrainer(net, sd=row.sd, teachers={t: teachers[t] for t in cfg.tasks} if row.kd else None,
                          kd_weight=cfg.kd_weight, optimizer=cfg.optimizer, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, device=device, progress=progress)
    loader = _loader(train, cfg, seed)
    tr.fit(loader, math.ceil(cfg.steps / len(loader)), max_steps=cfg.steps)
    record = tr.history[-1]
    result = {"seed": seed, "parameters": count_parameters(net.heads) + count_parameters(net.encoder)
              + count_parameters(net.decoders), "ms_per_step": 1000 * record["seconds"] / record["steps"],
              "T": evaluate(net, test, cfg.tasks, device)}
    if row.sd is not None:
        result["S"] = evaluate(net, test, cfg.tasks, device, path="S")
    return result


def _teachers(cfg, train, test, device, progress):
    teachers, info = {}, {}
    for i, task in enumerate(cfg.tasks):
        net, record = train_teacher(task, train, steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                    width=cfg.width, depth=cfg.depth, num_bins=cfg.num_bins, device=device,
                                    seed=_TEACHER_SEED + i, progress=progress, data_name="synthetic train")
        teachers[task] = net
        info[task] = {"parameters": count_parameters(net), "metrics": evaluate(net, test, (task,), device),
                      "ms_per_step": round(1000 * record.seconds / cfg.teacher_steps, 2)}
    return teachers, info


class _Images(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"image": self.data.images[i]}


def _amalgamated_run(cfg, teachers, train, test, seed, device, progress) -> dict:
    torch.manual_seed(2000 + seed)
    am = Amalgamator(dict(teachers), optimizer=cfg.optimizer, lr=cfg.amalgam_lr, device=device, progress=progress)
    loader = _loader(_Images(train), cfg, seed)
    t0 = time.perf_counter()
    am.fit(loader, math.ceil(cfg.block_steps / len(loader)), max_steps_per_block=cfg.block_steps,
           final_loss_images=min(16, len(train)))
    points = am.branch_out()
    net = am.finetune(loader, math.ceil(cfg.finetune_steps / len(loader)), max_steps=cfg.finetune_steps)
    steps = cfg.block_steps * am.num_blocks + cfg.finetune_steps
    return {"seed": seed, "parameters": count_parameters(net), "points": points,
            "ms_per_step": 1000 * (time.perf_counter() - t0) / steps,
            "T": evaluate(net.eval(), test, cfg.tasks, device)}


def _summaries(label, baseline, runs) -> list:
    rows = []
    for path in ("T", "S"):
        if path not in runs[0]:
            continue
        columns = {}
        for key in runs[0][path]:
            values = [r[path][key] for r in runs]
            columns[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append({"row": label, "path": path, "baseline": baseline, "parameters": runs[0]["parameters"],
                     "ms_per_step": round(statistics.fmean(r["ms_per_step"] for r in runs), 2), "columns": columns,
                     "runs": [{"seed": r["seed"], **r[path], **({"points": r["points"]} if "points" in r else {})}
                              for r in runs]})
    return rows


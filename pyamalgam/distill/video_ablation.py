"""Thesis Table 5.1 on synthetic clips: the engine of ``pyamalgam distill --video``.

A SegNet teacher (width 1/4) is trained with labels on every frame of the rendered training clips;
then, once per seed, a width-1/8 student is trained per row of Table 5.1 — the per-frame baseline
(scheme a, cross-entropy on the labelled frame only), +SF (b: PI + PA on every frame), +PF (c),
+MF (d), +TL (e) and all of them (j) — with the objective of Eq. 5.3 (lambda = 0.1 for every term)
on triplets drawn by Table 5.2's random-sample policy, all rows for the same number of steps, and
evaluated on the test clips: mIoU over every frame and TC (the mIoU of flow-warped neighbouring
predictions over the exactly visible pixels, :class:`~pyamalgam.metrics.TemporalConsistency`).
Markdown + JSON tables and a figure of one test clip's predictions frame by frame go to ``out``.
Budgets (docs/distiller.md; one thread on a loaded machine): quick 44 s measured, full about 7 min
estimated from per-step timings.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import SyntheticClips
from ..metrics import SegmentationMetric, TemporalConsistency
from ..models import count_parameters, segnet_vgg
from ..teachers import train_teacher
from .ablation import preset_config, run_in_folder
from .video import LAMBDA, RandomSampledTriplets, VideoDistiller
from .video_report import write_results

__all__ = ["VIDEO_ROWS", "VideoConfig", "evaluate_clips", "run_video_ablation", "video_config"]

#: (scheme of Table 5.1, terms); every weight is Eq. 5.3's lambda.
VIDEO_ROWS = (
    ("a: per-frame student", ()),
    ("b: +SF", ("pi", "pa")),
    ("c: +PF", ("pf",)),
    ("d: +MF", ("mf",)),
    ("e: +TL", ("tl",)),
    ("j: all (SF+PF+MF+TL)", ("pi", "pa", "pf", "mf", "tl")),
)
_DATA_SEED = 0  # the rendered clips are the same for every seed: the seeds vary the training


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """Sizes and budgets of one video ablation (see :func:`video_config` for the presets)."""

    resolution: tuple = (48, 64)
    length: int = 5              # frames of a rendered training clip; the triplets are drawn from it
    anchor: int = 2              # the labelled frame of a training clip (T' = 1, as Cityscapes)
    test_frames: int = 4         # frames of a test clip (TC over its T-1 neighbouring pairs)
    depth: int = 4
    teacher_width: float = 1 / 4
    student_width: float = 1 / 8
    train_clips: int = 64
    test_clips: int = 16
    batch_size: int = 4          # triplets (3 frames each)
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    student_steps: int = 300
    student_lr: float = 3e-3
    optimizer: str = "adam"      # from scratch in few steps (the thesis fine-tunes PSPNet18 with SGD)
    weight_decay: float = 4e-6
    lam: float = LAMBDA
    policy: str = "random"       # Table 5.2's RS; "adjacent" for the rows without it
    channels_last: bool = True

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resolution"] = list(self.resolution)
        return d


_PRESETS = {
    "full": VideoConfig(),
    "quick": VideoConfig(resolution=(32, 48), train_clips=24, test_clips=8, teacher_steps=300, student_steps=60),
    "micro": VideoConfig(resolution=(16, 16), length=4, anchor=1, test_frames=3, depth=2, train_clips=2,
                         test_clips=1, batch_size=2, teacher_steps=2, student_steps=2),  # the smoke test's
}


def video_config(preset: str = "full", **overrides) -> VideoConfig:
    """The ``"full"``, ``"quick"`` or ``"micro"`` preset, with fields replaced by ``overrides``."""
    cfg = preset_config(_PRESETS, preset, overrides)
    if not 1 <= cfg.anchor <= cfg.length - 2:
        raise ValueError(f"anchor must leave a frame on each side of the labelled one: 1 <= anchor <= "
                         f"length - 2 = {cfg.length - 2}, got {cfg.anchor}")
    if cfg.test_frames < 2:
        raise ValueError(f"test_frames must be >= 2 (TC compares neighbouring frames), got {cfg.test_frames}")
    return cfg


def run_video_ablation(out, *, quick: bool = False, seeds=(0, 1), device="cpu", threads: int | None = None,
                       progress: bool = True, config: VideoConfig | None = None) -> dict:
    """Run Table 5.1 into the folder ``out`` (``video.md``, ``video.json``, ``video.png``) and
    return its results. ``config`` replaces the preset ``quick`` picks."""
    cfg = config if config is not None else video_config("quick" if quick else "full")
    return run_in_folder(out, seeds, device, threads, lambda o, s, d: _run(o, cfg, s, d, progress))


def _run(out, cfg, seeds, device, progress) -> dict:
    t0 = time.perf_counter()
    train, pair_flows, frames = _render_train(cfg, progress)
    test = _render_test(cfg, progress)
    render_s = time.perf_counter() - t0
    teacher, record = train_teacher("seg", frames, steps=cfg.teacher_steps, batch_size=cfg.batch_size * 3,
                                    lr=cfg.teacher_lr, width=cfg.teacher_width, depth=cfg.depth,
                                    channels_last=cfg.channels_last, device=device, seed=_DATA_SEED,
                                    progress=progress, data_name="synthetic clips (every frame)")
    triplets = RandomSampledTriplets(train, cfg.anchor, policy=cfg.policy,
                                     pair_flow=lambda i, s, t: pair_flows[(i, s, t)])
    t_eval = evaluate_clips(teacher, test, device)
    results = {"config": cfg.to_json(), "seeds": list(seeds), "device": str(device),
               "render_seconds": round(render_s, 1), "triplets": len(triplets),
               "num_classes": test.num_classes,
               "teacher": {"width": cfg.teacher_width, "parameters": count_parameters(teacher),
                           "miou": t_eval["miou"], "tc": t_eval["tc"],
                           "ms_per_step": round(1000 * record.seconds / cfg.teacher_steps, 2)},
               "rows": [], "clip": {"image": test[0]["image"], "seg": test[0]["seg"], "teacher": t_eval["labels"]}}
    for label, terms in VIDEO_ROWS:
        runs = [_student_run(cfg, teacher, triplets, test, terms, seed, device, progress) for seed in seeds]
        if terms in ((), VIDEO_ROWS[-1][1]):  # the figure's rows: the baseline and all terms (seed 0's)
            results["clip"][label] = runs[0].pop("labels")
        for r in runs:
            r.pop("labels", None)
        results["rows"].append(_summary(label, terms, runs))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["files"] = write_results(out, results)
    results.pop("clip")
    return results


def _student_run(cfg, teacher, triplets, test, terms, seed, device, progress) -> dict:
    torch.manual_seed(1000 + seed)  # the student's initialisation, the same for every row of a seed
    student = segnet_vgg("segmentation", width=cfg.student_width, depth=cfg.depth, num_classes=test.num_classes)
    loader = DataLoader(triplets, batch_size=min(cfg.batch_size, len(triplets)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    d = VideoDistiller(teacher, student, terms=terms, lam=cfg.lam, optimizer=cfg.optimizer, lr=cfg.student_lr,
                       weight_decay=cfg.weight_decay, device=device, progress=progress,
                       channels_last=cfg.channels_last, ignore_index=test.ignore_index)
    d.fit(loader, math.ceil(cfg.student_steps / len(loader)), max_steps=cfg.student_steps)
    record = d.history[-1]
    ev = evaluate_clips(student, test, device)
    return {"seed": seed, "miou": ev["miou"], "tc": ev["tc"], "parameters": count_parameters(student),
            "ms_per_step": 1000 * record["seconds"] / record["steps"], "losses": record["losses"],
            "labels": ev["labels"]}


def _summary(label, terms, runs) -> dict:
    row = {"row": label, "terms": list(terms), "parameters": runs[0]["parameters"], "runs": runs,
           "ms_per_step": round(statistics.fmean(r["ms_per_step"] for r in runs), 2)}
    for key in ("miou", "tc"):
        values = [r[key] for r in runs]
        row[key], row[f"{key}_std"] = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return row


@torch.no_grad()
def evaluate_clips(net, clips, device) -> dict:
    """mIoU over every frame of ``clips`` and TC over their neighbouring frames (pixels whose scene
    point is visible in the next frame, ``flow_valid``); ``labels``: clip 0's predictions (T, H, W)."""
    net.eval()
    seg = SegmentationMetric(clips.num_classes, clips.ignore_index)
    tc = TemporalConsistency(clips.num_classes)
    first = None
    for clip in clips:
        logits = net(clip["image"].to(device)).float()
        seg.update(logits, clip["seg"].to(device))
        tc.update(logits[:-1], logits[1:], clip["flow"].to(device), clip["flow_valid"].to(device))
        first = logits.argmax(1).cpu() if first is None else first
    return {"miou": float(seg.compute()["miou"]), "tc": float(tc.compute()["tc"]), "labels": first}


class _Frames(Dataset):
    """Every frame of the training clips as a labelled still (the teacher's training set)."""

    def __init__(self, clips, source):
        self.images = torch.cat([c["image"] for c in clips])
        self.seg = torch.cat([c["seg"] for c in clips])
        self.num_classes, self.ignore_index = source.num_classes, source.ignore_index
        self.max_depth, self.tasks, self.class_names = source.max_depth, ("seg",), source.class_names

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "seg": self.seg[i]}


class _Clips(list):
    """Rendered clips held in memory, with the data set's attributes."""

    def __init__(self, clips, source):
        super().__init__(clips)
        self.num_classes, self.ignore_index = source.num_classes, source.ignore_index
        self.class_names, self.max_depth = source.class_names, source.max_depth


_KEEP = ("image", "seg", "flow", "flow_valid")


def _render_train(cfg, progress):
    """The training clips, the exact flows of the frame pairs the random-sample policy needs
    beyond neighbours (frame_f -> anchor, anchor -> frame_b), and every frame as a still."""
    ds = SyntheticClips("train", size=cfg.train_clips, frames=cfg.length, resolution=tuple(cfg.resolution),
                        seed=_DATA_SEED)
    clips, flows, a = [], {}, cfg.anchor
    pairs = [(f, a) for f in range(a - 1)] + [(a, b) for b in range(a + 2, cfg.length)]
    for i in tqdm(range(len(ds)), desc="render train clips", disable=not progress, leave=False):
        clip = ds[i]
        clips.append({k: clip[k] for k in _KEEP})
        if cfg.policy == "random":
            for s, t in pairs:
                flows[(i, s, t)] = ds.flow(i, s, t)
    return _Clips(clips, ds), flows, _Frames(clips, ds)


def _render_test(cfg, progress):
    ds = SyntheticClips("test", size=cfg.test_clips, frames=cfg.test_frames, resolution=tuple(cfg.resolution),
                        seed=_DATA_SEED)
    clips = [ds[i] for i in tqdm(range(len(ds)), desc="render test clips", disable=not progress, leave=False)]
    return _Clips([{k: c[k] for k in _KEEP} for c in clips], ds)


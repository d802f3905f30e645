"""The paper's experiment (001, §6) as a pipeline, end to end on synthetic (or real) data.

Stages, each cached in the run directory and reused by a later run with the same settings:

1. data: SyntheticScenes train (labelled, for the teachers), unlabelled (for the students) and
   test splits, rendered once and stored as safetensors;
2. teachers: SegNet, DepthNet and NormNet trained with labels (:mod:`pyamalgam.teachers`);
3. TargetNet-2 (seg + depth): block-wise amalgamation (Eq. 6) on unlabelled images, then
   * the Eq. 7 TargetNet (each task branches out where its final block loss is lowest), and
   * Decoder_b1..b5 (every task branches out at decoder block b), all from the same block-wise
     fit, each fine-tuned for the same number of steps;
4. TargetNet-3 offline (Eq. 8: three teachers at once) and online (Eq. 9: TargetNet-2 and NormNet);
5. evaluation of every network on the test split, then :mod:`pyamalgam.report` writes Table 1,
   Table 2 (markdown + JSON) and the figures.

A stage's cache entry carries a key (a hash of everything it depends on, upstream stages
included); a mismatch recomputes it. Files are written atomically, so an interrupted run
restarts from its last finished stage (the block-wise fits even from their last finished block).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ._io import atomic_write
from .amalgamation import Amalgamator
from .amalgamation.branch import decoder_candidates
from .engine import load_checkpoint, save_checkpoint
from .metrics import DepthMetric, NormalMetric, SegmentationMetric
from .models import count_parameters
from .teachers import load_teacher, open_dataset, save_teacher, teacher_paths, train_teacher

__all__ = ["DemoConfig", "demo_config", "run_demo", "evaluate", "InMemoryScenes"]

TASKS = ("seg", "depth", "normal")
CACHE_VERSION = 2  # bump when a stage's meaning changes

#: Offsets added to ``--seed``: each stage draws every random number from its own seed (set just
#: before the stage's first draw), so a stage gives the same result whether the stages before it
#: ran in this process or were loaded from the cache.
SEED_OFFSETS = {"teacher/seg": 101, "teacher/depth": 202, "teacher/normal": 303, "fit": 0, "finetune": 7}


@dataclasses.dataclass
class DemoConfig:
    """Sizes and budgets of one demo run (see :func:`demo_config` for the presets)."""

    resolution: tuple = (64, 96)
    width: float = 1 / 8          # channel multiplier of the VGG16 layout
    depth: int = 5                # pooling stages: N = 10 blocks, 5 decoder blocks
    num_bins: int = 32            # N_d of the depth head (Eq. 2)
    train_size: int = 800         # labelled images for the teachers
    unlabelled_size: int = 1200   # images the students learn from (labels never read)
    test_size: int = 200
    batch_size: int = 8
    teacher_steps: int = 1200
    teacher_lr: float = 2e-3
    block_steps: int = 32         # per block of the block-wise amalgamation (Step 2)
    finetune_steps: int = 1600    # Step 4, the same for every fine-tuned TargetNet
    finetune_variants: bool = False  # also fine-tune Decoder_b1..b5 (else: Steps 2-3 only)
    amalgam_lr: float = 3e-3
    amalgam_optimizer: str = "adam"
    probe_images: int = 64        # fixed unlabelled images on which Eq. 7's final block losses are measured
    target_cache_mb: int = 2048   # teacher targets kept per unlabelled image (the teachers are frozen)
    eval_batch: int = 16
    figure_samples: int = 3
    num_workers: int = 0          # DataLoader workers (rendering and training)
    channels_last: bool = True    # teachers and students train in channels_last (faster on the CPU)
    data: str = "synthetic"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resolution"] = list(self.resolution)
        return d

    def validate(self) -> "DemoConfig":
        """Fail early, before hours of work, on settings the networks cannot take."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value < (0 if f.name == "num_workers" else 1e-12):
                    raise ValueError(f"demo config: {f.name} must be > 0, got {value!r}")
        divisor = 2 ** self.depth  # every pooling stage halves the image (SegNet's max-unpool needs it exact)
        if len(self.resolution) != 2 or any(int(s) % divisor for s in self.resolution):
            raise ValueError(f"demo config: resolution {tuple(self.resolution)} must be two multiples of "
                             f"2^depth = {divisor}")
        if self.amalgam_optimizer not in ("sgd", "adam"):
            raise ValueError(f"demo config: amalgam_optimizer must be 'sgd' or 'adam', got {self.amalgam_optimizer!r}")
        if self.test_size < self.figure_samples:
            raise ValueError(f"demo config: test_size ({self.test_size}) < figure_samples ({self.figure_samples})")
        return self


def demo_config(quick: bool = False, device="cpu", **overrides) -> DemoConfig:
    """The preset for ``--quick`` / full runs on a CPU or a GPU (``device`` None: cuda if
    available); keywords override fields. The CPU presets fit 2 cores: ``quick`` in under 3 min,
    the full one in under 15 min (measured stage times: docs/demo.md)."""
    gpu = _default_device(device).type == "cuda"
    if gpu and quick:
        cfg = DemoConfig(resolution=(128, 160), width=1 / 4, train_size=512, unlabelled_size=1024, test_size=100,
                         batch_size=16, teacher_steps=1000, block_steps=60, finetune_steps=500, finetune_variants=True,
                         num_workers=4, channels_last=False)
    elif gpu:
        cfg = DemoConfig(resolution=(192, 256), width=1 / 2, num_bins=64, train_size=1000, unlabelled_size=4000,
                         test_size=200, batch_size=16, teacher_steps=3000, teacher_lr=1e-3, block_steps=250,
                         finetune_steps=2000, finetune_variants=True, amalgam_lr=1e-3, eval_batch=32,
                         figure_samples=4, num_workers=min(8, os.cpu_count() or 1), channels_last=False)
    elif quick:  # the README's command on a 2-core CPU: every stage, small images, few steps
        cfg = DemoConfig(resolution=(64, 64), num_bins=16, train_size=320, unlabelled_size=320, test_size=64,
                         teacher_steps=250, teacher_lr=3e-3, block_steps=10, finetune_steps=100, probe_images=16)
    else:
        cfg = DemoConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DemoConfig)}
    if unknown:
        raise ValueError(f"demo config: unknown field(s) {sorted(unknown)}")
    return dataclasses.replace(cfg, **overrides).validate()


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------- helpers

def _key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(msg, file=sys.stderr)


class InMemoryScenes(Dataset):
    """A data set held as stacked tensors (one rendered split), same sample contract and attributes."""

    def __init__(self, tensors: dict, *, num_classes: int, class_names, ignore_index: int, max_depth: float,
                 tasks):
        self.tensors = tensors
        self.num_classes, self.class_names = num_classes, tuple(class_names)
        self.ignore_index, self.max_depth, self.tasks = ignore_index, max_depth, tuple(tasks)

    def __len__(self):
        return self.tensors["image"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}

class _ImagesOnly(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {"image": self.dataset[i]["image"]}


def _attrs(ds) -> dict:
    return {"num_classes": int(ds.num_classes), "class_names": list(ds.class_names), "ignore_index": int(ds.ignore_index),
            "max_depth": float(ds.max_depth), "tasks": list(ds.tasks)}


def _materialise(ds, path: Path, key: str, cfg: DemoConfig, progress: bool) -> InMemoryScenes:
    """Render a synthetic split once into one safetensors file (or load it if the key matches)."""
    if path.is_file():
        try:
            tensors, meta = load_checkpoint(path)
            if meta.get("key") == key:
                return InMemoryScenes(tensors, **meta["attrs"])
        except Exception:  # a corrupt or foreign file: render again
            pass
    loader = DataLoader(ds, batch_size=32, num_workers=cfg.num_workers)
    parts: dict = {}
    with tqdm(total=len(ds), desc=f"render {ds.split}", disable=not progress, leave=False) as bar:
        for batch in loader:
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
            bar.update(batch["image"].shape[0])
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    save_checkpoint(path, tensors, {"key": key, "attrs": _attrs(ds)})
    return InMemoryScenes(tensors, **_attrs(ds))


def _stage_data(cfg: DemoConfig, out: Path, seed: int, progress: bool):
    sizes = {"train": cfg.train_size, "unlabelled": cfg.unlabelled_size, "test": cfg.test_size}
    splits, keys = {}, {}
    for split, size in sizes.items():
        ds = open_dataset(cfg.data, split, resolution=tuple(cfg.resolution), size=size, seed=seed)
        if cfg.data == "synthetic":
            keys[split] = _key("data", cfg.data, split, size, list(cfg.resolution), seed)
            splits[split] = _materialise(ds, out / "data" / f"{split}.safetensors", keys[split], cfg, progress)
        else:  # real data is read from its folder every time (too large to duplicate)
            keys[split] = _key("data", cfg.data, split, list(cfg.resolution))
            splits[split] = ds
    return splits, keys


def _stage_teacher(task, cfg, train, data_key, out: Path, device, seed, progress):
    path = out / "teachers" / f"{task}.safetensors"
    key = _key("teacher", task, data_key, cfg.width, cfg.depth, cfg.num_bins, cfg.teacher_steps, cfg.teacher_lr,
               cfg.batch_size, cfg.channels_last, seed)
    weights, meta_path = teacher_paths(path)
    if meta_path.is_file() and weights.is_file():
        try:
            if json.loads(meta_path.read_text()).get("demo_key") == key:
                return load_teacher(path, device=device), key, True
        except Exception:
            pass
    net = train_teacher(task, train, steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.teacher_lr,
                        width=cfg.width, depth=cfg.depth, num_bins=cfg.num_bins, channels_last=cfg.channels_last, device=device,
                        seed=seed + SEED_OFFSETS[f"teacher/{task}"], num_workers=cfg.num_workers, progress=progress,
                        data_name=f"{cfg.data} train ({len(train)} images, {cfg.resolution[0]}x{cfg.resolution[1]})")
    save_teacher(net, path, extra={"demo_key": key})
    return net, key, False


def _loader(dataset, cfg, seed):
    """Shuffled batches of images only: the students never see a label (§5)."""
    return DataLoader(_ImagesOnly(dataset), batch_size=min(cfg.batch_size, len(dataset)), shuffle=True,
                      drop_last=True, generator=torch.Generator().manual_seed(seed), num_workers=cfg.num_workers)


class _Amalgamation:
    """One Amalgamator and its cache directory: a block-wise fit shared by several TargetNets."""

    def __init__(self, name, teachers, outputs, cfg, unlabelled, upstream_key, out: Path, device, seed, progress):
        self.name, self.cfg = name, cfg
        self.seed, self.finetune_seed = seed + SEED_OFFSETS["fit"], seed + SEED_OFFSETS["finetune"]
        self.outputs = outputs  # teacher key -> output names (for the report)
        self.dir = out / "stages" / name
        self.unlabelled = unlabelled
        self.key = _key("fit", name, upstream_key, cfg.block_steps, cfg.amalgam_lr, cfg.amalgam_optimizer,
                        cfg.batch_size, cfg.probe_images, cfg.channels_last, seed)
        self.key_file = self.dir / "key.json"
        state = _read_json(self.key_file)
        stale = state.get("key") != self.key
        if stale and self.dir.exists():
            shutil.rmtree(self.dir)  # our own cache of another setup
        if stale:
            atomic_write(self.key_file, json.dumps({"key": self.key, "stage": name, "fit_done": False}) + "\n")
        self.cached = not stale and bool(state.get("fit_done"))
        torch.manual_seed(self.seed)  # the channel codings' initialisation is this stage's first draw
        self.am = Amalgamator(teachers, lr=cfg.amalgam_lr, optimizer=cfg.amalgam_optimizer, device=device,
                              channels_last=cfg.channels_last, checkpoint_dir=self.dir, progress=progress, cache_targets=cfg.target_cache_mb * 2**20)
        self.results: dict = {}
        self._warm = False

    def _warm_cache(self) -> None:
        """Teacher targets of every unlabelled image, once (unshuffled: no random draw)."""
        if not self._warm:
            self.am.precompute_targets(DataLoader(_ImagesOnly(self.unlabelled), batch_size=self.cfg.eval_batch))
            self._warm = True

    def fit(self) -> None:
        if not self.cached:
            self._warm_cache()
        loader = _loader(self.unlabelled, self.cfg, self.seed)
        torch.manual_seed(self.seed)
        t0 = time.perf_counter()
        self.am.fit(loader, math.ceil(self.cfg.block_steps / len(loader)), max_steps_per_block=self.cfg.block_steps,
                    resume=True, final_loss_images=self.cfg.probe_images)
        self.fit_seconds = time.perf_counter() - t0
        if not self.cached:
            atomic_write(self.key_file, json.dumps({"key": self.key, "stage": self.name, "fit_done": True,
                                                    "seconds": round(self.fit_seconds, 3)}) + "\n")
        self.am.checkpoint_dir = None  # fine-tunes are cached per TargetNet below, not over the block checkpoint

    def target(self, variant: str, points=None):
        """Branch out (``points`` forced, or Eq. 7), fine-tune (or load the cached result)."""
        chosen = self.am.branch_out(points)
        path = self.dir / f"{variant}.safetensors"
        key = _key("finetune", self.key, chosen, self.cfg.finetune_steps)
        net, cached, seconds = self.am.target_net, False, 0.0
        if path.is_file():
            try:
                tensors, meta = load_checkpoint(path)
                if meta.get("key") == key:
                    net.load_state_dict(tensors)
                    cached, seconds = True, meta.get("seconds", 0.0)
            except Exception:
                cached = False
        if not cached:
            self._warm_cache()
            loader = _loader(self.unlabelled, self.cfg, self.finetune_seed)
            torch.manual_seed(self.finetune_seed)
            t0 = time.perf_counter()
            net = self.am.finetune(loader, math.ceil(self.cfg.finetune_steps / len(loader)), max_steps=self.cfg.finetune_steps)
            seconds = time.perf_counter() - t0
            save_checkpoint(path, net.state_dict(), {"key": key, "points": chosen, "seconds": round(seconds, 3)})
        net.eval()
        self.results[variant] = {"points": chosen, "params": count_parameters(net), "cached": cached,
                                 "finetune_seconds": round(seconds, 3)}
        return net, chosen

    def assembled(self, variant: str, points) -> torch.nn.Module:
        """The TargetNet of branch ``points`` straight from the block-wise fit (Steps 2-3, no Step 4)."""
        chosen = self.am.branch_out(points)
        net = self.am.target_net.eval()
        self.results[variant] = {"points": chosen, "params": count_parameters(net), "cached": True,
                                 "finetune_seconds": 0.0, "finetuned": False}
        return net

    def summary(self) -> dict:
        return {
            "teachers": sorted(self.am.teachers), "outputs": self.outputs, "num_blocks": self.am.num_blocks,
            "candidates": list(decoder_candidates(self.am.num_blocks)),
            "loss_table": {name: {str(n): v for n, v in sorted(row.items())} for name, row in self.am.loss_table.items()},
            "parameter_report": self.am.parameter_report(), "fit_cached": self.cached,
            "fit_seconds": round(getattr(self, "fit_seconds", 0.0), 3), "targets": self.results,
        }


# ------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, dataset, tasks, *, device="cpu", batch_size: int = 16) -> dict:
    """Test metrics of ``model`` for ``tasks`` (§6.1): output name -> metric dict (:mod:`pyamalgam.metrics`).

    ``model(images)`` may return one tensor (a single-task teacher: ``tasks`` has one entry) or
    a dict output name -> prediction (a TargetNet).
    """
    model.eval()
    metrics = {"seg": SegmentationMetric(dataset.num_classes, dataset.ignore_index), "depth": DepthMetric(),
               "normal": NormalMetric(median_bins=180_000)}
    metrics = {t: metrics[t] for t in tasks}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        out = model(batch["image"].to(device))
        if not isinstance(out, dict):
            out = {tasks[0]: out}
        for t, m in metrics.items():
            pred = out[t].float()
            if t == "seg":
                m.update(pred, batch["seg"].to(device))
            else:
                m.update(pred, batch[t].to(device), batch["mask"].to(device))
    return {t: {k: float(v) for k, v in m.compute().items()} for t, m in metrics.items()}


@torch.no_grad()
def _predict_samples(pairs: dict, dataset, n: int, device) -> dict:
    """The first ``n`` test images, their ground truth, and per task the teacher's and the
    student's predictions (``pairs``: task -> ((name, net), (name, net))), on the CPU, for Figs. 5-6."""
    n = min(n, len(dataset))
    batch = {k: torch.stack([dataset[i][k] for i in range(n)]) for k in ("image", "seg", "depth", "normal", "mask")}
    images = batch["image"].to(device)
    predictions = {}
    for task, roles in pairs.items():
        predictions[task] = {}
        for role, (name, net) in zip(("teacher", "student"), roles):
            out = net.eval()(images)
            out = out[task] if isinstance(out, dict) else out
            predictions[task][role] = (name, (out.argmax(1) if task == "seg" else out).float().cpu())
    depth = batch["depth"][batch["mask"] & (batch["depth"] > 0)]
    return {"inputs": batch, "predictions": predictions, "class_names": list(dataset.class_names),
            "ignore_index": dataset.ignore_index,
            "depth_range": (0.0, float(depth.max()) if depth.numel() else float(dataset.max_depth))}


# --------------------------------------------------------------------------------- pipeline

NAMES = {"seg": "SegNet", "depth": "DepthNet", "normal": "NormNet"}


class _Clock:
    """Per-stage wall times (and whether the stage came from the cache) for results.json."""

    def __init__(self, progress: bool):
        self.progress, self.timings, self.t = progress, {}, time.perf_counter()

    def mark(self, name: str, cached: bool = False) -> None:
        now = time.perf_counter()
        self.timings[name] = {"seconds": round(now - self.t, 3), "cached": bool(cached)}
        _log(f"[demo] {name}: {now - self.t:.1f}s{' (cached)' if cached else ''}", self.progress)
        self.t = now


def _stage_teachers(tasks, cfg, train, data_key, out, device, seed, clock):
    teachers, keys = {}, {}
    for task in tasks:
        teachers[task], keys[task], cached = _stage_teacher(task, cfg, train, data_key, out, device, seed, clock.progress)
        clock.mark(f"teacher {task}", cached)
    return teachers, keys


def _stage_targetnet2(teachers, keys, cfg, unlabelled, out, device, seed, clock):
    """One block-wise fit (Eq. 6), then the Eq. 7 TargetNet and Decoder_b1..b5 (Table 1)."""
    tn2 = _Amalgamation("tn2", {t: teachers[t] for t in ("seg", "depth")}, {"seg": ["seg"], "depth": ["depth"]},
                        cfg, unlabelled, [keys["seg"], keys["depth"], keys["unlabelled"]], out, device, seed, clock.progress)
    tn2.fit()
    clock.mark("TargetNet-2 block-wise fit (Eq. 6)", tn2.cached)
    target2, points2 = tn2.target("eq7")
    variants = {}
    for b, block in enumerate(decoder_candidates(tn2.am.num_blocks), start=1):
        forced = {"seg": block, "depth": block}
        if not cfg.finetune_variants:  # Steps 2-3 only: every variant from the same fit, none fine-tuned
            variants[b] = (tn2.assembled(f"decoder_b{b}", forced), forced, "step2")
        elif forced == points2:  # the Eq. 7 TargetNet is this variant: same net, same budget
            variants[b] = (target2, forced, "eq7")
            tn2.results[f"decoder_b{b}"] = dict(tn2.results["eq7"], same_as="eq7")
        else:
            variants[b] = (tn2.target(f"decoder_b{b}", forced)[0], forced, f"decoder_b{b}")
    clock.mark("TargetNet-2 branch-out + fine-tune (Eq. 7, Decoder_b1..b5)",
               all(r.get("cached") for r in tn2.results.values()))
    return tn2, target2, variants


def _stage_targetnet3(teachers, keys, tn2, target2, cfg, unlabelled, out, device, seed, clock) -> dict:
    """TargetNet-3 offline (Eq. 8: the three teachers) and online (Eq. 9: TargetNet-2 + NormNet)."""
    tasks = tuple(teachers)
    off = _Amalgamation("tn3_offline", dict(teachers), {t: [t] for t in tasks}, cfg, unlabelled,
                        [*(keys[t] for t in tasks), keys["unlabelled"]], out, device, seed, clock.progress)
    off.fit()
    net_off = off.target("eq7")[0]
    clock.mark("TargetNet-3 offline (Eq. 8)", off.cached and off.results["eq7"]["cached"])
    # a copy: the online amalgamation freezes its teachers, and target2 is still evaluated
    upstream = [tn2.key, tn2.results["eq7"]["points"], cfg.finetune_steps, keys["normal"]]
    on = _Amalgamation("tn3_online", {"tn2": copy.deepcopy(target2), "normal": teachers["normal"]},
                       {"tn2": ["seg", "depth"], "normal": ["normal"]}, cfg, unlabelled, upstream, out, device, seed,
                       clock.progress)
    on.fit()
    net_on = on.target("eq7")[0]
    clock.mark("TargetNet-3 online (Eq. 9)", on.cached and on.results["eq7"]["cached"])
    return {"tn3_offline": (off, net_off), "tn3_online": (on, net_on)}


def _evaluate_all(teachers, tn2, target2, variants, tn3, test, cfg, device) -> dict:
    """Test metrics of every network: the entries of Table 1 and Table 2."""
    def ev(net, tasks):
        return evaluate(net, test, tasks, device=device, batch_size=cfg.eval_batch)

    out = {"teachers": {}, "targets": {}}
    for task, net in teachers.items():
        record = net.train_record
        out["teachers"][task] = {"name": NAMES[task], "params": count_parameters(net), "metrics": ev(net, (task,))[task],
                                 "train_loss_first": record.get("loss_first"), "train_loss_final": record.get("loss_final"),
                                 "train_seconds": record.get("seconds")}
    eq7 = {"label": "TargetNet (Eq. 7)", "points": tn2.results["eq7"]["points"], "params": count_parameters(target2),
           "metrics": ev(target2, ("seg", "depth"))}
    out["targets"]["tn2_eq7"] = eq7
    for b, (net, forced, source) in variants.items():
        metrics = eq7["metrics"] if source == "eq7" else ev(net, ("seg", "depth"))
        label = f"Decoder_b{b}" + (" (Steps 2-3)" if source == "step2" else "")
        out["targets"][f"tn2_decoder_b{b}"] = {"label": label, "points": forced, "source": source,
                                               "finetuned": source != "step2", "params": count_parameters(net),
                                               "metrics": metrics}
    for name, (am, net) in tn3.items():
        out["targets"][name] = {"label": name, "points": am.results["eq7"]["points"], "params": count_parameters(net),
                                "metrics": ev(net, tuple(teachers))}
    out["amalgamations"] = {am.name: am.summary() for am in [tn2, *(am for am, _ in tn3.values())]}
    return out


def run_demo(out="runs/demo", *, device=None, quick: bool = False, seed: int = 0, progress: bool = True,
             config: Optional[DemoConfig] = None, threads: Optional[int] = None, data: Optional[str] = None,
             echo: bool = True) -> dict:
    """Run (or resume) the whole experiment in ``out``; returns the results written there.

    Args:
        out: the run directory (caches, tables, figures).
        device: "cpu", "cuda", "cuda:1"... (default: cuda if available).
        quick: the CI-sized preset (tiny images and network; every stage still runs).
        seed: seeds the data, the teachers and the amalgamation.
        progress: tqdm bars and stage lines on stderr.
        config: a :class:`DemoConfig` instead of the preset.
        threads: torch CPU threads (default: torch's choice).
        data: "synthetic" (default) or a real data set spec (``nyuv2:/path``); see docs/demo.md.
        echo: print the tables to stdout.
    """
    from . import report

    t_start = time.perf_counter()
    device = _default_device(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    cfg = config if config is not None else demo_config(quick, device)
    cfg = (dataclasses.replace(cfg, data=data) if data is not None else cfg).validate()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps({"config": cfg.to_json(), "device": str(device), "seed": seed,
                                                  "quick": quick}, indent=1) + "\n")
    _log(f"[demo] run dir {out} | device {device} | {cfg.resolution[0]}x{cfg.resolution[1]} images, width "
         f"{cfg.width:g}, {'quick' if quick else 'full'} preset", progress)
    clock = _Clock(progress)

    data_cached = all((out / "data" / f"{s}.safetensors").is_file() for s in ("train", "unlabelled", "test"))
    splits, data_keys = _stage_data(cfg, out, seed, progress)
    clock.mark("data", cached=data_cached)
    tasks = tuple(t for t in TASKS if t in splits["test"].tasks)
    if tasks[:2] != ("seg", "depth"):
        raise ValueError(f"the demo needs segmentation and depth ground truth; {cfg.data} has {tasks}")
    teachers, keys = _stage_teachers(tasks, cfg, splits["train"], data_keys["train"], out, device, seed, clock)
    keys["unlabelled"] = data_keys["unlabelled"]  # what the students learn from
    tn2, target2, variants = _stage_targetnet2(teachers, keys, cfg, splits["unlabelled"], out, device, seed, clock)
    tn3 = {}
    if "normal" in tasks:
        tn3 = _stage_targetnet3(teachers, keys, tn2, target2, cfg, splits["unlabelled"], out, device, seed, clock)

    results = {"config": cfg.to_json(), "device": str(device), "seed": seed, "quick": quick,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "data": {split: len(ds) for split, ds in splits.items()}, "num_blocks": tn2.am.num_blocks,
               **_evaluate_all(teachers, tn2, target2, variants, tn3, splits["test"], cfg, device)}
    clock.mark("evaluation")
    pairs = {t: ((NAMES[t], teachers[t]), ("TargetNet-2", target2)) for t in ("seg", "depth")}
    if tn3:
        pairs["normal"] = ((NAMES["normal"], teachers["normal"]), ("TargetNet-3", tn3["tn3_offline"][1]))
    samples = _predict_samples(pairs, splits["test"], cfg.figure_samples, device)
    clock.mark("predictions for figures")
    results["timings"] = clock.timings
    results["total_seconds"] = round(time.perf_counter() - t_start, 3)
    written = report.write_report(out, results, samples, echo=echo)
    results["files"] = {k: str(v) for k, v in written.items()}
    _log(f"[demo] done in {time.perf_counter() - t_start:.1f}s; tables and figures in {out}", progress)
    return results

"""The demo's cached stages: rendered data, trained teachers, block-wise fits and fine-tunes.

Each stage's file carries a key (a hash of everything it depends on, upstream stages included);
:func:`cached_stage` returns it only when the key matches and the file reads, so a stale, torn or
foreign file makes the stage run again instead of failing the run. Every corrupt cache file is
treated the same way: a ``[demo] warning:`` line on stderr names it, and the stage runs again
(a stale one, written for other settings, is rebuilt silently); docs/robustness.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .._io import atomic_write
from ..amalgamation import Amalgamator
from ..amalgamation.branch import decoder_candidates
from ..amalgamation.checkpoints import CHECKPOINT_NAME
from ..engine import CorruptFileError, check_tensors, load_checkpoint, save_checkpoint
from ..engine.schema import read_json
from ..models import count_parameters
from ..teachers import (
    load_teacher,
    open_dataset,
    save_teacher,
    teacher_paths,
    train_teacher,
)
from .config import CACHE_VERSION, SEED_OFFSETS, DemoConfig

__all__ = ["InMemoryScenes", "cached_stage"]

#: What reading a cache file may raise when it is torn, foreign or of an older layout.
_UNREADABLE = (OSError, ValueError, KeyError, SafetensorError)


def cached_stage(path: Path, key: str) -> tuple | None:
    """(tensors, meta) of the stage file at ``path`` if it was written for ``key``, else None
    (missing, written for other settings, or unreadable: the stage then runs again)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = load_checkpoint(path)
    except _UNREADABLE as e:
        _warn(f"{path} is unreadable ({e}); its stage runs again")
        return None
    return (tensors, meta) if meta.get("key") == key else None


def _key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} if it is missing, or (with a warning) unreadable."""
    if not path.is_file():
        return {}
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        doc = e
    if not isinstance(doc, dict):
        _warn(f"{path} is unreadable ({doc if isinstance(doc, Exception) else 'not a JSON object'}); its stage "
              f"runs again")
        return {}
    return doc


def _warn(msg: str) -> None:
    """A corrupt cache file: always said (also under --no-progress), once, on stderr."""
    tqdm.write(f"[demo] warning: {msg}", file=sys.stderr)


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
    hit = cached_stage(path, key)
    if hit is not None:
        try:
            data = InMemoryScenes(hit[0], **hit[1]["attrs"])
            if len(data) == len(ds):
                return data
            _warn(f"{path} holds {len(data)} images, not {len(ds)}; rendering again")
        except (KeyError, TypeError, ValueError) as e:  # a matching key with a layout that does not fit
            _warn(f"{path} does not hold a rendered split ({e!r}); rendering again")
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
    """Train (or load the cached) teacher for ``task``: (net, TeacherRecord, key, cached)."""
    path = out / "teachers" / f"{task}.safetensors"
    key = _key("teacher", task, data_key, cfg.width, cfg.depth, cfg.num_bins, cfg.teacher_steps, cfg.teacher_lr,
               cfg.batch_size, cfg.channels_last, seed)
    weights, meta_path = teacher_paths(path)
    if weights.is_file() and _read_json(meta_path).get("demo_key") == key:
        try:
            net, record = load_teacher(path, device=device)
            return net, record, key, True
        except _UNREADABLE as e:  # torn weights: train again
            _warn(f"the cached teacher {path} is unreadable ({e}); training it again")
    net, record = train_teacher(
        task, train, steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.teacher_lr, width=cfg.width,
        depth=cfg.depth, num_bins=cfg.num_bins, channels_last=cfg.channels_last, device=device,
        seed=seed + SEED_OFFSETS[f"teacher/{task}"], num_workers=cfg.num_workers, progress=progress,
        data_name=f"{cfg.data} train ({len(train)} images, {cfg.resolution[0]}x{cfg.resolution[1]})")
    record = dataclasses.replace(record, extra={**record.extra, "demo_key": key})
    save_teacher(net, path, record)
    return net, record, key, False


def _loader(dataset, cfg, seed):
    """Shuffled batches of images only: the students never see a label (§5)."""
    return DataLoader(_ImagesOnly(dataset), batch_size=min(cfg.batch_size, len(dataset)), shuffle=True,
                      drop_last=True, generator=torch.Generator().manual_seed(seed), num_workers=cfg.num_workers)


class _Amalgamation:
    """One Amalgamator and its cache directory: a block-wise fit shared by several TargetNets."""

    def __init__(self, name, teachers, outputs, cfg, unlabelled, upstream_key, out: Path, device, seed, progress,
                 terms=None, weights=None):
        self.name, self.cfg, self.terms = name, cfg, terms  # terms: the Amalgamator's structured terms (issue 12)
        self.weights = dict(weights or {})  # lambda per output name (Eq. 6 / 8 / 9), cfg.task_weights
        self.seed, self.finetune_seed = seed + SEED_OFFSETS["fit"], seed + SEED_OFFSETS["finetune"]
        self.outputs = outputs  # teacher key -> output names (for the report)
        self.dir = out / "stages" / name
        self.unlabelled = unlabelled
        self.key = _key("fit", name, upstream_key, cfg.block_steps, cfg.amalgam_lr, cfg.amalgam_optimizer,
                        cfg.batch_size, cfg.probe_images, cfg.channels_last, seed, *([terms] if terms else []),
                        *([sorted(self.weights.items())] if self.weights else []))
        self.key_file = self.dir / "key.json"
        state = _read_json(self.key_file)
        stale = state.get("key") != self.key
        if stale and self.dir.exists():
            shutil.rmtree(self.dir)  # our own cache of another setup
        if stale:
            atomic_write(self.key_file, json.dumps({"key": self.key, "stage": name, "fit_done": False}) + "\n")
        self.cached = not stale and bool(state.get("fit_done"))
        self.teachers, self.device, self.progress = teachers, device, progress
        self.am = self._new_amalgamator()
        self.results: dict = {}
        self._warm = False

    def _new_amalgamator(self) -> Amalgamator:
        cfg = self.cfg
        torch.manual_seed(self.seed)  # the channel codings' initialisation is this stage's first draw
        return Amalgamator(self.teachers, lr=cfg.amalgam_lr, optimizer=cfg.amalgam_optimizer, device=self.device,
                           channels_last=cfg.channels_last, checkpoint_dir=self.dir, progress=self.progress,
                           cache_targets=cfg.target_cache_mb * 2**20, terms=self.terms,
                           weights=self.weights or None)

    def _warm_cache(self) -> None:
        """Teacher targets of every unlabelled image, once (unshuffled: no random draw)."""
        if not self._warm:
            self.am.precompute_targets(DataLoader(_ImagesOnly(self.unlabelled), batch_size=self.cfg.eval_batch))
            self._warm = True

    def fit(self) -> None:
        """The block-wise fit, resumed from the stage's checkpoint; a corrupt checkpoint is
        rebuilt: a fresh Amalgamator fits from scratch, as a first run would."""
        try:
            self._fit()
        except CorruptFileError as e:
            checkpoint = self.dir / CHECKPOINT_NAME
            if Path(e.path).resolve() != checkpoint.resolve():
                raise
            _warn(f"{e}; the block-wise fit of {self.name} runs again")
            checkpoint.unlink(missing_ok=True)
            self.cached, self._warm = False, False
            self.am = self._new_amalgamator()
            self._fit()

    def _fit(self) -> None:
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
        hit = cached_stage(path, key)
        if hit is not None:
            try:  # checked before the copy: load_state_dict copies what fits, then raises
                check_tensors(net.state_dict(), hit[0], f"{path}: the fine-tuned TargetNet", path)
                net.load_state_dict(hit[0])
                cached, seconds = True, hit[1].get("seconds", 0.0)
                seconds = seconds if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0.0
                if isinstance(hit[1].get("log"), dict):  # the fine-tune's log record: the log shows it once
                    self.am.engine.log.write(hit[1]["log"])
            except CorruptFileError as e:  # a key collision with another architecture: fine-tune again
                _warn(f"{e}; fine-tuning again")
        if not cached:
            self._warm_cache()
            loader = _loader(self.unlabelled, self.cfg, self.finetune_seed)
            torch.manual_seed(self.finetune_seed)
            t0 = time.perf_counter()
            net = self.am.finetune(loader, math.ceil(self.cfg.finetune_steps / len(loader)), max_steps=self.cfg.finetune_steps)
            seconds = time.perf_counter() - t0
            save_checkpoint(path, net.state_dict(), {"key": key, "points": chosen, "seconds": round(seconds, 3),
                                                     "log": self.am.history[-1]})
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

    def save_model(self, net, variant: str, path: Path) -> str:
        """Write the TargetNet ``net`` of ``variant`` as one model file (``pyamalgam.load``,
        ``pyamalgam predict``), atomically; the same bytes for the same weights, cached or not.
        Returns the path relative to the run folder (``models/<name>.safetensors``)."""
        extra = {"stage": self.name, "variant": variant, "branch_points": self.results[variant]["points"],
                 "teachers": sorted(self.am.teachers)}
        if self.terms:
            extra["terms"] = sorted(self.terms)
        net.save(path, resolution=tuple(self.cfg.resolution), extra=extra)
        return f"{path.parent.name}/{path.name}"

    def summary(self) -> dict:
        return {
            "teachers": sorted(self.am.teachers), "outputs": self.outputs, "num_blocks": self.am.num_blocks,
            "candidates": list(decoder_candidates(self.am.num_blocks)),
            "loss_table": {name: {str(n): v for n, v in sorted(row.items())} for name, row in self.am.loss_table.items()},
            "parameter_report": self.am.parameter_report(), "fit_cached": self.cached,
            "fit_seconds": round(getattr(self, "fit_seconds", 0.0), 3), "targets": self.results,
        }

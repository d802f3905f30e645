"""The Amalgamator: Steps 1-4 of paper 001, §5.1, and the multi-teacher schemes of §5.2.

Usage::

    am = Amalgamator(teachers={"seg": segnet, "depth": depthnet}, checkpoint_dir="runs/ka")
    am.fit(loader, epochs_per_block=2)      # Step 2, block by block (Eq. 6)
    am.branch_out()                          # Step 3 (Eq. 7), or points={"seg": 10, "depth": 9}
    target = am.finetune(loader, epochs=2)   # Step 4
    target(images)                           # {"seg": logits, "depth": metres}

Only images are read from the loader (a batch dict's ``"image"``, the first element of a tuple,
or a tensor): the teachers' own predictions are the supervision.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from ..losses import get_task
from ..models.protocol import BlockNet, block_shapes, check_input, count_parameters
from ..nn import ChannelCoding
from .blockwise import BlockStep, feature_losses, frozen_pass, prediction_losses, weighted_sum
from .branch import as_outputs, assemble_target_net, select_branch_points
from .cache import TargetCache
from .checkpoint import load_checkpoint, pack_state, save_checkpoint, unpack_state

__all__ = ["Amalgamator", "PolyLR"]

CHECKPOINT_NAME = "last.safetensors"
LOG_NAME = "amalgamation.jsonl"
_OBJECTIVES = {"prediction": "prediction", "eq6": "prediction", "feature": "feature", "eq5": "feature"}


class PolyLR(LRScheduler):
    """The poly policy of §6.1: ``lr = base_lr * (1 - step / total_steps) ** power``."""

    def __init__(self, optimizer, total_steps: int, power: float = 0.9, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        factor = (1.0 - min(self.last_epoch, self.total_steps) / self.total_steps) ** self.power
        return [base * factor for base in self.base_lrs]


class Amalgamator:
    """Amalgamates K frozen single-task teachers into one multi-task TargetNet, without labels.

    Args:
        teachers: name -> teacher in the block protocol (:class:`pyamalgam.models.BlockNet`, or a
            trained :class:`TargetNet` for the online scheme of Eq. 9). All must have the same
            number of blocks and the same block feature shapes. They are put in eval mode and
            their parameters get ``requires_grad=False``.
        tasks: name -> task ("segmentation", "depth", "normals", a Task or a loss callable) for
            teachers that do not declare ``.task`` themselves (or to override it).
        weights: lambda per output name (Eq. 6 / 8) or per teacher name (Eq. 9's weight of a
            multi-output teacher); default 1.
        objective: "prediction" (Eq. 6, default) or "feature" (Eq. 5).
        init: Step 1, the student's initial weights: "teacher" (a copy of the first teacher,
            standing in for the paper's ImageNet initialisation; for Eq. 9 pass TargetNet-2
            first, and its trunk is copied), a teacher name, or "random".
        reduction: channel-coding squeeze ratio C / R.
        coding_gate: initial gate of every channel coding (:class:`pyamalgam.nn.ChannelCoding`):
            0.95 starts each projection near the identity, so block n first passes the student's
            features on almost unchanged (our choice; the paper is silent); None: ``nn.Linear``
            initialisation (gates about 0.5).
        lr, weight_decay, power: SGD with the poly LR of §6.1 (its defaults: 0.005, 4e-6, 0.9).
        momentum: SGD momentum; 0.9 is our choice (§6.1 does not give one).
        optimizer: "sgd" (§6.1) or "adam" (our option for students trained in few steps from
            teachers that were not ImageNet-initialised; ``momentum`` is then unused).
        device: where to train (default: the teachers' device).
        amp: bf16 autocast for the networks (losses stay float32).
        channels_last: channels_last memory format for networks and images.
        checkpoint_dir: where ``last.safetensors`` is kept (None: no checkpoints).
        checkpoint_every: also checkpoint every this many steps inside a block / fine-tune.
        log_dir: where the per-block JSON-lines log goes (default: ``checkpoint_dir``).
        progress: show tqdm progress bars (rank 0 only).
        probe_size: (H, W) of the probe image validating the teachers (default: 2x divisor).
        cache_targets: bytes of teacher targets to keep per image (0: off). The teachers are
            frozen, so an image's targets are the same at every block and epoch: with a cache
            each teacher predicts each image once per run instead of once per step. Worth it
            when the loader yields the same images again (no random augmentation).
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        *,
        tasks: Optional[Mapping[str, Any]] = None,
        weights: Optional[Mapping[str, float]] = None,
        objective: str = "prediction",
        init: str = "teacher",
        reduction: int = 4,
        coding_gate: Optional[float] = 0.95,
        lr: float = 0.005,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        weight_decay: float = 4e-6,
        power: float = 0.9,
        device=None,
        amp: bool = False,
        channels_last: bool = False,
        checkpoint_dir=None,
        checkpoint_every: Optional[int] = None,
        log_dir=None,
        progress: bool = True,
        probe_size: Optional[tuple] = None,
        cache_targets: int = 0,
    ):
        self.teachers = _check_teachers(teachers)
        self.objective = _choice("objective", objective, _OBJECTIVES)
        _check_hparams(lr=lr, momentum=momentum, weight_decay=weight_decay, power=power, reduction=reduction)
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
        if coding_gate is not None and (isinstance(coding_gate, bool) or not isinstance(coding_gate, (int, float))
                                        or not 0 < coding_gate < 1):
            raise ValueError(f"coding_gate must be a number in (0, 1) or None, got {coding_gate!r}")
        if isinstance(cache_targets, bool) or not isinstance(cache_targets, int) or cache_targets < 0:
            raise ValueError(f"cache_targets must be a number of bytes >= 0, got {cache_targets!r}")
        self.lr, self.momentum, self.weight_decay, self.power = lr, momentum, weight_decay, power
        self.optimizer = _choice("optimizer", optimizer, {"sgd": "sgd", "adam": "adam"})
        self.amp, self.channels_last, self.progress = bool(amp), bool(channels_last), bool(progress)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.log_dir = Path(log_dir) if log_dir is not None else self.checkpoint_dir
        self.rank, self.world_size = _init_distributed()
        self.device = torch.device(device) if device is not None else _module_device(next(iter(self.teachers.values())))

        self._outputs = _resolve_outputs(self.teachers, tasks)
        self._weights, self._teacher_weights = _resolve_weights(self.teachers, self._outputs, weights)
        self.student = _make_student(self.teachers, init)
        self.num_blocks = self.student.num_blocks
        self._shapes = _validate_blocks(self.teachers, self.student, probe_size)
        self.codings = nn.ModuleDict({
            str(n): nn.ModuleDict({key: ChannelCoding(self._shapes[n - 1][0], reduction, gate=coding_gate)
                                   for key in self.teachers})
            for n in range(1, self.num_blocks + 1)
        })
        self._place()

        self.loss_table: dict = {name: {} for out in self._outputs.values() for name in out}
        self.feature_table: dict = {key: {} for key in self.teachers} if self.objective == "feature" else {}
        self.completed_blocks: set = set()
        self.history: list = []
        self.branch_points: Optional[dict] = None
        self.target_net = None
        self._tb = None
        self.target_cache = TargetCache(cache_targets) if cache_targets else None

    # ------------------------------------------------------------------ public API

    def fit(self, loader, epochs_per_block: int = 2, *, max_steps_per_block: Optional[int] = None, resume=None,
            final_loss_images: int = 64, final_loss_loader=None) -> dict:
        """Step 2: train blocks 1..N of the student and their codings, one block at a time.

        The objective is Eq. 6 (Eq. 8 with K teachers, Eq. 9 with a TargetNet among them), or
        Eq. 5 with ``objective="feature"``. Block n trains for ``epochs_per_block`` passes over
        ``loader`` (§6.1: 2 epochs per block) or ``max_steps_per_block`` steps, with blocks
        1..n-1 and the teachers frozen. ``resume`` (True: the checkpoint in ``checkpoint_dir`` if
        there is one; or a path) continues an interrupted run without redoing finished blocks.

        The final loss L_t^n of Eq. 7 is measured once block n has finished training: in eval
        mode, on one fixed set of unlabelled images that is the same for every block,
        ``final_loss_images`` images of ``loader.dataset`` at evenly spaced indices (or every
        batch of ``final_loss_loader``). Returns the loss table: output name -> block -> L_t^n.
        """
        total = self._plan(loader, epochs_per_block, max_steps_per_block, "epochs_per_block")
        probe = _fixed_batches(loader, final_loss_images, final_loss_loader)
        pending = self._resume(resume, phases=("blocks", "finetune", "done"))
        for n in range(1, self.num_blocks + 1):
            if n not in self.completed_blocks:
                at = pending if pending is not None and pending.block == n else None
                self._train_block(n, loader, total, at, probe)
        return self.loss_table

    def branch_out(self, points: Optional[Mapping[str, int]] = None, *, candidates=None) -> dict:
        """Steps 3-4: choose branch points (Eq. 7) and assemble :attr:`target_net`.

        ``points`` forces the branch block of some or all teachers (e.g. every teacher at decoder
        block b for the paper's Decoder_bb variants); the others take ``argmin_n L^n`` over
        ``candidates`` (default: the decoder, N/2 < n <= N). Returns teacher name -> block.
        """
        points = dict(points or {})
        for key, p in points.items():
            if key not in self.teachers:
                raise ValueError(f"points: unknown teacher {key!r}; teachers are {sorted(self.teachers)}")
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= self.num_blocks:
                raise ValueError(f"points[{key!r}] must be a block in [1, {self.num_blocks}], got {p!r}")
        free = [key for key in self.teachers if key not in points]
        if free:
            table = {key: v for key, v in self._teacher_losses().items() if key in free}
            points.update(select_branch_points(table, self.num_blocks, candidates))
        self.branch_points = {key: points[key] for key in self.teachers}
        self._assemble()
        self._log({"event": "branch_out", "points": self.branch_points, "parameters": self.parameter_report()})
        return dict(self.branch_points)

    def finetune(self, loader, epochs: int = 1, *, max_steps: Optional[int] = None, resume=None):
        """Step 4: fine-tune the whole TargetNet against the teachers' predictions (Eq. 6 losses).

        Call :meth:`branch_out` first, or pass ``resume`` with a checkpoint written during
        fine-tuning (its branch points are then reused). Returns :attr:`target_net`.
        """
        total = self._plan(loader, epochs, max_steps, "epochs")
        pending = self._resume(resume, phases=("finetune", "done"))
        if self.target_net is None:
            raise RuntimeError("finetune() needs a TargetNet: call branch_out() first")
        if pending is None or pending.phase != "done":
            self._train_finetune(loader, total, pending)
        return self.target_net

    @torch.no_grad()
    def precompute_targets(self, loader) -> int:
        """Fill the teacher-target cache with one pass over ``loader`` (needs ``cache_targets``).

        Every later block step and fine-tune step on these images then skips the teachers' full
        forward passes. Pass an unshuffled loader over the training images, so that this pass
        draws no random number and leaves the training loader's generator alone. Returns the
        number of images cached.
        """
        if self.target_cache is None:
            raise RuntimeError("precompute_targets() needs a target cache: Amalgamator(..., cache_targets=BYTES)")
        for batch in tqdm(loader, desc="teacher targets", disable=not self.progress or self.rank != 0, leave=False):
            with self._autocast():
                self._teacher_targets(self._images(batch))
        return len(self.target_cache)

    def parameter_report(self) -> dict:
        """Parameter counts: each teacher, their sum, the TargetNet (once assembled), the codings."""
        teachers = {key: count_parameters(t) for key, t in self.teachers.items()}
        report = {"teachers": teachers, "teachers_total": sum(teachers.values()),
                  "student": count_parameters(self.student), "codings": count_parameters(self.codings)}
        if self.target_net is not None:
            report["target_net"] = count_parameters(self.target_net)
        return report

    # ------------------------------------------------------------------ the two training phases

    def _train_block(self, n: int, loader, total: int, pending, probe) -> None:
        step_module = BlockStep(self.student.blocks[str(n)], self.codings[str(n)])
        self.student.requires_grad_(False).eval()
        self.codings.requires_grad_(False)
        step_module.requires_grad_(True).train()

        def step(trainable, x):
            return self._block_loss(n, trainable, x, eq7=False)

        train, seconds, images = self._train_loop("blocks", n, step_module, step, loader, total, pending)
        final = self._final_losses(n, step_module, probe)
        for name, value in final.items():
            table, key = (self.feature_table, name[8:]) if name.startswith("feature/") else (self.loss_table, name)
            table.setdefault(key, {})[n] = value
        self.completed_blocks.add(n)
        self._log({"event": "block", "block": n, "objective": self.objective, "losses": final, "train_losses": train,
                   "steps": total, "seconds": round(seconds, 3), "images_per_s": round(images / max(seconds, 1e-9), 2)})
        self._save("blocks", n)

    @torch.no_grad()
    def _final_losses(self, n, step_module, probe) -> dict:
        """L_t^n of Eq. 7: the trained block n in eval mode on the fixed probe images.

        The mean over images of every term (task losses, and Eq. 5's feature terms with that
        objective), so that blocks are compared where they ended, on the same images.
        """
        step_module.eval()
        sums: dict = {}
        count = 0
        for x in probe:
            x = self._images(x)
            _, terms = self._block_loss(n, step_module, x, eq7=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double() * x.shape[0]
            count += x.shape[0]
        step_module.train()
        if not count:
            raise RuntimeError("no probe image to measure the final block losses (Eq. 7) on: the loader yielded none")
        return {k: float(v) / count for k, v in sums.items()}

    def _block_loss(self, n, trainable, x, eq7: bool):
        """(loss to minimise, terms) of one block-n batch; ``eq7`` also scores the task losses
        under Eq. 5 (Eq. 7 compares task losses whatever the objective)."""
        feature = self.objective == "feature"
        need_targets = not feature or eq7
        keys, cached = self._cache_lookup(x) if need_targets else (None, None)
        with torch.no_grad(), self._autocast():
            frozen = frozen_pass(self.student, self.teachers, self._outputs, x, n, targets=need_targets and cached is None,
                                 features=feature)
        if cached is not None:
            frozen.targets = cached
        elif keys is not None:
            self.target_cache.put(keys, frozen.targets)
        with self._autocast():
            projected, side = trainable(frozen.prev, frozen.side)
            if not feature:  # Eq. 6 / 8 / 9
                terms = prediction_losses(self.teachers, self._outputs, projected, n, side, frozen.targets)
                return weighted_sum(terms, self._weights), terms
            terms = feature_losses(projected, frozen.features)  # Eq. 5
            loss = weighted_sum(terms, self._teacher_weights)
        terms = {f"feature/{k}": v for k, v in terms.items()}
        if eq7:
            with torch.no_grad(), self._autocast():
                detached = {k: v.detach() for k, v in projected.items()}
                terms.update(prediction_losses(self.teachers, self._outputs, detached, n, side, frozen.targets))
        return loss, terms

    def _cache_lookup(self, x):
        """(keys, targets) of the batch from the target cache; (None, None) without a cache."""
        if self.target_cache is None:
            return None, None
        keys = self.target_cache.keys(x)
        return keys, self.target_cache.get(keys, x.device)

    def _train_finetune(self, loader, total, pending) -> None:
        target = self.target_net.requires_grad_(True).train()

        def step(trainable, x):
            with torch.no_grad(), self._autocast():
                targets = self._teacher_targets(x)
            with self._autocast():
                predictions = trainable(x)
            terms = {name: task.loss(predictions[name], targets[name])
                     for out in self._outputs.values() for name, task in out.items()}
            return weighted_sum(terms, self._weights), terms

        rec, seconds, images = self._train_loop("finetune", self.num_blocks + 1, target, step, loader, total, pending)
        self._log({"event": "finetune", "losses": rec, "steps": total, "seconds": round(seconds, 3),
                   "images_per_s": round(images / max(seconds, 1e-9), 2)})
        self._save("done", self.num_blocks + 1)

    def _teacher_targets(self, x) -> dict:
        keys, targets = self._cache_lookup(x)
        if targets is not None:
            return targets
        targets = {}
        for key, teacher in self.teachers.items():
            for name, p in as_outputs(key, teacher(x)).items():
                targets[name] = self._outputs[key][name].target(p)
        if keys is not None:
            self.target_cache.put(keys, targets)
        return targets

    def _train_loop(self, phase, n, module, step_loss, loader, total, pending):
        """SGD (or Adam) + poly LR over ``total`` steps; checkpoints; mean of each term over the
        last epoch's steps (or all steps when there are fewer), for the log only."""
        trainable = self._wrap_ddp(module)
        params = [p for p in module.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = PolyLR(opt, total, self.power)
        window = min(len(loader), total)
        sums: dict = {}
        start = 0
        if pending is not None and pending.step is not None:
            opt.load_state_dict(pending.optimizer)
            sched.load_state_dict(pending.scheduler)
            sums = {k: v.to(self.device) for k, v in pending.sums.items()}
            start = pending.step
        desc = f"block {n}/{self.num_blocks}" if phase == "blocks" else "finetune"
        bar = tqdm(total=total, initial=start, desc=desc, disable=not self.progress or self.rank != 0, leave=False)
        t0, images = time.perf_counter(), 0
        for step, batch, epoch_rng in self._batches(loader, n, start, total, pending):
            x = self._images(batch)
            recording = step >= total - window
            loss, terms = step_loss(trainable, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if recording:
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
            images += x.shape[0]
            done = step + 1
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < total:
                self._save(phase, n, step=done, total=total, opt=opt, sched=sched, epoch_rng=epoch_rng,
                           sums=self._all_reduce_mean(sums))
            bar.update(1)
            if done % 10 == 0 and (not bar.disable or self._tensorboard() is not None):
                self._report_step(bar, phase, n, done, loss)  # .item() syncs: not every step
        bar.close()
        opt.zero_grad(set_to_none=True)  # the gradients are spent; don't keep their memory
        self._sync_buffers(module)
        sums = self._all_reduce_mean(sums)
        return {k: float(v) / window for k, v in sums.items()}, time.perf_counter() - t0, images

    # ------------------------------------------------------------------ data, RNG and resume

    def _batches(self, loader, n, start, total, pending):
        """Yield (step, batch, RNG state at the start of the epoch) from step ``start`` on.

        Resuming mid-epoch replays the epoch's shuffle: the RNG is rewound to the epoch start
        before the iterator draws its seed, the done batches are skipped, then the RNG of the
        checkpoint is restored. This makes a resumed run match an uninterrupted one.
        """
        per_epoch = len(loader)
        step, epoch, skip = start, start // per_epoch, start % per_epoch
        while step < total:
            if skip:
                _set_rng(pending.epoch_rng, self.device)
            epoch_rng = _get_rng(self.device)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(n * 10_000 + epoch)
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator)
            if skip:
                _set_rng(pending.rng, self.device)
                skip = 0
            yielded = False
            for batch in iterator:
                yielded = True
                yield step, batch, epoch_rng
                step += 1
                if step >= total:
                    return
            if not yielded:  # len(loader) promised batches; never spin on an exhausted loader
                raise RuntimeError(f"loader yielded no batch in epoch {epoch} although len(loader) = {per_epoch}")
            epoch += 1

    def _images(self, batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise KeyError(f"a batch dict must hold 'image' (the only key the Amalgamator reads); got keys {sorted(batch)}")
            x, name = batch["image"], "batch['image']"
        elif isinstance(batch, (tuple, list)):
            x, name = batch[0], "batch[0]"
        else:
            x, name = batch, "batch"
        check_input(x, self.student.in_chans, self.student.size_divisor, name)
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _plan(self, loader, epochs, max_steps, epochs_name) -> int:
        try:
            per_epoch = len(loader)
        except TypeError:
            raise TypeError(f"loader must have a length (a map-style DataLoader), got {type(loader).__name__}") from None
        if isinstance(loader, Iterator):  # one pass only: block 2 (or a resumed epoch) would find it exhausted
            raise TypeError(f"loader must be re-iterable (e.g. a DataLoader), got a one-shot {type(loader).__name__}")
        if per_epoch < 1:
            raise ValueError("loader is empty")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"{epochs_name} must be a positive int, got {epochs!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
        if self.world_size > 1 and not isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
            warnings.warn("distributed run without a DistributedSampler: every rank sees every batch", stacklevel=3)
        total = per_epoch * epochs
        return total if max_steps is None else min(total, max_steps)

    def _checkpoint_path(self) -> Optional[Path]:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    def _save(self, phase, n, *, step=None, total=None, opt=None, sched=None, epoch_rng=None, sums=None) -> None:
        path = self._checkpoint_path()
        if path is None or self.rank != 0:  # one writer; every rank holds the same weights
            return
        tensors: dict = {}
        for prefix, module in (("student", self.student), ("codings", self.codings), ("target", self.target_net)):
            if module is not None:
                tensors.update({f"{prefix}/{k}": v for k, v in module.state_dict().items()})
        meta = {
            "phase": phase, "block": n, "step": step, "total": total,
            "config": self._config(), "completed_blocks": sorted(self.completed_blocks),
            "loss_table": _str_keys(self.loss_table), "feature_table": _str_keys(self.feature_table),
            "history": self.history, "branch_points": self.branch_points,
            "rng": pack_state(_get_rng(self.device), "rng", tensors),
        }
        if step is not None:
            meta.update(
                optimizer=pack_state(opt.state_dict(), "optimizer", tensors),
                scheduler=pack_state(sched.state_dict(), "scheduler", tensors),
                epoch_rng=pack_state(epoch_rng, "epoch_rng", tensors),
                sums=pack_state(sums, "sums", tensors),
            )
        save_checkpoint(path, tensors, meta)

    def _resume(self, resume, phases) -> Optional["_Pending"]:
        path = self._resume_path(resume)
        if path is None:
            return None
        tensors, meta = load_checkpoint(path)
        if meta["config"] != self._config():
            raise ValueError(f"resume: {path} was written by a different setup:\n  checkpoint {meta['config']}\n  now        {self._config()}")
        if meta["phase"] not in phases:
            return None  # e.g. finetune(resume=True) after a checkpoint of the block phase
        self.student.load_state_dict(_prefixed(tensors, "student/"))
        self.codings.load_state_dict(_prefixed(tensors, "codings/"))
        self.completed_blocks = set(meta["completed_blocks"])
        self.loss_table = _int_keys(meta["loss_table"])
        self.feature_table = _int_keys(meta["feature_table"])
        self.history = list(meta["history"])
        if meta["phase"] in ("finetune", "done"):
            self._restore_target(meta["branch_points"], _prefixed(tensors, "target/"))
        pending = _Pending.from_meta(meta, tensors)
        _set_rng(pending.rng, self.device)
        return pending

    def _resume_path(self, resume) -> Optional[Path]:
        if resume is None or resume is False:
            return None
        if resume is True:
            path = self._checkpoint_path()
            if path is None:
                raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint's path)")
            return path if path.is_file() else None  # nothing to resume: a fresh run
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        return path

    def _restore_target(self, points, state) -> None:
        if self.target_net is not None and self.branch_points != points:
            raise ValueError(f"resume: the checkpoint fine-tunes branch points {points}, but branch_out() chose {self.branch_points}")
        if self.target_net is None:
            self.branch_points = dict(points)
            self._assemble()
        self.target_net.load_state_dict(state)

    def _assemble(self) -> None:
        self.target_net = assemble_target_net(self.student, self.codings, self.teachers, self.branch_points,
                                              self._outputs, self._weights).to(self.device)
        if self.channels_last:
            self.target_net.to(memory_format=torch.channels_last)

    def _config(self) -> dict:
        return {"teachers": sorted(self.teachers), "outputs": sorted(self.loss_table), "num_blocks": self.num_blocks,
                "objective": self.objective, "optimizer": self.optimizer}

    # ------------------------------------------------------------------ plumbing

    def _place(self) -> None:
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        for t in self.teachers.values():
            t.to(self.device, memory_format=fmt)
        self.student.to(self.device, memory_format=fmt)
        self.codings.to(self.device)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _wrap_ddp(self, module):
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _sync_buffers(self, module) -> None:
        """Give every rank rank 0's BatchNorm statistics (what rank 0 checkpoints).

        DDP broadcasts buffers at the start of each forward, but the last forward then updates
        them with each rank's own batch: without this the ranks would end a phase apart.
        """
        if self.world_size == 1:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def _all_reduce_mean(self, sums: dict) -> dict:
        if self.world_size == 1 or not sums:
            return dict(sums)
        keys = sorted(sums)
        flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, (flat / self.world_size).unbind()))

    def _teacher_losses(self) -> dict:
        """Per teacher, block -> sum of its outputs' weighted losses (what Eq. 7 minimises)."""
        table = {}
        for key, out in self._outputs.items():
            blocks = set.intersection(*(set(self.loss_table.get(name, {})) for name in out))
            table[key] = {n: sum(self._weights[name] * self.loss_table[name][n] for name in out) for n in blocks}
        return table

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.log_dir is None or self.rank != 0:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None and "losses" in record:  # L_t^n against n: the curves Eq. 7 reads
            step = record.get("block", self.num_blocks + 1)
            for name, value in record["losses"].items():
                tb.add_scalar(f"{record['event']}_loss/{name}", value, step)
            tb.flush()

    def _report_step(self, bar, phase, n, done, loss) -> None:
        value = float(loss.detach())
        if not bar.disable:
            bar.set_postfix(loss=f"{value:.4g}")
        tb = self._tensorboard()
        if tb is not None:
            tb.add_scalar(f"{phase}/block{n}/loss" if phase == "blocks" else "finetune/loss", value, done)

    def _tensorboard(self):
        if self._tb is None and self.log_dir is not None and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
        return self._tb or None


@dataclass
class _Pending:
    """Where a checkpoint left a phase: which, how far, and the state to continue it."""

    phase: str
    block: int
    step: Optional[int]
    rng: dict
    epoch_rng: Optional[dict] = None
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    sums: Optional[dict] = None

    @classmethod
    def from_meta(cls, meta, tensors):
        state = {k: unpack_state(meta[k], tensors) for k in ("rng", "epoch_rng", "optimizer", "scheduler", "sums") if k in meta}
        return cls(meta["phase"], meta["block"], meta["step"], **state)


# ---------------------------------------------------------------------- setup helpers


def _check_teachers(teachers) -> dict:
    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError(f"teachers must be a non-empty mapping name -> network, got {type(teachers).__name__}")
    for key, t in teachers.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"teachers: names must be non-empty strings without '/', got {key!r}")
        missing = [a for a in ("forward_until", "forward_from", "tail", "num_blocks") if not hasattr(t, a)]
        if not isinstance(t, nn.Module) or missing:
            raise TypeError(f"teachers[{key!r}] must be an nn.Module speaking the block protocol "
                            f"(pyamalgam.models.BlockNetwork); it lacks {missing or 'nn.Module'}")
    first_key, first_n = next((k, t.num_blocks) for k, t in teachers.items())
    for key, t in teachers.items():
        if t.num_blocks != first_n:
            raise ValueError(f"teachers must have the same number of blocks: teachers[{key!r}] has {t.num_blocks}, "
                             f"teachers[{first_key!r}] has {first_n}")
    for t in teachers.values():
        t.eval().requires_grad_(False)
        for p in t.parameters():
            p.grad = None  # e.g. a TargetNet-2 fresh from its fine-tune (Eq. 9): frozen from now on
    return dict(teachers)


def _resolve_outputs(teachers, tasks) -> dict:
    tasks = dict(tasks or {})
    unknown = set(tasks) - set(teachers)
    if unknown:
        raise ValueError(f"tasks: unknown teacher(s) {sorted(unknown)}; teachers are {sorted(teachers)}")
    outputs, seen = {}, {}
    for key, t in teachers.items():
        if key in tasks:
            outputs[key] = {key: get_task(tasks[key])}
        elif isinstance(t, BlockNet):
            if t.task is None:
                raise ValueError(f"teachers[{key!r}] declares no task; pass tasks={{{key!r}: ...}}")
            outputs[key] = {key: t.task}
        else:  # a multi-output teacher (a TargetNet): its own output names
            outputs[key] = dict(t.tasks)
        for name in outputs[key]:
            if name in seen:
                raise ValueError(f"output {name!r} is predicted by both teachers[{seen[name]!r}] and teachers[{key!r}]")
            seen[name] = key
    return outputs


def _resolve_weights(teachers, outputs, weights):
    weights = dict(weights or {})
    names = {name for out in outputs.values() for name in out}
    unknown = set(weights) - names - set(teachers)
    if unknown:
        raise ValueError(f"weights: unknown name(s) {sorted(unknown)}; use output names {sorted(names)} or teacher names")
    for k, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {w!r}")
    per_output, per_teacher = {}, {}
    for key, out in outputs.items():
        per_teacher[key] = float(weights.get(key, 1.0))
        inherited = getattr(teachers[key], "task_weights", {})  # a TargetNet keeps its own Eq. 6 lambdas
        for name in out:
            w = weights.get(name, 1.0) * (per_teacher[key] if name != key else 1.0) * inherited.get(name, 1.0)
            per_output[name] = float(w)
    return per_output, per_teacher


def _make_student(teachers, init) -> BlockNet:
    """Step 1: the student is a copy of one teacher's chain of blocks 1..N, without a head.

    ``"teacher"`` copies the first teacher (in the mapping's order): SegNet for Eq. 6 / 8, and
    for Eq. 9 TargetNet-2, whose chain is its trunk continued by the stream that branches out
    last (:meth:`TargetNet.as_trunk`), so TargetNet-3 starts from what TargetNet-2 learnt
    rather than from NormNet. ``"random"`` re-initialises that copy.
    """
    if init in ("teacher", "random"):
        source = next(iter(teachers))
    elif init in teachers:
        source = init
    else:
        raise ValueError(f"init must be 'teacher', 'random' or a teacher name {sorted(teachers)}, got {init!r}")
    as_trunk = getattr(teachers[source], "as_trunk", None)
    if as_trunk is None:
        raise ValueError(f"init={init!r}: teachers[{source!r}] has no as_trunk() to copy the student from")
    student = as_trunk()
    if init == "random":
        student.reset_parameters()
    return student.requires_grad_(False)


def _validate_blocks(teachers, student, probe_size) -> list:
    """Probe every teacher: same block count (checked before) and block feature shapes."""
    divisor = math.lcm(*(getattr(t, "size_divisor", 1) for t in teachers.values()))
    in_chans = {key: getattr(t, "in_chans", 3) for key, t in teachers.items()}
    if len(set(in_chans.values())) > 1:
        raise ValueError(f"teachers take different input channels: {in_chans}")
    h, w = probe_size if probe_size is not None else (2 * divisor, 2 * divisor)
    device = _module_device(student)
    x = torch.rand(1, student.in_chans, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    reference = block_shapes(student, x)
    ref_name = "the student"
    for key, t in teachers.items():
        for n, (got, want) in enumerate(zip(block_shapes(t.to(device), x), reference), start=1):
            for stream, shape in (got.items() if isinstance(got, dict) else [(None, got)]):
                if shape != want:
                    where = f"teachers[{key!r}]" + ("" if stream is None else f" stream {stream!r}")
                    raise ValueError(f"block {n}: {where} gives features {shape} but {ref_name} (a copy of the "
                                     f"first teacher) gives {want}; teachers must share block shapes")
        if isinstance(t, BlockNet):
            with torch.no_grad():
                theirs = set(t.eval().forward_until(x, t.num_blocks)[1])
                ours = set(student.eval().forward_until(x, student.num_blocks)[1])
            if theirs != ours:
                raise ValueError(f"teachers[{key!r}] carries side information {sorted(theirs)} but the student carries "
                                 f"{sorted(ours)}; teachers must share the block structure")
    return reference


def _fixed_batches(loader, count, probe_loader) -> list:
    """The probe batches of Eq. 7's final losses: every batch of ``probe_loader``, or ``count``
    images of ``loader.dataset`` at evenly spaced indices, batched like ``loader``.

    Read by index, not by iterating ``loader``, so that neither the loader's generator nor the
    global RNG moves: the training batches (and a resumed run's replay) stay what they were. A
    loader without an indexable data set gives its first batches instead.
    """
    if probe_loader is not None:
        batches = list(probe_loader)
        if not batches:
            raise ValueError("final_loss_loader yielded no batch")
        return batches
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"final_loss_images must be a positive int, got {count!r}")
    dataset = getattr(loader, "dataset", None)
    indexable = (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
                 and not isinstance(dataset, torch.utils.data.IterableDataset))
    if not indexable:  # the first batches of one pass, the global RNG restored after
        with torch.random.fork_rng(devices=[]):
            batches, seen = [], 0
            for batch in loader:
                batches.append(batch)
                seen += _batch_len(batch)
                if seen >= count:
                    break
        return batches
    size = len(dataset)
    count = min(count, size)
    indices = [i * size // count for i in range(count)]
    batch_size = getattr(loader, "batch_size", None) or 1
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    return [collate([dataset[i] for i in indices[j:j + batch_size]]) for j in range(0, count, batch_size)]


def _batch_len(batch) -> int:
    x = batch["image"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.shape[0])


def _init_distributed():
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _module_device(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return options[value]


def _check_hparams(**values):
    for name, v in values.items():
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        if bad or v < 0 or (name in ("lr", "reduction") and v <= 0) or (name == "momentum" and v >= 1):
            raise ValueError(f"{name} has an invalid value {v!r}")
    if not isinstance(values["reduction"], int):
        raise ValueError(f"reduction must be an int, got {values['reduction']!r}")


def _get_rng(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": _pyrandom_to_json(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def _set_rng(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_pyrandom_from_json(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"]))


def _pyrandom_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _pyrandom_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _prefixed(tensors, prefix) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _str_keys(table) -> dict:
    return {name: {str(n): v for n, v in row.items()} for name, row in table.items()}


def _int_keys(table) -> dict:
    return {name: {int(n): v for n, v in row.items()} for name, row in table.items()}

"""The multi-task trainer on the shared engine: supervised joint training of a hard-sharing
:class:`~pyamalgam.models.multitask.MultiTaskNet` (seed 002's Baseline-1), with optional
self-distillation (SD-Vanilla, Baseline-2; SD-MTCNN, Baseline-4: (★), (★★), full) and optional
traditional KD from frozen single-task teachers (Baseline-3).

Usage::

    from pyamalgam.models.multitask import multitask_segnet
    from pyamalgam.multitask import MultiTaskTrainer, SelfDistillation

    net = multitask_segnet(("seg", "depth", "normal"), width=1/8, depth=4, num_classes=8, shallow=True)
    tr = MultiTaskTrainer(net, sd=SelfDistillation("encoder", "star", full=True), checkpoint_dir="runs/mtl")
    tr.fit(loader, epochs=2)           # labelled dict batches: image, seg, depth, normal, mask

The engine gives the tqdm bar, the JSON-lines log (``mtl.jsonl``), atomic checkpoints every
``checkpoint_every`` steps with bit-identical resume, torchrun/DDP. docs/multitask.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._checks import check_int
from ..distill.setup import digest, evaluating
from ..engine import Engine, NonFiniteLossError, module_device
from ..engine.lock import hold_folders
from ..models.multitask import MultiTaskNet
from ..models.protocol import count_parameters
from .checkpoints import DONE, resume_run, save_run
from .objectives import SelfDistillation
from .step import MultiTaskStep, check_batch, teacher_kd
from .tasks import task_spec
from .weighting import TaskWeighting

__all__ = ["MultiTaskTrainer", "LOG_NAME"]

LOG_NAME = "mtl.jsonl"


class MultiTaskTrainer:
    """Trains ``net`` (a :class:`~pyamalgam.models.multitask.MultiTaskNet`, in place) on labels.

    Args:
        net: the network; with ``sd`` it must have its S paths (``shallow=True``); without ``sd``
            its S paths, if any, are frozen (``requires_grad`` off): nothing would train them.
        sd: a :class:`~pyamalgam.multitask.SelfDistillation` (None: no self-distillation).
        teachers: task -> frozen single-task teacher for traditional KD (Baseline-3); each must
            declare that one task (``teacher.tasks``), and be one of the network's tasks.
        kd_weight: the weight of the KD term (mean over the teachers' tasks).
        weighting: "equal" (default), "uncertainty" or "dwa" (:mod:`.weighting`, extras).
        dwa_period: steps per DWA period (default: one epoch of the fit's loader).
        optimizer, lr, momentum, weight_decay, power: the engine's optimiser and poly LR.
        device, checkpoint_dir, log_dir, checkpoint_every, progress: as the Distiller's.
        ignore_index: unlabelled segmentation pixels.
    """

    def __init__(self, net: nn.Module, *, sd: Optional[SelfDistillation] = None, teachers: Optional[Mapping] = None,
                 kd_weight: float = 1.0, weighting: str = "equal", dwa_period: Optional[int] = None,
                 optimizer: str = "adam", lr: float = 3e-3, momentum: float = 0.9, weight_decay: float = 4e-6,
                 power: float = 0.9, device=None, checkpoint_dir=None, log_dir=None,
                 checkpoint_every: Optional[int] = None, progress: bool = True, ignore_index: int = 255):
        if not isinstance(net, MultiTaskNet):
            raise TypeError(f"net must be a pyamalgam.models.multitask.MultiTaskNet, got {type(net).__name__}")
        if sd is not None and not isinstance(sd, SelfDistillation):
            raise TypeError(f"sd must be a SelfDistillation or None, got {type(sd).__name__}")
        if sd is not None and net.shallow is None:
            raise ValueError("self-distillation needs the network's S paths: build it with shallow=True")
        if not (isinstance(kd_weight, (int, float)) and math.isfinite(kd_weight) and kd_weight >= 0):
            raise ValueError(f"kd_weight must be a finite number >= 0, got {kd_weight!r}")
        self.net, self.sd = net, sd
        if sd is None and net.shallow is not None:
            # No objective reads the S paths; DDP needs every trainable parameter used.
            net.shallow.requires_grad_(False)
        self.specs = {t: task_spec(t) for t in net.tasks}  # a task the trainer does not know: ValueError
        self.teachers = self._check_teachers(teachers)
        self.device = torch.device(device) if device is not None else module_device(net)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else self.checkpoint_dir
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.weighting_kind, self.dwa_period = weighting, dwa_period
        self.hparams = {"optimizer": optimizer, "lr": float(lr), "momentum": float(momentum),
                        "weight_decay": float(weight_decay), "power": float(power), "kd_weight": float(kd_weight)}
        self.engine = Engine(device=self.device, optimizer=optimizer, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, power=power, checkpoint_every=checkpoint_every,
                             progress=progress, log_dir=self.log_dir, log_name=LOG_NAME)
        weights = TaskWeighting(list(net.tasks), weighting, period=dwa_period or 1)  # checks the kind
        self.step_module = MultiTaskStep(net, self.specs, weights, sd, kd_weight if self.teachers else 0.0,
                                         self.ignore_index).to(self.device)
        for t in self.teachers.values():
            t.to(self.device).eval().requires_grad_(False)
        self._teacher_digest = {k: digest(t) for k, t in self.teachers.items()}
        hold_folders(self)

    rank = property(lambda self: self.engine.rank)
    world_size = property(lambda self: self.engine.world_size)

    @property
    def history(self) -> list:
        return self.engine.log.history

    def fit(self, loader, epochs: int = 1, *, max_steps: Optional[int] = None, resume=True) -> nn.Module:
        """Train for ``epochs`` passes over ``loader`` (at most ``max_steps``); ``resume`` as the
        Distiller's (True: continue from ``checkpoint_dir``'s checkpoint if there is one). Returns
        the network in eval mode."""
        total = self.engine.plan(loader, epochs, max_steps)
        if self.weighting_kind == "dwa" and self.dwa_period is None:
            self.step_module.weighting.period = len(loader)
            self.dwa_period = len(loader)
        pending = resume_run(self, resume, loader, total)
        if pending is not DONE:
            self._train(loader, total, pending)
        self.net.eval()
        return self.net

    def losses(self, batch) -> dict:
        """The objective's terms on one batch with the current weights (eval mode, no training)."""
        with evaluating(self.step_module):
            _, terms = self._step_loss(self.step_module, batch)
        return {k: float(v) for k, v in terms.items()}

    def config(self) -> dict:
        """The setup a checkpoint belongs to (compared on resume)."""
        return {"net": self.net.config, "parameters": count_parameters(self.step_module),
                "sd": None if self.sd is None else self.sd.to_json(), "weighting": self.weighting_kind,
                "dwa_period": self.dwa_period, "teachers": self._teacher_digest, **self.hparams}

    def _train(self, loader, total, pending) -> None:
        self.step_module.train()
        try:
            run = self.engine.run_phase(self.step_module, self._step_loss, loader, total, desc="mtl", tag="mtl/loss",
                                        resume=pending, save=lambda state: save_run(self, "train", total, state))
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; lower lr (now {self.hparams['lr']}) or the weights of the terms",
                                     phase=e.phase, step=e.step, terms=e.terms) from None
        self.engine.log.write({"event": "mtl", "losses": run.losses, "steps": total, "seconds": round(run.seconds, 3),
                               "images_per_s": run.images_per_s}, step=total)
        save_run(self, "done", total)

    def _step_loss(self, trainable, batch):
        check_batch(batch, self.specs)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        image = batch["image"]
        kd = teacher_kd(self.teachers, image) if self.teachers else None
        return trainable(image, batch, kd)

    def _check_teachers(self, teachers) -> dict:
        if teachers is None:
            return {}
        if not isinstance(teachers, Mapping) or not teachers:
            raise TypeError("teachers must be a non-empty mapping task -> single-task network, or None")
        for task, t in teachers.items():
            if task not in self.net.tasks:
                raise ValueError(f"teachers[{task!r}]: not a task of the network (its tasks: {list(self.net.tasks)})")
            declared = list(getattr(t, "tasks", {}) or {})
            if declared != [task]:
                raise ValueError(f"teachers[{task!r}] must be a single-task network declaring the task {task!r}; "
                                 f"it declares {declared}")
            if any(p is q for p in t.parameters() for q in self.net.parameters()):
                raise ValueError(f"teachers[{task!r}] shares parameters with the network")
        return dict(teachers)

"""The Amalgamator: Steps 1-4 of paper 001, §5.1, and the multi-teacher schemes of §5.2.

Usage::

    am = Amalgamator(teachers={"seg": segnet, "depth": depthnet}, checkpoint_dir="runs/ka")
    am.fit(loader, epochs_per_block=2)      # Step 2, block by block (Eq. 6)
    am.branch_out()                          # Step 3 (Eq. 7), or points={"seg": 10, "depth": 9}
    target = am.finetune(loader, epochs=2, save=True)   # Step 4; runs/ka/target_net.safetensors
    target(images)                           # {"seg": logits, "depth": metres}
    pyamalgam.load("runs/ka/target_net.safetensors")   # the same TargetNet, from its model file

Only images are read from the loader (a batch dict's ``"image"``, the first element of a tuple,
or a tensor): the teachers' own predictions are the supervision.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .._checks import as_int, as_real
from ..engine import Engine, NonFiniteLossError, PolyLR, TargetCache, module_device
from ..engine.loop import batch_images
from ..models.protocol import check_input, count_parameters
from .blockwise import BlockStep, block_loss
from .branch import (
    assemble_target_net,
    select_branch_points,
    teacher_losses,
)
from .checkpoints import branch_out_logged, hold_folders, resume_run, save_run
from .connectors import connect_teachers, make_codings
from .nonfinite import explain
from .phases import final_losses, finetune_loss, record_final_losses, teacher_targets
from .setup import (
    check_choice,
    check_hparams,
    check_teachers,
    fixed_batches,
    make_student,
    plan_blocks,
    resolve_outputs,
    resolve_weights,
)
from .structured import parse_structured
from .target_file import TARGET_NAME, check_savable, save_target

__all__ = ["TARGET_NAME", "Amalgamator", "PolyLR"]

LOG_NAME = "amalgamation.jsonl"
_OBJECTIVES = {"prediction": "prediction", "eq6": "prediction", "feature": "feature", "eq5": "feature"}
_fixed_batches = fixed_batches  # the name the tests of Eq. 7's probe use


class Amalgamator:
    """Amalgamates K frozen single-task teachers into one multi-task TargetNet, without labels.

    Args:
        teachers: name -> teacher, a :class:`pyamalgam.models.BlockNetwork` (e.g. ``segnet_vgg``,
            any :class:`~pyamalgam.models.SequentialBlockNet`, or a trained :class:`TargetNet` for
            the online scheme of Eq. 9). All must have the same number of blocks; one whose block
            shapes differ from the student's gets connectors and is held wrapped in a
            ``ConnectedTeacher`` (docs/amalgamation.md, heterogeneous teachers). They are put in
            eval mode and their parameters get ``requires_grad=False``.
        tasks: name -> task ("segmentation", "depth", "normals", a Task or a loss callable) for
            teachers that declare no ``tasks`` themselves (or to override it).
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
        terms: optional structured-distillation terms added to Eq. 6 / 8 / 9 and the fine-tune,
            the Distiller's names and specs (thesis 003): ``{"pi": 10}`` (pixel-wise soft targets
            on segmentation outputs), ``"pa"`` / ``"cwd"`` (pair-wise / channel-wise on the block
            features), e.g. ``terms={"pi": {"weight": 1, "temperature": 2}, "pa": 10}``. None (the
            default): the paper's objectives, unchanged. See ``structured.py`` and
            docs/amalgamation.md.
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        *,
        tasks: Mapping[str, Any] | None = None,
        weights: Mapping[str, float] | None = None,
        objective: str = "prediction",
        init: str = "teacher",
        reduction: int = 4,
        coding_gate: float | None = 0.95,
        lr: float = 0.005,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        weight_decay: float = 4e-6,
        power: float = 0.9,
        device=None,
        amp: bool = False,
        channels_last: bool = False,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        log_dir=None,
        progress: bool = True,
        probe_size: tuple | None = None,
        cache_targets: int = 0,
        terms: Mapping[str, Any] | None = None,
    ):
        self.teachers = check_teachers(teachers)
        self.objective = check_choice("objective", objective, _OBJECTIVES)
        check_hparams(lr=lr, momentum=momentum, weight_decay=weight_decay, power=power, reduction=reduction)
        if coding_gate is not None and (as_real(coding_gate) is None or not 0 < coding_gate < 1):
            raise ValueError(f"coding_gate must be a number in (0, 1) or None, got {coding_gate!r}")
        cache_bytes = as_int(cache_targets)
        if cache_bytes is None or cache_bytes < 0:
            raise ValueError(f"cache_targets must be a number of bytes >= 0, got {cache_targets!r}")
        self.lr, self.momentum, self.weight_decay, self.power = lr, momentum, weight_decay, power
        self.amp, self.channels_last, self.progress = bool(amp), bool(channels_last), bool(progress)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else self.checkpoint_dir
        self.device = torch.device(device) if device is not None else module_device(next(iter(self.teachers.values())))
        self.engine = Engine(device=self.device, optimizer=optimizer, lr=lr, momentum=momentum,  # checks optimizer
                             weight_decay=weight_decay, power=power, amp=amp, checkpoint_every=checkpoint_every,
                             progress=progress, log_dir=self.log_dir, log_name=LOG_NAME)
        self.optimizer = self.engine.optimizer

        self._outputs = resolve_outputs(self.teachers, tasks)
        self._weights, self._teacher_weights = resolve_weights(self.teachers, self._outputs, weights)
        self.structured = parse_structured(terms, self._outputs)  # None: the paper's objectives only
        self.student = make_student(self.teachers, init)
        self.num_blocks = self.student.num_blocks
        plan = plan_blocks(self.teachers, self.student, probe_size)
        self._shapes = plan.student
        # ChannelCoding per (block, teacher); connectors only for teachers whose shapes differ
        self.codings = make_codings(plan, self.teachers, reduction, coding_gate)
        self.teachers = connect_teachers(self.teachers, self.codings, plan)
        self._place()

        self.loss_table: dict = {name: {} for out in self._outputs.values() for name in out}
        self.feature_table: dict = {key: {} for key in self.teachers} if self.objective == "feature" else {}
        self.completed_blocks: set = set()
        self.branch_points: dict | None = None
        self.target_net = None
        self.target_cache = TargetCache(cache_bytes) if cache_bytes else None
        hold_folders(self)  # one process per checkpoint_dir / log_dir (docs/robustness.md)

    rank = property(lambda self: self.engine.rank)
    world_size = property(lambda self: self.engine.world_size)
    checkpoint_every = property(lambda self: self.engine.checkpoint_every)

    @property
    def history(self) -> list:
        """Every log record of this run (and of the runs it resumed)."""
        return self.engine.log.history

    # ------------------------------------------------------------------ public API

    def fit(self, loader, epochs_per_block: int = 2, *, max_steps_per_block: int | None = None, resume=None,
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
        total = self.engine.plan(loader, epochs_per_block, max_steps_per_block, "epochs_per_block")
        probe = fixed_batches(loader, final_loss_images, final_loss_loader)
        pending = resume_run(self, resume, ("blocks", "finetune", "done"), loader)
        for n in range(1, self.num_blocks + 1):
            if n not in self.completed_blocks:
                at = pending if pending is not None and pending.block == n else None
                self._train_block(n, loader, total, at, probe)
        return self.loss_table

    def branch_out(self, points: Mapping[str, int] | None = None, *, candidates=None) -> dict:
        """Steps 3-4: choose branch points (Eq. 7) and assemble :attr:`target_net`.

        ``points`` forces the branch block of some or all teachers (e.g. every teacher at decoder
        block b for the paper's Decoder_bb variants); the others take ``argmin_n L^n`` over
        ``candidates`` (default: the decoder, N/2 < n <= N). Returns teacher name -> block.
        """
        points = {key: self._check_point(key, p) for key, p in (points or {}).items()}
        free = [key for key in self.teachers if key not in points]
        if free:
            table = {key: v for key, v in teacher_losses(self.loss_table, self._outputs, self._weights).items()
                     if key in free}
            points.update(select_branch_points(table, self.num_blocks, candidates))
        self.branch_points = {key: points[key] for key in self.teachers}
        self._assemble()
        if not branch_out_logged(self, self.branch_points):  # a resumed run's restored log has it already
            self._log({"event": "branch_out", "points": self.branch_points, "parameters": self.parameter_report()})
        return dict(self.branch_points)

    def finetune(self, loader, epochs: int = 1, *, max_steps: int | None = None, resume=None, save=False):
        """Step 4: fine-tune the whole TargetNet against the teachers' predictions (Eq. 6 losses).

        Call :meth:`branch_out` first, or pass ``resume`` with a checkpoint written during
        fine-tuning (its branch points are then reused). ``save``: True writes the fine-tuned
        TargetNet to ``<checkpoint_dir>/target_net.safetensors`` (:meth:`save_target`), a path
        writes it there; whether it can be written is checked before the first step. Returns
        :attr:`target_net`.
        """
        total = self.engine.plan(loader, epochs, max_steps, "epochs")
        pending = resume_run(self, resume, ("finetune", "done"), loader)
        if self.target_net is None:
            raise RuntimeError("finetune() needs a TargetNet: call branch_out() first")
        path = None if save is False or save is None else check_savable(self, None if save is True else save)
        if pending is None or pending.phase != "done":
            self._train_finetune(loader, total, pending)
        if path is not None:
            self.save_target(path)
        return self.target_net

    def save_target(self, path=None, *, resolution: tuple | None = None):
        """Write :attr:`target_net` as one model file (``TargetNet.save``: safetensors weights and
        the architecture as JSON, no pickle), atomically, to ``path`` (default
        ``<checkpoint_dir>/target_net.safetensors``); ``pyamalgam.load`` and ``pyamalgam predict``
        read it. ``resolution``: the (H, W) it was trained at, the default size of ``pyamalgam
        export`` / ``predict``. The file's ``extra`` records the branch points, the teachers and
        the parameter counts. Only rank 0 writes; returns the path (None on other ranks).

        A TargetNet the file format cannot describe (connectors of heterogeneous teachers, smp
        teachers, a loss callable as task) is refused with a ValueError naming the branch and
        module, before anything is written (docs/deploy.md).
        """
        return save_target(self, check_savable(self, path), resolution)

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
            with self.engine.autocast():
                teacher_targets(self, self._images(batch))
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
        step_module = BlockStep(self.student.block(n), self.codings[str(n)])
        self.student.requires_grad_(False).eval()
        self.codings.requires_grad_(False)
        step_module.requires_grad_(True).train()

        def step(trainable, batch):
            return self._block_loss(n, trainable, self._images(batch), eq7=False)

        run = self._run_phase("blocks", n, step_module, step, loader, total, pending)
        final = self._final_losses(n, step_module, probe)
        record_final_losses(self, n, final)  # checked first: never a NaN table for Eq. 7
        self.completed_blocks.add(n)
        self._log({"event": "block", "block": n, "objective": self.objective, "losses": final, "train_losses": run.losses,
                   "steps": total, "seconds": round(run.seconds, 3), "images_per_s": run.images_per_s})
        save_run(self, "blocks", n)

    def _final_losses(self, n, step_module, probe) -> dict:
        """L_t^n of Eq. 7, block n on the fixed probe images (:func:`.phases.final_losses`)."""
        return final_losses(self, n, step_module, probe)

    def _block_loss(self, n, trainable, x, eq7: bool):
        """(loss to minimise, terms) of one block-n batch (:func:`.blockwise.block_loss`)."""
        return block_loss(self, n, trainable, x, eq7)

    def _train_finetune(self, loader, total, pending) -> None:
        target = self.target_net.requires_grad_(True).train()

        def step(trainable, batch):  # Step 4's objective: :func:`.phases.finetune_loss`
            return finetune_loss(self, trainable, self._images(batch))

        run = self._run_phase("finetune", self.num_blocks + 1, target, step, loader, total, pending)
        self._log({"event": "finetune", "losses": run.losses, "steps": total, "seconds": round(run.seconds, 3),
                   "images_per_s": run.images_per_s})
        save_run(self, "done", self.num_blocks + 1)

    def _run_phase(self, phase, n, module, step_loss, loader, total, pending):
        """One phase on the engine; mid-phase checkpoints carry this phase's name and block."""
        resume = pending.state if pending is not None else None
        desc = f"block {n}/{self.num_blocks}" if phase == "blocks" else "finetune"
        tag = f"blocks/block{n}/loss" if phase == "blocks" else "finetune/loss"
        try:
            return self.engine.run_phase(module, step_loss, loader, total, index=n, desc=desc, tag=tag, resume=resume,
                                         save=lambda state: save_run(self, phase, n, state))
        except NonFiniteLossError as e:  # name the block, the output and the teacher
            raise explain(self, e, phase, n) from e

    # ------------------------------------------------------------------ data and setup (checkpoints: checkpoints.py)

    def _images(self, batch) -> torch.Tensor:
        x, name = batch_images(batch, strict=True)  # only the images: the teachers supervise
        check_input(x, self.student.in_chans, self.student.size_divisor, name)
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _assemble(self) -> None:
        self.target_net = self._build_target(self.branch_points)

    def _build_target(self, points):
        net = assemble_target_net(self.student, self.codings, self.teachers, points, self._outputs,
                                  self._weights).to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    @property
    def _soft(self) -> tuple:
        """Outputs whose raw teacher logits the targets also hold (pi's soft targets)."""
        return self.structured.soft if self.structured is not None else ()

    def _config(self) -> dict:
        config = {"teachers": sorted(self.teachers), "outputs": sorted(self.loss_table), "num_blocks": self.num_blocks,
                  "objective": self.objective, "optimizer": self.optimizer}
        if self.structured is not None:  # only then: checkpoints of the paper's method are unchanged
            config["terms"] = self.structured.config()
        return config

    # ------------------------------------------------------------------ plumbing

    def _place(self) -> None:
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        for t in self.teachers.values():
            t.to(self.device, memory_format=fmt)
        self.student.to(self.device, memory_format=fmt)
        self.codings.to(self.device)

    def _check_point(self, key, p) -> int:
        """A forced branch point of :meth:`branch_out`, as an int block number."""
        if key not in self.teachers:
            raise ValueError(f"points: unknown teacher {key!r}; teachers are {sorted(self.teachers)}")
        block = as_int(p)
        if block is None or not 1 <= block <= self.num_blocks:
            raise ValueError(f"points[{key!r}] must be a block in [1, {self.num_blocks}], got {p!r}")
        return block

    def _log(self, record: dict) -> None:
        # L_t^n against n in TensorBoard: the curves Eq. 7 reads
        self.engine.log.write(record, step=record.get("block", self.num_blocks + 1))


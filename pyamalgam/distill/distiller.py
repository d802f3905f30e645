"""The Distiller: one frozen teacher -> one (smaller) student, structured knowledge distillation
for dense prediction (thesis 003, ch. 3 and 4) on the shared training engine.

Usage::

    from pyamalgam.distill import Distiller
    d = Distiller(teacher, student, terms={"pi": 10.0, "pa": 10.0, "ho": 0.1}, checkpoint_dir="runs/kd")
    student = d.fit(loader, epochs=2)

The student minimises thesis Eq. 3.4, ``l_mc + lambda_1 (l_pi + l_pa) - lambda_2 l^s_ho``,
generalised to one weight per term (and the channel-wise term of Eq. 4.4): ``l_mc + sum_k w_k
l_k - w_ho l^s_ho``. ``l_mc`` is the student's task loss on the labels of a batch that has them;
an unlabelled batch trains on the distillation terms alone. docs/distiller.md has the terms,
their defaults, the taps, checkpoints and DDP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._checks import check_int
from ..engine import Engine, NonFiniteLossError, module_device
from ..models.protocol import count_parameters
from .checkpoints import DONE, hold_folders, resume_run, save_run
from .setup import (build_losses, check_hparams, check_networks, digest, evaluating, feature_taps, make_holistic,
                    probe, probe_image, resolve_all)
from .step import DistillStep, LabelLoss, batch_image, check_scalar, default_task_loss
from .taps import TapRunner
from .terms import TERM_NAMES, describe, parse_terms

__all__ = ["Distiller", "LOG_NAME"]

LOG_NAME = "distill.jsonl"


class Distiller:
    """Distils a frozen ``teacher`` into ``student`` (trained in place and returned by :meth:`fit`).

    Args:
        teacher: any nn.Module that maps images to one prediction map (block-protocol networks
            give block taps and the default feature tap). Put in eval mode, ``requires_grad``
            off.
        student: the network to train; its own task (``student.tasks``: segmentation, depth or
            normals) gives the default task loss.
        terms: term name -> weight, spec dict or loss object (:mod:`pyamalgam.distill.terms`):
            ``{"pi": 10.0, "pa": 10.0}`` (the thesis' lambda_1 = 10), ``{"cwd": 3.0}`` (§4.4.1),
            ``{"pa": {"weight": 10, "radius": 1, "patch": 2, "tap": ("block", 5)}}``,
            ``{"ho": 0.1}`` (lambda_2, subtracted) or ``{"ho": HolisticDistillation(...)}``.
        task_loss: ``l_mc``: None (the student's task loss on the batch's labels, when its task
            is one of the three and the batch is a dict holding them), False (none: distil
            only), or a callable ``(student_output, batch) -> scalar or None``.
        taps: the feature tap of pa / cwd terms that name none: one tap (``("block", n)``,
            ``("module", name)``, ``"output"``) or ``{"student": tap, "teacher": tap}``; default
            each network's last block (the thesis' feature map, the classifier's input).
        optimizer, lr, momentum, weight_decay, power: SGD (or "adam") with the poly LR; the
            defaults are the thesis' §3.4.1 (lr 0.01, momentum 0.9, weight decay 5e-4, power 0.9).
        device: where to train (default: the student's device).
        checkpoint_dir: where ``last.safetensors`` is kept (None: no checkpoints).
        log_dir: where the JSON-lines log ``distill.jsonl`` goes (default: ``checkpoint_dir``).
        checkpoint_every: also checkpoint every this many steps inside the phase.
        progress: a tqdm bar (rank 0).
        channels_last: channels_last memory format for the networks and images.
        ignore_index: the label of unlabelled pixels in segmentation labels.
        probe_size: (H, W) of the probe image the terms are tried on when the Distiller is built
            (default: twice the divisibility the networks need, at least 16 x 16).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, terms, task_loss=None, taps=None,
                 optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 power: float = 0.9, device=None, checkpoint_dir=None, log_dir=None,
                 checkpoint_every: Optional[int] = None, progress: bool = True, channels_last: bool = False,
                 ignore_index: int = 255, probe_size=None):
        check_networks(teacher, student)
        check_hparams(lr=lr, momentum=momentum, weight_decay=weight_decay, power=power)
        self.lr, self.momentum, self.weight_decay, self.power = float(lr), float(momentum), float(weight_decay), \
            float(power)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.channels_last = bool(channels_last)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else self.checkpoint_dir
        self.device = torch.device(device) if device is not None else module_device(student)
        self.teacher, self.student = teacher, student
        self.task_loss = self._task_loss(task_loss)
        self.specs = parse_terms(terms)
        if not self.specs and self.task_loss is None:
            raise ValueError(f"terms is empty and the student has no task loss: nothing to train (name a term of "
                             f"{list(TERM_NAMES)}, or pass task_loss=)")
        resolve_all(self.specs, feature_taps(taps, teacher, student), teacher, student)
        self._place()
        self.student_taps = TapRunner(student, [s.student for s in self.specs], "student")
        self.teacher_taps = TapRunner(teacher, [s.teacher for s in self.specs], "teacher")
        dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
        x = probe_image(teacher, student, probe_size).to(self.device, dtype)
        student_probe, teacher_probe = probe(self.student_taps, x), probe(self.teacher_taps, x)
        losses = build_losses(self.specs, student_probe, teacher_probe)
        ho = [s for s in self.specs if s.holistic]
        self.holistic = make_holistic(ho[0], student_probe[0], self.device) if ho else None
        self.step_module = DistillStep(student, self.student_taps, self.specs, losses).to(self.device)
        self._teacher_digest = digest(teacher)
        self.engine = Engine(device=self.device, optimizer=optimizer, lr=lr, momentum=momentum,  # checks optimizer
                             weight_decay=weight_decay, power=power, checkpoint_every=checkpoint_every,
                             progress=progress, log_dir=self.log_dir, log_name=LOG_NAME)
        self.optimizer = self.engine.optimizer
        hold_folders(self)  # one process per checkpoint_dir / log_dir

    rank = property(lambda self: self.engine.rank)
    world_size = property(lambda self: self.engine.world_size)

    @property
    def history(self) -> list:
        """Every log record of this run (and of the runs it resumed)."""
        return self.engine.log.history

    @property
    def weights(self) -> dict:
        """Term name -> weight (the holistic term's is subtracted, Eq. 3.4)."""
        return {s.name: s.weight for s in self.specs}

    @property
    def connectors(self) -> dict:
        """Term name -> the 1x1 connector its loss holds (channel-wise terms whose channel counts differ)."""
        return {name: m.connector for name, m in self.step_module.losses.items()
                if isinstance(getattr(m, "connector", None), nn.Module)}

    def fit(self, loader, epochs: int = 1, *, max_steps: Optional[int] = None, resume=True) -> nn.Module:
        """Train the student for ``epochs`` passes over ``loader`` (at most ``max_steps`` steps).

        ``resume``: True (default) continues from ``checkpoint_dir``'s checkpoint when there is
        one (a finished run's is restored, not trained again), a path resumes from that file,
        False starts afresh. Returns the student, in eval mode.
        """
        total = self.engine.plan(loader, epochs, max_steps)
        pending = resume_run(self, resume, loader, total)
        if pending is not DONE:
            self._train(loader, total, pending)
        self.student.eval()
        return self.student

    def losses(self, batch) -> dict:
        """The objective on one batch with the current weights, in eval mode and without
        training (no critic step, no BatchNorm update): each unweighted term and the total."""
        with evaluating(self.step_module, self.holistic):
            _, terms = self._objective(self.step_module, batch, critic=False)
        return {k: float(v) for k, v in terms.items()}

    def parameter_report(self) -> dict:
        return {"teacher": count_parameters(self.teacher), "student": count_parameters(self.student),
                "connectors": sum(count_parameters(c) for c in self.connectors.values())}

    # ------------------------------------------------------------------ the step

    def _train(self, loader, total, pending) -> None:
        self.teacher.eval()
        self.step_module.train()
        if isinstance(self.holistic, nn.Module):
            self.holistic.train()
        try:
            run = self.engine.run_phase(self.step_module, self._step_loss, loader, total, desc="distill",
                                        tag="distill/loss", resume=pending,
                                        save=lambda state: save_run(self, "train", total, state))
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; lower lr (now {self.lr}) or the weight of the term that diverged "
                                     f"(weights {self.weights})", phase=e.phase, step=e.step, terms=e.terms) from None
        self.engine.log.write({"event": "distill", "losses": run.losses, "steps": total, "weights": self.weights,
                               "seconds": round(run.seconds, 3), "images_per_s": run.images_per_s}, step=total)
        save_run(self, "done", total)

    def _step_loss(self, trainable, batch):
        return self._objective(trainable, batch, critic=True)

    def _objective(self, trainable, batch, critic: bool):
        """Eq. 3.4 on one batch: (total, logged values). The logged values are the same names
        at every step and on every rank (the engine averages them over ranks by name)."""
        x = batch_image(batch, self.student, self.device, self.channels_last)
        t_out, t_features = None, {}
        if self.specs:  # no term: the student on its labels alone (no teacher pass to pay for)
            with torch.no_grad():
                t_out, t_features = self.teacher_taps.run(x)
        s_out, terms = trainable(x, t_out, t_features)
        total = s_out.new_zeros((), dtype=torch.float32)
        for spec in self.specs:
            if not spec.holistic:
                total = total + spec.weight * terms[spec.name]
        if self.holistic is not None:
            if critic:  # thesis §3.3.2: train the critic D, then the student against the updated D
                stats = self.holistic.critic_step(s_out.detach(), t_out, x)
                terms.update({f"critic/{k}": torch.as_tensor(float(v), device=total.device)
                              for k, v in dict(stats or {}).items()})
            terms["ho"] = check_scalar("ho", self.holistic(s_out, x))
            total = total - self.weights["ho"] * terms["ho"]
        mc = self.task_loss(s_out, batch) if self.task_loss is not None else None
        if mc is None and not self.specs:
            raise ValueError("a batch without labels, and no distillation term: nothing to train the student on")
        if self.task_loss is not None:
            labelled = mc is not None
            terms["mc"] = check_scalar("task_loss", mc, "task_loss") if labelled else total.new_zeros(())
            terms["labelled"] = total.new_tensor(float(labelled))
            total = total + terms["mc"]
        terms["total"] = total
        return total, terms

    # ------------------------------------------------------------------ setup

    def _task_loss(self, task_loss):
        if task_loss is None:
            return default_task_loss(self.student, self.ignore_index)
        if task_loss is False:
            return None
        if not callable(task_loss):
            raise TypeError(f"task_loss must be None, False or a callable (student_output, batch) -> scalar or None, "
                            f"got {type(task_loss).__name__}")
        return task_loss

    def _place(self) -> None:
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.teacher.to(self.device, memory_format=fmt).eval().requires_grad_(False)
        for p in self.teacher.parameters():
            p.grad = None
        self.student.to(self.device, memory_format=fmt)

    def _config(self) -> dict:
        """The setup a checkpoint belongs to (compared on resume)."""
        terms = {s.name: {"weight": s.weight, "student": s.student.to_json(), "teacher": s.teacher.to_json(),
                          "loss": describe(self.step_module.losses[s.name] if not s.holistic else self.holistic)}
                 for s in self.specs}
        return {"teacher": type(self.teacher).__qualname__, "student": type(self.student).__qualname__,
                "teacher_parameters": count_parameters(self.teacher),
                "student_parameters": count_parameters(self.student), "teacher_digest": self._teacher_digest,
                "terms": terms, "task_loss": None if self.task_loss is None else describe_task(self.task_loss),
                "optimizer": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "power": self.power, "channels_last": self.channels_last}


def describe_task(task_loss) -> str:
    return repr(task_loss) if isinstance(task_loss, LabelLoss) else describe(task_loss)

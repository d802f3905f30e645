"""The optimisation loop every trainer shares: one *phase* (a block, a fine-tune, a teacher)
trained for a number of steps over a re-iterable loader, with the poly LR of paper 001 §6.1.

A trainer supplies its objective as ``step_loss(module, batch) -> (loss, terms)`` and a ``save``
callback that writes its checkpoint; the :class:`Engine` does the rest: optimiser and schedule,
epochs and their shuffles, mid-phase checkpoints (every ``checkpoint_every`` steps) that resume
bit-identically after ``kill -9`` (the half-done epoch's shuffle is replayed from the RNG state
at its start), DDP wrapping and BatchNorm sync, tqdm, TensorBoard, and the mean of each term over
the phase's last epoch for the log.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from .._checks import as_int
from .checkpoint import pack_state, unpack_state
from .distributed import all_reduce_mean, init_distributed, sync_buffers, wrap_ddp
from .finite import FiniteGuard, check_weights, default_check_every
from .phase_checks import check_phase_meta, check_unpacked, restore_optimizer
from .rng import check_rng_state, get_rng_state, set_rng_state
from .schema import CorruptFileError
from .runlog import RunLog

__all__ = ["Engine", "PhaseState", "PhaseResult", "PolyLR", "OPTIMIZERS", "check_optimizer", "make_optimizer",
           "plan_steps", "batch_images", "batch_len"]

# name -> (params, lr, momentum, weight_decay) -> optimiser: the one table every trainer validates against
OPTIMIZERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, weight_decay: torch.optim.SGD(  # §6.1
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
    "adam": lambda params, lr, momentum, weight_decay: torch.optim.Adam(  # momentum unused
        params, lr=lr, weight_decay=weight_decay),
}
_STATE_KEYS = ("rng", "epoch_rng", "optimizer", "scheduler", "sums")


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


def check_optimizer(name, argument: str = "optimizer") -> str:
    """``name`` if it is a key of :data:`OPTIMIZERS`, else a ValueError naming ``argument``."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"{argument} must be one of {list(OPTIMIZERS)}, got {name!r}")
    return name


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (§6.1) or Adam (``momentum`` unused), from :data:`OPTIMIZERS`."""
    return OPTIMIZERS[check_optimizer(name)](params, lr, momentum, weight_decay)


def plan_steps(loader, epochs, max_steps, epochs_name: str = "epochs", world_size: int = 1) -> int:
    """Steps of a phase: ``epochs`` passes over ``loader``, at most ``max_steps``; checks both."""
    try:
        per_epoch = len(loader)
    except TypeError:
        raise TypeError(f"loader must have a length (a map-style DataLoader), got {type(loader).__name__}") from None
    if isinstance(loader, Iterator):  # one pass only: the next phase (or a resumed epoch) would find it exhausted
        raise TypeError(f"loader must be re-iterable (e.g. a DataLoader), got a one-shot {type(loader).__name__}")
    if per_epoch < 1:
        raise ValueError("loader is empty")
    passes = as_int(epochs)
    if passes is None or passes < 1:
        raise ValueError(f"{epochs_name} must be a positive int, got {epochs!r}")
    limit = None if max_steps is None else as_int(max_steps)
    if max_steps is not None and (limit is None or limit < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if world_size > 1 and not isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
        warnings.warn("distributed run without a DistributedSampler: every rank sees every batch", stacklevel=3)
    total = per_epoch * passes
    return total if limit is None else min(total, limit)


@dataclass
class PhaseState:
    """Where a checkpoint left a phase: the step reached and what continuing it needs.

    ``rng`` is the generators' state at the checkpoint, ``epoch_rng`` theirs at the start of the
    epoch in progress (its shuffle is replayed from it). A checkpoint between phases has only
    ``rng`` (``step`` None). ``source`` names the checkpoint it came from, for errors.
    """

    rng: dict
    step: Optional[int] = None
    total: Optional[int] = None
    epoch_rng: Optional[dict] = None
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    sums: Optional[dict] = None
    source: Optional[str] = field(default=None, compare=False, repr=False)

    def to_meta(self, tensors: dict) -> dict:
        """JSON-able checkpoint fields; the tensors go to ``tensors``."""
        meta = {"step": self.step, "total": self.total}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                meta[key] = pack_state(value, key, tensors)
        return meta

    @classmethod
    def from_meta(cls, meta: dict, tensors: dict, source=None) -> "PhaseState":
        """The state a checkpoint's meta and tensors hold, checked first (the file is untrusted:
        a CorruptFileError naming ``source`` if a field is missing, of the wrong type or range)."""
        where = source if source is not None else "checkpoint"
        check_phase_meta(meta, where)
        try:
            state = {k: unpack_state(meta[k], tensors) for k in _STATE_KEYS if k in meta}
        except ValueError as e:
            raise CorruptFileError(f"{where}: {e}", where) from None
        check_unpacked(state, where)
        return cls(step=meta.get("step"), total=meta.get("total"), **state,
                   source=None if source is None else str(source))


@dataclass
class PhaseResult:
    losses: dict      # term -> mean over the phase's last epoch (all steps if fewer)
    seconds: float
    images: int

    @property
    def images_per_s(self) -> float:
        return round(self.images / max(self.seconds, 1e-9), 2)


class Engine:
    """Optimiser, schedule, devices, checkpoints and logs for one trainer.

    Args:
        device: where the networks train.
        optimizer, lr, momentum, weight_decay, power: the optimiser (:func:`make_optimizer`) and
            the poly LR (:class:`PolyLR`) of every phase.
        amp: bf16 autocast inside :meth:`autocast`.
        checkpoint_every: call ``save`` every this many steps inside a phase (None: never).
        progress: tqdm bars (rank 0 only).
        log_dir, log_name: where the trainer's :class:`RunLog` writes (None: in memory only).
        check_finite_every: read the non-finite flag of the losses every this many steps (None:
            every step on the CPU, every 16 elsewhere; see :class:`~pyamalgam.engine.finite.FiniteGuard`).
    """

    def __init__(self, *, device, optimizer: str = "sgd", lr: float = 0.005, momentum: float = 0.9,
                 weight_decay: float = 4e-6, power: float = 0.9, amp: bool = False,
                 checkpoint_every: Optional[int] = None, progress: bool = True, log_dir=None,
                 log_name: str = "train.jsonl", check_finite_every: Optional[int] = None):
        every = None if checkpoint_every is None else as_int(checkpoint_every)
        if checkpoint_every is not None and (every is None or every < 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
        self.device = torch.device(device)
        finite_every = default_check_every(self.device) if check_finite_every is None else as_int(check_finite_every)
        if finite_every is None or finite_every < 1:
            raise ValueError(f"check_finite_every must be a positive int or None, got {check_finite_every!r}")
        self.check_finite_every = finite_every
        self.optimizer, self.lr, self.momentum = check_optimizer(optimizer), lr, momentum
        self.weight_decay, self.power = weight_decay, power
        self.amp, self.checkpoint_every, self.progress = bool(amp), every, bool(progress)
        self.rank, self.world_size = init_distributed()
        self.log = RunLog(log_dir, log_name, self.rank)
        self._generators: list = []  # the generators of the loader of the current (or last) phase

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def plan(self, loader, epochs, max_steps, epochs_name: str = "epochs") -> int:
        return plan_steps(loader, epochs, max_steps, epochs_name, self.world_size)

    def rng_state(self) -> dict:
        """Every generator a step draws from: the global ones and the phase loader's own
        (``DataLoader(generator=...)`` shuffles with it, not with the global RNG)."""
        state = get_rng_state(self.device)
        if self._generators:
            state["loader"] = [g.get_state() for g in self._generators]
        return state

    def check_rng(self, state: dict, loader=None) -> None:
        """A ValueError unless :meth:`restore_rng` can apply ``state`` (to ``loader``): checked on
        scratch generators, so that a resume can refuse a corrupt state before changing anything."""
        check_rng_state(state, self.device)
        if loader is None or "loader" not in state:
            return
        generators, saved = _loader_generators(loader), state["loader"]
        if not isinstance(saved, list) or len(generators) != len(saved):
            count = len(saved) if isinstance(saved, list) else "no list of"
            raise ValueError(f"resume: the checkpoint holds {count} loader generator state(s), the "
                             f"loader has {len(generators)}; resume with a loader built like the original one")
        for g, st in zip(generators, saved):
            if not isinstance(st, torch.Tensor):
                raise ValueError("resume: a loader generator state is not a tensor")
            scratch = torch.Generator(device=g.device)
            try:
                scratch.set_state(st)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"resume: a loader generator state does not apply: {e}") from None

    def restore_rng(self, state: dict, loader=None) -> None:
        """Inverse of :meth:`rng_state`; the loader part goes to ``loader``'s generators (the
        loader the state was taken from, or one built the same way), and is skipped without one.
        Checked first (:meth:`check_rng`): nothing is set unless all of it applies."""
        self.check_rng(state, loader)
        set_rng_state(state, self.device)
        if loader is None or "loader" not in state:
            return
        for g, st in zip(_loader_generators(loader), state["loader"]):
            g.set_state(st)

    def run_phase(self, module: nn.Module, step_loss: Callable, loader, total: int, *, index: int = 0,
                  desc: str = "train", tag: str = "train/loss", resume: Optional[PhaseState] = None,
                  save: Optional[Callable[[PhaseState], None]] = None,
                  on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> PhaseResult:
        """Train the parameters of ``module`` that require grad for ``total`` steps.

        ``step_loss(trainable, batch)`` returns ``(loss, terms)``; ``trainable`` is ``module``, or
        its DDP wrapper under torchrun. ``index`` tells the phases of one run apart (sampler
        epochs). ``resume`` continues a phase from a mid-phase :class:`PhaseState`; ``save`` is
        called with one every ``checkpoint_every`` steps; ``on_step(step, loss)`` after each step.
        The first step whose loss or a term is NaN/inf stops the phase with
        :class:`~pyamalgam.engine.NonFiniteLossError` (checked every ``check_finite_every`` steps
        and before every ``save``, whose weights are checked too: no checkpoint holds a NaN).
        """
        trainable = wrap_ddp(module, self.device, self.world_size)
        self._generators = _loader_generators(loader)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.optimizer, self.lr, self.momentum, self.weight_decay)
        sched = PolyLR(opt, total, self.power)
        window = min(len(loader), total)
        sums: dict = {}
        start = 0
        if resume is not None and resume.step is not None:
            restore_optimizer(opt, sched, resume)
            sums = {k: v.to(self.device) for k, v in resume.sums.items()}
            start = resume.step
        guard = FiniteGuard(desc, total, self.check_finite_every, self.world_size)
        bar = tqdm(total=total, initial=start, desc=desc, disable=not self.progress or self.rank != 0, leave=False)
        t0, images = time.perf_counter(), 0
        try:
            for step, batch, epoch_rng in self._batches(loader, index, start, total, resume):
                done = step + 1
                saving = save is not None and self.checkpoint_every and done % self.checkpoint_every == 0 and done < total
                loss, terms = step_loss(trainable, batch)
                guard.observe(step, loss, terms)
                if saving or guard.due(done):
                    guard.check()  # before backward: checked every step, a bad loss never reaches the weights
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step >= total - window:
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().double()
                images += batch_len(batch)
                if on_step is not None:
                    on_step(step, loss)
                if saving:
                    check_weights(module.state_dict(), desc, f"after step {done} of {total}")
                    save(PhaseState(rng=self.rng_state(), step=done, total=total, epoch_rng=epoch_rng,
                                    optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                    sums=all_reduce_mean(sums, self.device, self.world_size)))
                bar.update(1)
                if done % 10 == 0 and (not bar.disable or self.log.tensorboard() is not None):
                    self._report(bar, tag, done, loss)  # .item() syncs: not every step
        finally:
            bar.close()
        opt.zero_grad(set_to_none=True)  # the gradients are spent; don't keep their memory
        sync_buffers(module, self.world_size)
        sums = all_reduce_mean(sums, self.device, self.world_size)
        return PhaseResult({k: float(v) / window for k, v in sums.items()}, time.perf_counter() - t0, images)

    def _batches(self, loader, index, start, total, resume):
        """Yield (step, batch, RNG state at the start of the epoch) from step ``start`` on.

        Resuming mid-phase replays the epoch the checkpoint was written in: the generators (the
        global ones and the loader's) are rewound to the epoch's start before the iterator draws
        its shuffle, the done batches are skipped (a checkpoint after an epoch's last batch
        replays that whole epoch: exhausting a loader draws from its generator too), then the
        global generators of the checkpoint are restored. A resumed run then draws what an
        uninterrupted one would have drawn.
        """
        per_epoch = len(loader)
        step, epoch, skip = start, start // per_epoch, 0
        if resume is not None and resume.step is not None and 0 < start < total:
            epoch, skip = (start - 1) // per_epoch, (start - 1) % per_epoch + 1
        while step < total:
            if skip:
                self.restore_rng(resume.epoch_rng, loader)
            epoch_rng = self.rng_state()
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(index * 10_000 + epoch)
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator)
            if skip:
                set_rng_state(resume.rng, self.device)  # the loader's generators are where the replay left them
                done_epoch, skip = skip == per_epoch, 0
                if done_epoch:
                    for _ in iterator:  # the end of the epoch, as the uninterrupted run reached it
                        pass
                    epoch += 1
                    continue
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

    def _report(self, bar, tag, done, loss) -> None:
        value = float(loss.detach())
        if not bar.disable:
            bar.set_postfix(loss=f"{value:.4g}")
        self.log.scalar(tag, value, done)


def _loader_generators(loader) -> list:
    """The distinct torch.Generators a loader shuffles and seeds its workers with."""
    found, seen = [], set()
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    for owner in (loader, sampler, batch_sampler):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            found.append(g)
    return found


def batch_images(batch, *, strict: bool = False) -> tuple:
    """(images, how to name them in an error) of a batch, in every layout the trainers accept:
    a dict's ``"image"`` (what :mod:`pyamalgam.data` yields), a tuple's or list's first element,
    or the batch itself.

    A dict without ``"image"`` is a KeyError naming its keys with ``strict`` (a trainer that
    reads the images); without, its first value stands in, so that any batch can be counted.
    """
    if isinstance(batch, Mapping):
        if "image" in batch:
            return batch["image"], "batch['image']"
        if strict:
            raise KeyError(f"a batch dict must hold 'image' (the key images are read from); got keys {sorted(batch)}")
        return next(iter(batch.values()), None), "batch"
    if isinstance(batch, (tuple, list)):
        return batch[0], "batch[0]"
    return batch, "batch"


def batch_len(batch) -> int:
    """Images in a batch (:func:`batch_images`); 1 for a batch without a leading dimension."""
    x, _ = batch_images(batch)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1

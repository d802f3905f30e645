"""Helpers for pyamalgam's own tests and benchmarks."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path

import torch


def subprocess_env() -> dict:
    """Environment for a ``python -c`` subprocess that must import this same pyamalgam
    (the source tree in a dev build, site-packages after ``pip install .``)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def tiny_net(task: str, seed: int = 0, factory="segnet_vgg", **overrides):
    """A random VGG teacher with a few channels (32x40 inputs work), in eval mode.

    ``factory``: a name in :mod:`pyamalgam.models` or the factory itself; ``overrides`` replace
    the tiny defaults (width 1/16, depth 3, 5 classes, 8 depth bins).
    """
    from pyamalgam import models  # needs the extension: imported only when used

    make = getattr(models, factory) if isinstance(factory, str) else factory
    torch.manual_seed(seed)
    kwargs = {"width": 1 / 16, "depth": 3, "num_classes": 5, "num_bins": 8, **overrides}
    return make(task, **kwargs).eval()


def tiny_teachers(*tasks: str, seed: int = 1, factory="segnet_vgg") -> dict:
    """One :func:`tiny_net` per task (default: segmentation and depth), output name -> net.

    Teacher i is seeded with ``seed + i``, so a fresh call rebuilds identical teachers (what a
    resumed process needs).
    """
    nets = [tiny_net(task, seed + i, factory) for i, task in enumerate(tasks or ("segmentation", "depth"))]
    return {net.task.name: net for net in nets}


class _Images:
    """Random images as dict batches; ``delay`` seconds per item slow a run down to be killed."""

    def __init__(self, n: int, seed: int, delay: float):
        self.images = torch.rand(n, 3, 32, 40, generator=torch.Generator().manual_seed(seed))
        self.delay = delay

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return {"image": self.images[i]}


def tiny_loader(n: int = 12, batch: int = 4, *, shuffle: bool = True, seed: int = 4, delay: float = 0.0,
                distributed: bool = False):
    """A DataLoader of ``n`` random 32x40 images (a DistributedSampler when ``distributed``)."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = _Images(n, seed, delay)
    if distributed:
        return DataLoader(data, batch_size=batch, sampler=DistributedSampler(data, shuffle=shuffle, seed=seed))
    return DataLoader(data, batch_size=batch, shuffle=shuffle)


def tiny_run(checkpoint_dir=None, *, loader=None, resume=True, seed: int = 0, **kwargs):
    """Steps 2-4 on two tiny teachers, resuming from ``checkpoint_dir`` when it holds a checkpoint.

    The same call in a fresh process after an interruption ends with the same weights as an
    uninterrupted run. Returns the Amalgamator; ``kwargs`` go to it.
    """
    from pyamalgam import Amalgamator

    torch.set_num_threads(1)  # same arithmetic in every process (and no oversubscription)
    kwargs.setdefault("progress", False)
    am = Amalgamator(tiny_teachers(), checkpoint_dir=checkpoint_dir, **kwargs)
    loader = loader if loader is not None else tiny_loader()
    torch.manual_seed(seed)
    resume = resume and checkpoint_dir is not None
    am.fit(loader, 1, resume=resume)
    am.branch_out()
    am.finetune(loader, 1, resume=resume)
    return am


def state_digest(module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's CPU threads set to ``n`` inside the block, restored after: tiny networks on a shared
    2-core machine, where thread hand-off costs more than it saves (the tests' one_thread fixtures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------- interruption harness (resume tests)

class Interrupt(Exception):
    """What :class:`FailingAt` raises: an interruption in the middle of a run that a test catches."""


class FailingAt:
    """``dataset`` that raises :class:`Interrupt` when item number ``at`` (counted over the whole
    run, every epoch and probe read included) is fetched; other attributes are the dataset's."""

    def __init__(self, dataset, at: int):
        self.dataset, self.at, self.fetched = dataset, at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.at:
            raise Interrupt
        return self.dataset[i]

    def __getattr__(self, name):  # num_classes, tasks...: the wrapped data set's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def checkpoint_step(path):
    """The step of the mid-phase checkpoint at ``path`` (None: none yet, between phases, or a file
    being replaced; safe while the writer runs, whose os.replace swaps whole files)."""
    from pyamalgam.engine import load_checkpoint

    try:
        return load_checkpoint(path)[1].get("step")
    except (FileNotFoundError, ValueError):
        return None


def kill_9_when(proc, ready, stderr_path, what: str, timeout: float = 120.0, poll: float = 0.01) -> None:
    """SIGKILL the child ``proc`` as soon as ``ready()`` holds (e.g. a checkpoint far enough in), and
    always reap it; the test fails if the child exits first (showing its stderr) or if nothing is
    ready within ``timeout`` seconds (``what`` says what was awaited)."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, Path(stderr_path).read_text()
            assert time.monotonic() < deadline, f"{what} after {timeout:g} s"
            time.sleep(poll)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

"""Helpers for pyamalgam's own tests and benchmarks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
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


class TensorItems(torch.utils.data.Dataset):
    """A data set of dict items: item i is ``{name: tensor[i]}`` over ``fields`` (tensors that share
    their first dimension); ``delay`` seconds per item slow a run down to be killed (the resume
    tests). The tests' toy data sets build their tensors and hand them to this."""

    def __init__(self, fields: dict, delay: float = 0.0):
        if len({len(v) for v in fields.values()}) != 1:
            raise ValueError(f"fields must share their first dimension, got "
                             f"{[tuple(v.shape) for v in fields.values()]}")
        self.fields, self.delay = dict(fields), delay

    def __len__(self):
        return len(next(iter(self.fields.values())))

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return {name: v[i] for name, v in self.fields.items()}


class _Images(TensorItems):
    """Random images as dict batches."""

    def __init__(self, n: int, seed: int, delay: float):
        self.images = torch.rand(n, 3, 32, 40, generator=torch.Generator().manual_seed(seed))
        super().__init__({"image": self.images}, delay)


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


def assert_compiled_matches(fn, reference, args, backend: str, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``torch.compile(fn, fullgraph=True, backend=backend)`` on ``args`` (tensors) gives the value
    of ``reference`` (the eager float64 / plain-PyTorch version) and the same gradient for every
    argument; each side runs on copies of ``args`` that require grad (``fn`` returns a scalar)."""
    torch._dynamo.reset()
    mine, theirs = ([a.detach().clone().requires_grad_() for a in args] for _ in range(2))
    out = torch.compile(fn, fullgraph=True, backend=backend)(*mine)
    out.backward()
    expected = reference(*theirs)
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


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


def kill_9_then_resume(script: str, folder, helpers, *, at: int, total: int, delay: float, env: dict,
                       timeout: float = 300.0) -> tuple:
    """A trainer's ``kill -9`` resume test: (the step the first run was killed at, the resumed
    run's result).

    ``script`` is the child's Python source; its arguments are the run folder, ``helpers`` (a
    folder for ``sys.path``: the tests' shared cases) and a delay in seconds per data item. It
    trains ``total`` steps into the run folder with a checkpoint after every step and writes
    ``result.json`` there when done. The first run, slowed down by ``delay``, is killed with
    SIGKILL once its checkpoint reaches step ``at``; the test fails unless it died there, inside
    the run (``at <= step < total``, no result). The second run, at full speed, resumes.
    """
    folder = Path(folder)
    child, out, stderr = folder / "child.py", folder / "run", folder / "stderr.txt"
    child.write_text(script)
    out.mkdir()
    cmd = [sys.executable, "-P", str(child), str(out), str(helpers)]
    env = {**env, "OMP_NUM_THREADS": "1"}
    with open(stderr, "w") as err:
        proc = subprocess.Popen([*cmd, str(delay)], env=env, stderr=err, cwd=folder)
    checkpoint = out / "last.safetensors"
    kill_9_when(proc, lambda: (checkpoint_step(checkpoint) or 0) >= at, stderr, f"no checkpoint after step {at}",
                timeout=timeout)
    killed_at = checkpoint_step(checkpoint)
    assert proc.returncode == -signal.SIGKILL, f"the child ended with {proc.returncode}, not by SIGKILL"
    assert at <= killed_at < total and not (out / "result.json").exists(), f"killed at step {killed_at} of {total}"
    done = subprocess.run([*cmd, "0"], env=env, cwd=folder, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return killed_at, json.loads((out / "result.json").read_text())


# ----------------------------------------------------------------- torchrun harness (DDP tests)

def gloo_available() -> bool:
    """torch.distributed with the gloo backend (what the CPU DDP tests run on)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def rewrite_model_record(src, dst, edit) -> Path:
    """Copy the model file ``src`` to ``dst`` with its JSON record changed by ``edit(record)`` (in
    place) and the weights untouched: how the tests forge a tampered or foreign model file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .models import serialize

    with safe_open(str(src), "pt") as f:
        record = json.loads(f.metadata()[serialize.META_KEY])
    edit(record)
    save_file(load_file(str(src)), str(dst), metadata={serialize.META_KEY: json.dumps(record)})
    return Path(dst)


def hide_package(monkeypatch, package: str) -> None:
    """From now on (until ``monkeypatch`` undoes it) importing ``package`` or a submodule of it
    fails as if it were not installed: how the tests reach the "pip install ..." errors."""
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ModuleNotFoundError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)


#: The first lines of a :func:`run_torchrun` script whose first argument after the folder is the
#: test's own folder (its ``_*_cases`` helpers become importable): one thread per rank, and the
#: gloo group up before anything (a DistributedSampler) asks for the world size. The script then
#: ends with ``rank_result(out, {...})``.
RANK_PREAMBLE = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
import torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
from pyamalgam._testing import rank_result
out, rank = sys.argv[1], dist.get_rank()
"""


def rank_result(folder, result: dict) -> None:
    """Write this rank's ``result`` as ``folder/result{rank}.json`` (what :func:`run_torchrun`
    returns) and take the process group down."""
    import torch.distributed as dist

    with open(os.path.join(folder, f"result{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run_torchrun(script: str, folder, *args, env: dict, nproc: int = 2, timeout: float = 300.0) -> list:
    """Run ``script`` (Python source) on ``nproc`` CPU processes under ``torchrun --standalone``
    in ``folder``; its arguments are ``folder`` and ``args``. Rank r writes
    ``folder/result{r}.json``; the results are returned in rank order. The test fails (with the
    ranks' output) unless every rank succeeds."""
    folder = Path(folder)
    path = folder / "ranks.py"
    path.write_text(script)
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(path), str(folder), *map(str, args)]
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=folder, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((folder / f"result{r}.json").read_text()) for r in range(nproc)]


def record_step_terms(trainer) -> list:
    """From now on, each step's terms as this process computes them (floats, before the engine
    averages them over ranks), in a list that grows as the trainer runs; the trainer's
    ``_step_loss`` (what the engine calls each step) is wrapped."""
    seen = []
    step_loss = trainer._step_loss

    def recording(trainable, batch):
        loss, terms = step_loss(trainable, batch)
        seen.append({k: float(v) for k, v in terms.items()})
        return loss, terms

    trainer._step_loss = recording
    return seen


def assert_logged_mean_over_ranks(logged: dict, per_rank: list, window: int) -> None:
    """``logged`` (a run's logged losses) is what the engine documents: each term's mean over the
    phase's last ``window`` steps (the last epoch) on each rank, averaged over the ranks
    (``per_rank``: :func:`record_step_terms` of every rank); and the ranks did see different data."""
    import pytest

    means = [{k: sum(s[k] for s in steps[-window:]) / window for k in steps[-1]} for steps in per_rank]
    assert set(logged) == set(means[0]), (sorted(logged), sorted(means[0]))
    assert means[0] != means[1], "the ranks computed the same terms: they did not read different batches"
    expected = {k: sum(m[k] for m in means) / len(means) for k in logged}
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7)

"""The demo's configuration: sizes and budgets (:class:`DemoConfig`) and the presets."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os

import torch

from ..engine import OPTIMIZERS
from ..teachers import MAX_DEPTH, MAX_WIDTH

__all__ = ["CACHE_VERSION", "SEED_OFFSETS", "TASKS", "DemoConfig", "check_field", "demo_config"]

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
    block_steps: int = 128        # per block of the block-wise amalgamation (Step 2)
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
    # extra Table 1 rows "TargetNet, Eq. 7 + PI"...: comma-separated term sets ("pi,pa,pi+pa"),
    # each one more block-wise fit of TargetNet-2 with those Amalgamator terms (docs/demo.md)
    structured_rows: str = ""
    # lambda of each task in Eq. 6 / 8 / 9 ("depth=3"; unnamed tasks 1): the paper fixes no values
    task_weights: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resolution"] = list(self.resolution)
        return d

    def lambdas(self, names) -> dict:
        """The Amalgamator's ``weights`` for the outputs ``names``: the tasks ``task_weights``
        names among them (the others keep lambda = 1)."""
        weights = {k: float(v) for k, v in (kv.split("=") for kv in filter(None, self.task_weights.split(",")))}
        return {k: w for k, w in weights.items() if k in names}

    def __post_init__(self) -> None:
        self.validate()  # DemoConfig(...) and dataclasses.replace(...) never hold a bad value

    def validate(self) -> DemoConfig:
        """Check (and normalise: ints as int, reals as float, resolution as a tuple) every field,
        then the fields that constrain each other; raise before any work on a setting the
        networks cannot take. TypeError for a wrong type, ValueError for a wrong value; both
        name the field."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        divisor = 2 ** self.depth  # every pooling stage halves the image (SegNet's max-unpool needs it exact)
        if any(s % divisor for s in self.resolution):
            raise ValueError(f"demo config: resolution {self.resolution[0]}x{self.resolution[1]} must be two "
                             f"multiples of 2^depth = {divisor} (depth {self.depth})")
        if self.test_size < self.figure_samples:
            raise ValueError(f"demo config: test_size ({self.test_size}) < figure_samples ({self.figure_samples})")
        return self


# ------------------------------------------------------------------------- field checks
# One rule per field: (value) -> normalised value, raising TypeError/ValueError that names the
# field. Used by DemoConfig.validate (the Python API) and by the CLI's --set (check_field).

def _integer(minimum: int, maximum: int | None = None):
    def rule(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # 2.0 is not a step count
            raise TypeError(f"demo config: {name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ValueError(f"demo config: {name} must be an int {bound}, got {value}")
        return value
    return rule


def _real(maximum: float | None = None):
    """A finite real number > 0 (and <= ``maximum``): nan and inf pass no comparison-based check."""
    def rule(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"demo config: {name} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not (math.isfinite(value) and value > 0 and (maximum is None or value <= maximum)):
            bound = "> 0" if maximum is None else f"in (0, {maximum:g}]"
            raise ValueError(f"demo config: {name} must be a finite number {bound}, got {value}")
        return value
    return rule


def _flag(name, value):
    if not isinstance(value, bool):  # 0/1 or "false" would be accepted by `if value:` with surprises
        raise TypeError(f"demo config: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _resolution(name, value):
    if isinstance(value, (list, torch.Size)):
        value = tuple(value)
    if not (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"demo config: {name} must be a pair (H, W) of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"demo config: {name} must be a pair (H, W) of positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _optimizer(name, value):
    if value not in OPTIMIZERS:
        raise ValueError(f"demo config: {name} must be one of {sorted(OPTIMIZERS)}, got {value!r}")
    return value


def _data(name, value):
    if not isinstance(value, str):
        raise TypeError(f"demo config: {name} must be a string, got {type(value).__name__} {value!r}")
    kind, sep, root = value.partition(":")
    if not (value == "synthetic" or (kind in ("nyuv2", "cityscapes") and sep and root)):
        raise ValueError(f"demo config: {name} must be 'synthetic', 'nyuv2:ROOT' or 'cityscapes:ROOT', "
                         f"got {value!r}")
    return value


#: the Amalgamator's structured terms a Table 1 row may add (pyamalgam.amalgamation.structured)
STRUCTURED_TERMS = ("pi", "pa", "cwd")


def _structured_rows(name, value):
    """A comma-separated string (or a sequence) of rows, each term names joined by '+', as the
    canonical string: lower case, no spaces, terms in STRUCTURED_TERMS order, no repeated row."""
    if isinstance(value, (list, tuple)):
        value = ",".join(value) if all(isinstance(v, str) for v in value) else value
    if not isinstance(value, str):
        raise TypeError(f"demo config: {name} must be a string like 'pi,pa,pi+pa', got {type(value).__name__} "
                        f"{value!r}")
    rows = []
    for row in filter(None, (r.strip().lower() for r in value.split(","))):
        terms = [t.strip() for t in row.split("+")]
        bad = [t for t in terms if t not in STRUCTURED_TERMS]
        if bad or len(set(terms)) != len(terms):
            raise ValueError(f"demo config: {name}: row {row!r} must join distinct terms of {list(STRUCTURED_TERMS)} "
                             f"with '+' (e.g. 'pi,pa,pi+pa')")
        canonical = "+".join(t for t in STRUCTURED_TERMS if t in terms)
        if canonical in rows:
            raise ValueError(f"demo config: {name}: row {canonical!r} is given twice")
        rows.append(canonical)
    return ",".join(rows)


def _task_weights(name, value):
    """``"depth=3"`` (or a mapping) as the canonical string: tasks of TASKS in that order, each
    a finite lambda > 0; a lambda of 1 is dropped (it is the default)."""
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if not isinstance(value, str):
        raise TypeError(f"demo config: {name} must be a string like 'depth=3', got {type(value).__name__} {value!r}")
    weights = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        task, sep, number = item.partition("=")
        task = task.strip().lower()
        if not sep or task not in TASKS or task in weights:
            raise ValueError(f"demo config: {name}: {item!r} must be TASK=LAMBDA with a task of {list(TASKS)}, "
                             f"each at most once (e.g. 'depth=3')")
        try:
            weights[task] = _real()(f"{name}[{task}]", float(number))
        except ValueError:
            raise ValueError(f"demo config: {name}[{task}] must be a finite number > 0, got {number.strip()!r}") from None
    return ",".join(f"{t}={weights[t]:g}" for t in TASKS if weights.get(t, 1.0) != 1.0)


_RULES = {
    "resolution": _resolution, "width": _real(MAX_WIDTH), "depth": _integer(1, MAX_DEPTH),
    "num_bins": _integer(2), "train_size": _integer(1), "unlabelled_size": _integer(1), "test_size": _integer(1),
    "batch_size": _integer(1), "teacher_steps": _integer(1), "teacher_lr": _real(), "block_steps": _integer(1),
    "finetune_steps": _integer(1), "finetune_variants": _flag, "amalgam_lr": _real(),
    "amalgam_optimizer": _optimizer, "probe_images": _integer(1),
    "target_cache_mb": _integer(1),  # the stages precompute teacher targets: a cache is needed
    "eval_batch": _integer(1), "figure_samples": _integer(1), "num_workers": _integer(0),
    "channels_last": _flag, "data": _data, "structured_rows": _structured_rows,
    "task_weights": _task_weights,
}


def check_field(name: str, value):
    """``value`` for the DemoConfig field ``name``, checked on its own and normalised (the
    checks between fields are :meth:`DemoConfig.validate`'s)."""
    if name not in _RULES:
        raise ValueError(f"demo config: unknown field {name!r}; fields: {sorted(_RULES)}")
    return _RULES[name](name, value)


def demo_config(quick: bool = False, device="cpu", **overrides) -> DemoConfig:
    """The preset for ``--quick`` / full runs on a CPU or a GPU (``device`` None: cuda if
    available); keywords override fields. The CPU presets fit 2 cores: ``quick`` in under 3 min,
    the full one in under 15 min (measured stage times: docs/demo.md)."""
    gpu = _default_device(device).type == "cuda"
    if gpu and quick:
        cfg = DemoConfig(resolution=(128, 160), width=1 / 4, train_size=512, unlabelled_size=1024, test_size=100,
                         batch_size=16, teacher_steps=1000, block_steps=60, finetune_steps=500, finetune_variants=True,
                         num_workers=4, channels_last=False, structured_rows="pi,pa,pi+pa")
    elif gpu:
        cfg = DemoConfig(resolution=(192, 256), width=1 / 2, num_bins=64, train_size=1000, unlabelled_size=4000,
                         test_size=200, batch_size=16, teacher_steps=3000, teacher_lr=1e-3, block_steps=250,
                         finetune_steps=2000, finetune_variants=True, amalgam_lr=1e-3, eval_batch=32,
                         figure_samples=4, num_workers=min(8, os.cpu_count() or 1), channels_last=False,
                         structured_rows="pi,pa,pi+pa")
    elif quick:  # the README's command on a 2-core CPU: every stage, small images, few steps
        cfg = DemoConfig(resolution=(64, 64), num_bins=16, train_size=320, unlabelled_size=320, test_size=64,
                         teacher_steps=250, teacher_lr=3e-3, block_steps=40, finetune_steps=300, probe_images=16,
                        task_weights="depth=3")  # at this budget depth lags with lambda 1 (docs/demo.md)
    else:
        cfg = DemoConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DemoConfig)}
    if unknown:
        raise ValueError(f"demo config: unknown field(s) {sorted(unknown)}")
    return dataclasses.replace(cfg, **overrides).validate()


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

"""The demo's configuration: sizes and budgets (:class:`DemoConfig`) and the presets."""
from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["DemoConfig", "demo_config", "SEED_OFFSETS", "TASKS", "CACHE_VERSION"]

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

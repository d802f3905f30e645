"""The training machinery every trainer shares (see docs/engine.md).

- :class:`Engine` — the loop over one phase (steps, epochs, poly LR), mid-phase checkpoints with
  bit-identical resume, DDP wrapping and BatchNorm sync, tqdm and TensorBoard;
- :class:`PhaseState` — what a checkpoint holds to continue a phase; :class:`RunLog` — JSON lines;
- :func:`save_checkpoint` / :func:`load_checkpoint` — atomic safetensors files;
- :class:`TargetCache` — teacher targets kept per image;
- :func:`get_rng_state` / :func:`set_rng_state` — every generator a step can draw from;
- :class:`NonFiniteLossError` — a phase stopped at its first NaN/inf loss (finite.py);
- :class:`CorruptFileError` and the schemas of untrusted metadata (schema.py);
- :class:`FolderLock` — one run per folder (lock.py).

A trainer (the Amalgamator, the teacher trainer) is its objective on top of these.
"""
from .cache import TargetCache
from .checkpoint import (check_tensors, expected_state, load_checkpoint, load_tensors, pack_state, save_checkpoint,
                         unpack_state)
from .distributed import all_reduce_mean, init_distributed, module_device, sync_buffers, wrap_ddp
from .finite import NonFiniteLossError, check_weights
from .lock import FolderInUseError, FolderLock
from .loop import (OPTIMIZERS, Engine, PhaseResult, PhaseState, PolyLR, batch_images, batch_len, check_optimizer,
                   make_optimizer, plan_steps)
from .rng import get_rng_state, set_rng_state
from .runlog import RunLog
from .schema import CorruptFileError

__all__ = [
    "Engine", "PhaseState", "PhaseResult", "PolyLR", "OPTIMIZERS", "check_optimizer", "make_optimizer", "plan_steps",
    "batch_images", "batch_len", "RunLog",
    "save_checkpoint", "load_checkpoint", "pack_state", "unpack_state", "TargetCache",
    "get_rng_state", "set_rng_state", "init_distributed", "wrap_ddp", "sync_buffers", "all_reduce_mean",
    "module_device", "NonFiniteLossError", "check_weights", "CorruptFileError", "FolderLock", "FolderInUseError",
    "load_tensors", "check_tensors", "expected_state",
]

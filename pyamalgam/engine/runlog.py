"""The run log of a trainer: JSON lines (one record per finished phase), TensorBoard, history.

Only rank 0 writes. ``history`` holds every record of this run (and of the runs it resumed, once
a trainer restores it from a checkpoint), so a trainer can checkpoint its own log.

The file describes this run once: it always holds ``history``, nothing else. The first write
of a log starts the file afresh (a previous run's records in the folder are not this run's),
and :meth:`RunLog.restore` (what a trainer calls when it resumes from a checkpoint) rewrites it
to the checkpoint's history, so records that a killed run wrote after its last checkpoint, and
that the resumed run writes again, appear once. Later writes append.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .._io import atomic_write

__all__ = ["RunLog"]


class RunLog:
    """JSON lines in ``log_dir / name`` (None: in memory only) holding ``history``; TensorBoard
    if installed."""

    def __init__(self, log_dir=None, name: str = "train.jsonl", rank: int = 0):
        self.dir = Path(log_dir) if log_dir is not None else None
        self.name, self.rank = name, rank
        self.history: list = []
        self._tb = None
        self._synced = False  # the file holds exactly ``history`` (after the first write or a restore)

    @property
    def path(self) -> Optional[Path]:
        return None if self.dir is None else self.dir / self.name

    def write(self, record: dict, step: Optional[int] = None) -> None:
        """Append ``record``; its ``losses`` (name -> value) also go to TensorBoard at ``step``."""
        self.history.append(record)
        if self.dir is None or self.rank != 0:
            return
        if not self._synced:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        tb = self.tensorboard()
        if tb is not None and step is not None and "losses" in record:
            for name, value in record["losses"].items():
                tb.add_scalar(f"{record['event']}_loss/{name}", value, step)
            tb.flush()

    def restore(self, records: list) -> None:
        """``history`` := ``records`` (a checkpoint's), and the file rewritten to hold just them."""
        self.history[:] = list(records)
        if self.dir is not None and self.rank == 0:
            self._rewrite()

    def _rewrite(self) -> None:
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self._synced = True

    def scalar(self, tag: str, value: float, step: int) -> None:
        tb = self.tensorboard()
        if tb is not None:
            tb.add_scalar(tag, value, step)

    def tensorboard(self):
        """A SummaryWriter in ``log_dir/tensorboard`` (None without a log dir, off rank 0, or
        when TensorBoard is not installed: it is optional)."""
        if self._tb is None and self.dir is not None and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        return self._tb or None

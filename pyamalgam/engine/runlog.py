"""The run log of a trainer: JSON lines (one record per finished phase), TensorBoard, history.

Only rank 0 writes. ``history`` holds every record of this run (and of the runs it resumed, once
a trainer restores it from a checkpoint), so a trainer can checkpoint its own log.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["RunLog"]


class RunLog:
    """Append-only log in ``log_dir / name`` (None: in memory only); TensorBoard if installed."""

    def __init__(self, log_dir=None, name: str = "train.jsonl", rank: int = 0):
        self.dir = Path(log_dir) if log_dir is not None else None
        self.name, self.rank = name, rank
        self.history: list = []
        self._tb = None

    def write(self, record: dict, step: Optional[int] = None) -> None:
        """Append ``record``; its ``losses`` (name -> value) also go to TensorBoard at ``step``."""
        self.history.append(record)
        if self.dir is None or self.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / self.name, "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self.tensorboard()
        if tb is not None and step is not None and "losses" in record:
            for name, value in record["losses"].items():
                tb.add_scalar(f"{record['event']}_loss/{name}", value, step)
            tb.flush()

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

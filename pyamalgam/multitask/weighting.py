"""Task weighting of the multi-task loss ``sum_t w_t L_t``.

* ``"equal"`` (the default, seed 002's baselines): w_t = 1.
* ``"uncertainty"`` (an extra; Kendall, Gal & Cipolla, CVPR 2018, Eq. 7 in the simplified form
  of their practice): ``sum_t exp(-s_t) L_t + s_t`` with a learnt ``s_t = log sigma_t^2`` per
  task (initialised to 0, i.e. equal weights). The paper's factor 1/2 for regression tasks is
  left out (one form for every task; it rescales s_t only).
* ``"dwa"`` (an extra; Liu, Johns & Davison, CVPR 2019, Eq. 7, Dynamic Weight Average):
  ``w_t = K exp(r_t / T) / sum_i exp(r_i / T)``, ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``, T = 2, where
  Lbar are the mean losses of the previous two *periods* (the paper: epochs; here ``period``
  steps, by default one epoch); w_t = 1 for the first two periods. Its running sums are
  buffers, so they are checkpointed and a resumed run weights as the uninterrupted one. Under
  torchrun the losses it averages are the mean over the ranks (one all-reduce a step), so every
  rank keeps the same sums and the weights follow the whole batch, not rank 0's share of it.

Both extras need losses >= 0 (the trainer's task losses are; normals are 1 - cos).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskWeighting", "WEIGHTINGS"]

WEIGHTINGS = ("equal", "uncertainty", "dwa")


class TaskWeighting(nn.Module):
    """``forward(losses: task -> scalar) -> (total, task -> weight used)``; see the module docstring."""

    def __init__(self, tasks, kind: str = "equal", *, period: int = 1, temperature: float = 2.0):
        super().__init__()
        if kind not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"the DWA period must be a positive int (steps), got {period!r}")
        if not temperature > 0:
            raise ValueError(f"the DWA temperature must be > 0, got {temperature!r}")
        self.tasks, self.kind, self.period, self.temperature = list(tasks), kind, period, float(temperature)
        k = len(self.tasks)
        if kind == "uncertainty":
            self.log_var = nn.Parameter(torch.zeros(k))
        if kind == "dwa":
            self.register_buffer("last", torch.zeros(2, k, dtype=torch.float64))  # Lbar(k-2), Lbar(k-1)
            self.register_buffer("running", torch.zeros(k, dtype=torch.float64))
            self.register_buffer("counts", torch.zeros(2, dtype=torch.int64))  # steps in period, periods done

    def weights(self) -> torch.Tensor:
        k = len(self.tasks)
        if self.kind == "uncertainty":
            return torch.exp(-self.log_var.detach())
        if self.kind == "dwa" and int(self.counts[1]) >= 2:
            r = self.last[1] / self.last[0].clamp_min(1e-12)
            return (k * torch.softmax(r / self.temperature, dim=0)).float()
        return torch.ones(k)

    def forward(self, losses: dict):
        values = torch.stack([losses[t].float() for t in self.tasks])
        w = self.weights()  # from the periods before this step
        if self.kind == "uncertainty":
            total = (torch.exp(-self.log_var) * values + self.log_var).sum()
        else:
            total = (w.to(values.device) * values).sum()
        if self.kind == "dwa" and self.training:
            self._observe(values.detach())
        return total, dict(zip(self.tasks, w.tolist()))

    @torch.no_grad()
    def _observe(self, values) -> None:
        values = _mean_over_ranks(values.double())
        self.running += values.to(self.running.device)
        self.counts[0] += 1
        if int(self.counts[0]) == self.period:
            self.last[0] = self.last[1]
            self.last[1] = self.running / self.period
            self.running.zero_()
            self.counts[0] = 0
            self.counts[1] += 1

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tasks={self.tasks}" + (f", period={self.period}" if self.kind == "dwa" else "")


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the processes of a torchrun job (itself outside one). DDP would
    otherwise hand every rank rank 0's buffers at the next forward (``broadcast_buffers``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()

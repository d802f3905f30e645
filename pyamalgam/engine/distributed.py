"""torchrun data parallelism: process-group setup, DDP wrapping, BatchNorm sync, mean of logs.

One process per device (``torchrun --nproc_per_node=K``); every rank holds the same weights and
only rank 0 writes checkpoints and logs. Single-process runs pass through untouched.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "wrap_ddp", "sync_buffers", "all_reduce_mean", "module_device"]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes (WORLD_SIZE > 1)."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_ddp(module: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    if world_size == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_buffers(module: nn.Module, world_size: int) -> None:
    """Give every rank rank 0's BatchNorm statistics (what rank 0 checkpoints).

    DDP broadcasts buffers at the start of each forward, but the last forward then updates them
    with each rank's own batch: without this the ranks would end a phase apart.
    """
    if world_size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def all_reduce_mean(sums: dict, device: torch.device, world_size: int) -> dict:
    """The mean over ranks of each value (float64 scalars)."""
    if world_size == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, (flat / world_size).unbind()))


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")

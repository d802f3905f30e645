"""Argument checks shared by the operators: errors name the argument and what was expected."""
from __future__ import annotations

import torch

from .._checks import check_float, check_int
from .._extension import has_cuda_kernels

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim=None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(f"{name} is on {t.device}; pyamalgam's operators run on cpu and cuda")
    if t.device.type == "cuda" and not has_cuda_kernels():
        raise NotImplementedError(
            f"{name} is on {t.device} but this pyamalgam build has no CUDA kernels "
            "(see pyamalgam.build_info()); rebuild with a CUDA-enabled torch and nvcc available"
        )


#: The dtypes the fused kernels take.
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def map_any_device(name: str, t) -> None:
    """A 4-d floating tensor, on any device: what :func:`tensor` checks less its device rule, for
    the ops with a device-generic path (they need no CUDA kernel)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def same(attr: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Check that every tensor in ``others`` has the same ``attr`` (device or dtype) as ``ref``."""
    want = getattr(ref, attr)
    for name, t in others.items():
        got = getattr(t, attr)
        if got != want:
            raise ValueError(f"{name} must have the same {attr} as {ref_name} ({want}), got {got}")


def dims(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def positive_float(name: str, value) -> float:
    return check_float(name, value, positive=True)


def positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels write their full-size outputs in (mirrors csrc/common.h)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

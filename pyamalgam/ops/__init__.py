"""Fused operators of the method, as PyTorch custom operators (``torch.ops.pyamalgam.*``).

Each has a plain-PyTorch twin with the same signature in :mod:`pyamalgam.ops.reference`, the
float64 ground truth the tests compare against.
"""
from .. import _extension  # noqa: F401  (loads the kernels and checks the torch version)
from . import reference
from .channel_coding import channel_coding
from .channel_wise import channel_wise_loss
from .depth import si_depth_loss, soft_argmax_depth
from .pairwise import pairwise_affinity_loss
from .pairwise_frames import pairwise_frames_loss
from .pairwise_local import pairwise_local_loss

__all__ = [
    "channel_coding", "soft_argmax_depth", "si_depth_loss", "pairwise_affinity_loss", "pairwise_local_loss", "channel_wise_loss",
    "pairwise_frames_loss", "reference",
]

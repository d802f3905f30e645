"""Knowledge amalgamation (paper 001, §5): block-wise training, branch-out, TargetNet.

The training machinery under it (loop, resume, DDP, logs, checkpoints, target cache) is
:mod:`pyamalgam.engine`; its checkpoint functions and cache are re-exported here.
"""
from ..engine import PolyLR, TargetCache, load_checkpoint, save_checkpoint
from .amalgamator import Amalgamator
from .blockwise import BlockStep, FrozenPass, feature_losses, frozen_pass, prediction_losses, weighted_sum
from .branch import Branch, TargetNet, assemble_target_net, decoder_candidates, select_branch_points

__all__ = [
    "Amalgamator",
    "PolyLR",
    "TargetNet",
    "Branch",
    "TargetCache",
    "assemble_target_net",
    "select_branch_points",
    "decoder_candidates",
    "BlockStep",
    "FrozenPass",
    "frozen_pass",
    "prediction_losses",
    "feature_losses",
    "weighted_sum",
    "save_checkpoint",
    "load_checkpoint",
]

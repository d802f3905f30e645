"""Knowledge amalgamation (paper 001, §5): block-wise training, branch-out, TargetNet, resume."""
from .amalgamator import Amalgamator, PolyLR
from .blockwise import BlockStep, FrozenPass, feature_losses, frozen_pass, prediction_losses, weighted_sum
from .branch import Branch, TargetNet, assemble_target_net, decoder_candidates, select_branch_points
from .cache import TargetCache
from .checkpoint import load_checkpoint, save_checkpoint

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

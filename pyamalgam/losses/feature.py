"""The feature-distance objective of Eq. 5 (paper 001, §5.1.2)."""
from __future__ import annotations

from typing import Mapping, Union

import torch

__all__ = ["feature_loss"]


def feature_loss(projected: torch.Tensor, target: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """One term of Eq. 5: ``||F_u^n projected - F_teacher^n||^2``, as a mean over elements.

    The mean (not the sum) keeps a block's term independent of its resolution and width; the
    per-task lambda of Eq. 5 still has to absorb the features' magnitude, which is why the paper
    (and the default of the Amalgamator) prefers Eq. 6. A multi-output teacher whose streams have
    already branched at block n gives a mapping: the distance is averaged over its streams.
    """
    if isinstance(target, Mapping):
        return torch.stack([feature_loss(projected, t) for t in target.values()]).mean()
    if projected.shape != target.shape:
        raise ValueError(f"projected features {tuple(projected.shape)} and teacher features {tuple(target.shape)} differ in shape")
    return (projected.float() - target.float()).pow(2).mean()

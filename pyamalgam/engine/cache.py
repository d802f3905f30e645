"""Teacher targets kept per image, so a teacher predicts each image once per run.

Eq. 6 supervises every block-n step with the teachers' own predictions on the batch. The
teachers are frozen and in eval mode, so an image's targets are the same in all N blocks, every
epoch and the fine-tuning: without a cache the teachers' full forward passes are repeated
N * epochs times per image, and they are most of a step's forward compute. Images are keyed by
a hash of their bytes, so shuffling and ``DistributedSampler`` still hit; random augmentation
makes new images, which simply miss.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

__all__ = ["TargetCache"]


class TargetCache:
    """Per-image teacher targets up to ``max_bytes`` (then new images are no longer stored).

    Targets are stored on the CPU; a hit needs every image of the batch, so a batch is either
    served from the cache or computed as a whole, as without a cache.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._store: dict = {}

    def __len__(self) -> int:
        return len(self._store)

    def keys(self, x: torch.Tensor) -> list:
        """One key per image of batch ``x``: a hash of its dtype, shape and bytes."""
        images = x.detach().to("cpu").contiguous()
        head = f"{images.dtype}{tuple(images.shape[1:])}".encode()
        return [hashlib.blake2b(head + im.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
                for im in images]

    def get(self, keys: list, device) -> Optional[dict]:
        """Output name -> batched targets if every image is cached, else None."""
        rows = [self._store.get(k) for k in keys]
        if not rows or any(r is None for r in rows):
            self.misses += 1
            return None
        self.hits += 1
        return {name: torch.stack([r[name] for r in rows]).to(device, non_blocking=True) for name in rows[0]}

    def put(self, keys: list, targets: dict) -> None:
        """Remember a batch's targets, image by image, while the budget lasts."""
        per_image = sum(t[0].numel() * t.element_size() for t in targets.values())
        for i, key in enumerate(keys):
            if key in self._store:
                continue
            if self.bytes + per_image > self.max_bytes:
                return
            # a copy: a row must not keep the whole batch's storage alive
            self._store[key] = {name: t[i].detach().to("cpu", copy=True) for name, t in targets.items()}
            self.bytes += per_image

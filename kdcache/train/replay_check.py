"""The replay proof of `distill --online-teacher`: the teacher, recomputed on each drawn view as the training
stream replays it (mixed views included), against the outputs the cache holds for that view. A cosine near 1
says the student sees the pixels the teacher saw at extraction."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcache.cache.sparse import rebuild_from, sparsify


class ReplayCosine:
    """Per drawn view, the cosine between the cached and the recomputed features (and logits, when `logits`):
    the least and the mean over every view of the run's steps in this process (rank 0's share under DDP).
    With `topk` (a cache of sparse logits), the recomputed logits are stored and rebuilt as the cache's were,
    so both sides are the same log-probabilities."""

    def __init__(self, logits: bool, topk: int = 0):
        self.logits, self.topk = logits, topk
        self.least, self.total, self.count = math.inf, 0.0, 0

    def add(self, online: dict, features: torch.Tensor | None, logits: torch.Tensor | None, head) -> None:
        """`online`: the teacher's outputs on the batch; `features`, `logits`: the cached ones; `head`: the fixed
        head that turns the online features into logits (None: the teacher's own)."""
        pairs = [] if features is None else [(online["features"], features)]
        if self.logits and logits is not None:
            z = head(online["features"]) if head is not None else online.get("logits")
            if z is not None:
                pairs.append((self._as_cached(z), logits))
        for got, cached in pairs:
            cos = F.cosine_similarity(got.detach().float(), cached.detach().float(), dim=1)
            self.least = min(self.least, float(cos.min()))
            self.total += float(cos.sum())
            self.count += len(cos)

    def _as_cached(self, z: torch.Tensor) -> torch.Tensor:
        """Recomputed logits in the form the cache's reader returns them."""
        if not self.topk:
            return z
        dense = z.detach().float().cpu().numpy()
        return torch.from_numpy(rebuild_from(sparsify(dense, self.topk), dense.shape[-1])).to(z.device)

    def summary(self) -> dict | None:
        if not self.count:
            return None
        return {"min": self.least, "mean": self.total / self.count, "compared": self.count}

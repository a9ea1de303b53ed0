"""The replay proof of `distill --online-teacher`: the teacher, recomputed on each drawn view as the training
stream replays it (mixed views included), against the outputs the cache holds for that view. A cosine near 1
says the student sees the pixels the teacher saw at extraction."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcache.cache.sparse import rebuild_from, sparsify
from kdcache.cache.store import dequantize_int8, quantize_int8


class ReplayCosine:
    """Per drawn view, the cosine between the cached and the recomputed features (and logits, when `logits`):
    the least and the mean over every view of the run's steps in this process (rank 0's share under DDP).
    With `topk` (a cache of sparse logits), the recomputed logits are stored and rebuilt as the cache's were,
    so both sides are the same log-probabilities. With `int8` (a cache of int8 features), the recomputed features
    are rounded to int8 as the cache's were before they are compared or go through the head: the cache's probe
    logits were computed from the rounded features, and a head amplifies the rounding (a cosine of 0.99 between
    logits of the same pixels), which would hide what the proof measures, the replay."""

    def __init__(self, logits: bool, topk: int = 0, int8: bool = False):
        self.logits, self.topk, self.int8 = logits, topk, int8
        self.least, self.total, self.count = math.inf, 0.0, 0

    def add(self, online: dict, features: torch.Tensor | None, logits: torch.Tensor | None, head) -> None:
        """`online`: the teacher's outputs on the batch; `features`, `logits`: the cached ones; `head`: the fixed
        head that turns the online features into logits (None: the teacher's own)."""
        stored = self._as_stored(online["features"])
        pairs = [] if features is None else [(stored, features)]
        if self.logits and logits is not None:
            z = head(stored) if head is not None else online.get("logits")
            if z is not None:
                pairs.append((self._as_cached(z), logits))
        for got, cached in pairs:
            cos = F.cosine_similarity(got.detach().float(), cached.detach().float(), dim=1)
            self.least = min(self.least, float(cos.min()))
            self.total += float(cos.sum())
            self.count += len(cos)

    def _as_stored(self, f: torch.Tensor) -> torch.Tensor:
        """Recomputed features as the cache holds them (int8 with a scale per vector, read back as float)."""
        if not self.int8:
            return f
        q, scale = quantize_int8(f.detach().float().cpu().numpy())
        return torch.from_numpy(dequantize_int8(q, scale)).to(device=f.device, dtype=f.dtype)

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

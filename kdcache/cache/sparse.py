"""Sparse logits (--logits-topk K): the stored form, and the one place readers rebuild the distribution.

A view's logits z are stored as the K most probable classes of softmax(z) (indices, in decreasing
probability), their probabilities (float16) and the leftover mass 1 - sum(top-K) (float16). A reader gets
log-probabilities of the distribution that puts the top-K probabilities on their classes and spreads the
leftover evenly over the other C - K classes, normalised: softmax of what it reads is that distribution, so
whatever takes logits (the methods, evaluation, teacher heads) reads a sparse cache unchanged. Imports
cache.format only.
"""
from __future__ import annotations

import numpy as np

from .format import SPARSE_LOGITS, CacheError, Layout, index_dtype

FLOOR = 1e-30  # a probability that underflowed to 0 in float16 reads as this (its logarithm stays finite)


def is_sparse(name: str, lay: Layout) -> bool:
    """`name` is the logits of a cache that stores them sparse (read rebuilt, written sparsified)."""
    return name == "logits" and lay.logits_topk > 0


def as_stored(data: dict[str, np.ndarray], lay: Layout) -> dict[str, np.ndarray]:
    """A shard's arrays as a cache of `lay` stores them: dense logits replaced by their sparse form."""
    if not lay.logits_topk or "logits" not in data:
        return data
    data = dict(data)
    return data | sparsify(data.pop("logits"), lay.logits_topk)


def sparsify(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The stored form of `logits` [..., C]: {logit_index [..., K], logit_prob [..., K], logit_rest [...]}."""
    z = np.asarray(logits, np.float32)
    c = z.shape[-1]
    if not 0 < k < c:
        raise CacheError(f"--logits-topk {k}: must be between 1 and {c - 1} (the classes less one)")
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    # decreasing probability, ties by class index (a stable sort of -p): the same on every machine
    index = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(p, index, axis=-1)
    rest = np.clip(1.0 - top.sum(axis=-1, dtype=np.float64), 0.0, 1.0)
    return {"logit_index": index.astype(index_dtype(c)), "logit_prob": top.astype(np.float16),
            "logit_rest": rest.astype(np.float16)}


def rebuild(index: np.ndarray, prob: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Log-probabilities [..., C] (float32) of the distribution the stored form describes (see the module)."""
    k = index.shape[-1]
    p = np.empty((*index.shape[:-1], num_classes), np.float32)
    p[...] = (np.asarray(rest, np.float32) / (num_classes - k))[..., None]
    np.put_along_axis(p, np.asarray(index, np.int64), np.asarray(prob, np.float32), axis=-1)
    np.maximum(p, FLOOR, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return np.log(p)


def rebuild_from(parts: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    return rebuild(*(parts[n] for n in SPARSE_LOGITS), num_classes)


def nbytes_per_view(k: int, num_classes: int) -> int:
    """Bytes of one view's sparse logits before compression."""
    return k * (np.dtype(index_dtype(num_classes)).itemsize + 2) + 2

"""Self-training of a linear head on cached teacher features: the teacher adapts to unlabelled rows.

Features are cached, so a round costs one L-BFGS fit and no image. A round turns the current
predictions on the unlabelled rows into sharpened, class-balanced soft pseudo-labels and refits the
head on the labelled rows (their labels) plus the unlabelled rows (the pseudo-labels). Evaluation
labels are never read here. Used by CustomKD's customisation phase and by `distill --teacher-adapt`.

Mixed views (mixup, cutmix: kdcache/mixing.py) are left out of every fit and of every mean over a row's
views (`unmixed_views`), rather than fitted with targets mixed by lambda. A mixed view's feature is the
teacher's feature of a blend of two images, and a row's label or pseudo-label speaks of its own image only:
a lambda-mixed target would need the partner's target too, which for an unlabelled partner is a pseudo-label
of other rows that this fit is itself revising, and for a labelled row with an unlabelled partner belongs to
neither the labelled nor the unlabelled part of the fit. The head is a classifier of images, so it learns
from the views that show one image; view 0, the clean view, is never mixed, so every row keeps a view. The
mixed views still reach the student, through the head applied to their features (the teacher's response to
the blend) and the label term that mixes labels by lambda.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heads import fit_probe
from .mixing import mixed_views


def pseudo_targets(logits: np.ndarray, sharpen: float, balance: bool, prior: np.ndarray | None = None) -> np.ndarray:
    """Soft pseudo-labels softmax(logits / sharpen); with `balance`, the mean prediction is aligned to
    `prior` (uniform by default), so one dominant class cannot swallow the unlabelled rows."""
    q = F.softmax(torch.as_tensor(logits, dtype=torch.float32) / sharpen, dim=-1)
    if balance:
        c = q.shape[-1]
        target = torch.full((c,), 1.0 / c) if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        q = q * (target / q.reshape(-1, c).mean(0).clamp_min(1e-8))
        q = q / q.sum(-1, keepdim=True)
    return q.numpy()


def fit_customised_head(feats_l: np.ndarray, labels_l: np.ndarray, feats_u: np.ndarray, targets_u: np.ndarray,
                        num_classes: int, weight_decay: float, unlabelled_weight: float = 1.0,
                        max_iter: int = 100, device=None, init=None) -> tuple[np.ndarray, np.ndarray]:
    """One fit on labelled rows (one-hot labels) and unlabelled rows (soft targets); rows may be views.

    The labelled and the unlabelled part each weigh in as a whole (times `unlabelled_weight`), so a few
    labels are not drowned by many unlabelled rows.
    """
    onehot = np.eye(num_classes, dtype=np.float32)[labels_l]
    x = np.concatenate([feats_l, feats_u]).astype(np.float32)
    y = np.concatenate([onehot, targets_u.astype(np.float32)])
    n_l, n_u = len(feats_l), len(feats_u)
    w = np.concatenate([np.full(n_l, 1.0 / max(n_l, 1)), np.full(n_u, unlabelled_weight / max(n_u, 1))])
    return fit_probe(x, y, num_classes, weight_decay=weight_decay, max_iter=max_iter, sample_weight=w, device=device,
                     init=init)


def unmixed_views(store, mask: np.ndarray) -> np.ndarray | None:
    """[n, V] True for the masked rows' views that are not mixed: the views a fit on the rows' own labels or
    pseudo-labels reads. None when every one of them may be read (a cache without mixed views), so such a
    fit reads every view."""
    if not store.has("mix"):
        return None
    keep = ~mixed_views(store.masked(mask, "mix"))
    return None if keep.all() else keep


def view_rows(feats: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows [N, D] float32, counts [n]): the kept views of each row one after another (every view where `keep`
    is None; a row of [n, D] features is one view), and how many each row has."""
    if feats.ndim == 2:
        return feats.astype(np.float32), np.ones(len(feats), np.int64)
    if keep is None:
        return feats.reshape(-1, feats.shape[-1]).astype(np.float32), np.full(len(feats), feats.shape[1], np.int64)
    if not keep.any(1).all():
        raise ValueError("every row needs a view that is not mixed (view 0, the clean view, never is)")
    return feats[keep].astype(np.float32), keep.sum(1).astype(np.int64)


def row_means(values: np.ndarray, counts) -> np.ndarray:
    """The mean of each row's consecutive entries of `values` [N, ...]; `counts`: entries per row (an int when
    every row has as many)."""
    counts = np.asarray(counts)
    if counts.ndim == 0 or not len(counts) or (counts == counts[0]).all():
        views = int(counts) if counts.ndim == 0 else int(counts[0]) if len(counts) else 1
        return values.reshape(len(values) // max(views, 1), views, *values.shape[1:]).mean(1)
    if counts.min() < 1:
        raise ValueError("every row needs a view that is not mixed (view 0, the clean view, never is)")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    means = np.add.reduceat(values, starts, axis=0) / counts.reshape(-1, *[1] * (values.ndim - 1))
    return means.astype(values.dtype)


def view_mean(values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The mean of [n, V, ...] `values` over each row's kept views (every view where `keep` is None)."""
    return values.mean(1) if keep is None else row_means(values[keep], keep.sum(1))


def predict_views(flat: np.ndarray, weight: np.ndarray, bias: np.ndarray, views) -> np.ndarray:
    """Mean logits over each row's views; `flat` holds the views of each row one after another, `views` of
    each row (an int when every row has as many)."""
    logits = torch.from_numpy(flat) @ torch.as_tensor(weight).T + torch.as_tensor(bias)
    return row_means(logits.numpy(), views)


def self_train_head(feats_l: np.ndarray, labels_l: np.ndarray, feats_u: np.ndarray, logits_u: np.ndarray,
                    num_classes: int, rounds: int = 3, sharpen: float = 0.5, balance: bool = True,
                    weight_decay: float = 1e-3, unlabelled_weight: float = 1.0, max_iter: int = 100,
                    device=None, init=None, keep_l: np.ndarray | None = None,
                    keep_u: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`rounds` of self-training from `logits_u` (the current predictions on the unlabelled rows);
    returns (weight, bias). Each round's fit starts from `init` (then from the previous round), or zero.

    feats_* are [n, V, D] (every view is a row of the fit, its pseudo-label shared by the views) or [n, D].
    `keep_l`, `keep_u` ([n, V], from `unmixed_views`) name the views that enter the fit and the mean of a row's
    logits over its views (those that are not mixed); None: every view.
    """
    rows_l, counts_l = view_rows(feats_l, keep_l)
    rows_u, counts_u = view_rows(feats_u, keep_u)
    labels_rows = np.repeat(labels_l, counts_l)
    logits = view_mean(logits_u, keep_u) if logits_u.ndim == 3 else logits_u
    weight = bias = None
    for _ in range(rounds):
        q = pseudo_targets(logits, sharpen, balance) if len(rows_u) else np.zeros((0, num_classes), np.float32)
        weight, bias = fit_customised_head(rows_l, labels_rows, rows_u, np.repeat(q, counts_u, axis=0), num_classes,
                                           weight_decay, unlabelled_weight, max_iter, device, init)
        init = None if init is None else (weight, bias)
        if len(rows_u):
            logits = predict_views(rows_u, weight, bias, counts_u)
    return weight, bias

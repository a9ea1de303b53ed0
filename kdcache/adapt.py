"""Self-training of a linear head on cached teacher features: the teacher adapts to unlabelled rows.

Features are cached, so a round costs one L-BFGS fit and no image. A round turns the current
predictions on the unlabelled rows into sharpened, class-balanced soft pseudo-labels and refits the
head on the labelled rows (their labels) plus the unlabelled rows (the pseudo-labels). Evaluation
labels are never read here. Used by CustomKD's customisation phase and by `distill --teacher-adapt`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heads import fit_probe


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


def predict_views(flat: np.ndarray, weight: np.ndarray, bias: np.ndarray, views: int) -> np.ndarray:
    """Mean logits over each row's views; `flat` holds the views of each row one after another."""
    logits = torch.from_numpy(flat) @ torch.as_tensor(weight).T + torch.as_tensor(bias)
    return logits.numpy().reshape(len(flat) // max(views, 1), views, logits.shape[-1]).mean(1)


def self_train_head(feats_l: np.ndarray, labels_l: np.ndarray, feats_u: np.ndarray, logits_u: np.ndarray,
                    num_classes: int, rounds: int = 3, sharpen: float = 0.5, balance: bool = True,
                    weight_decay: float = 1e-3, unlabelled_weight: float = 1.0, max_iter: int = 100,
                    device=None, init=None) -> tuple[np.ndarray, np.ndarray]:
    """`rounds` of self-training from `logits_u` (the current predictions on the unlabelled rows);
    returns (weight, bias). Each round's fit starts from `init` (then from the previous round), or zero.

    feats_* are [n, V, D] (every view is a row of the fit, its pseudo-label shared by the views) or [n, D].
    """
    def flat(a):
        return a.reshape(-1, a.shape[-1]).astype(np.float32)

    views = feats_u.shape[1] if feats_u.ndim == 3 else 1
    labels_rows = np.repeat(labels_l, feats_l.shape[1]) if feats_l.ndim == 3 else labels_l
    logits = logits_u.mean(1) if logits_u.ndim == 3 else logits_u
    flat_l, flat_u = flat(feats_l), flat(feats_u)
    weight = bias = None
    for _ in range(rounds):
        q = pseudo_targets(logits, sharpen, balance) if len(flat_u) else np.zeros((0, num_classes), np.float32)
        weight, bias = fit_customised_head(flat_l, labels_rows, flat_u, np.repeat(q, views, axis=0), num_classes,
                                           weight_decay, unlabelled_weight, max_iter, device, init)
        init = None if init is None else (weight, bias)
        if len(flat_u):
            logits = predict_views(flat_u, weight, bias, views)
    return weight, bias

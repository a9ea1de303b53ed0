"""Teacher heads: choose one for a dataset, and fit a linear probe on cached features."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .codes import Split, Status

HEAD_KINDS = ("auto", "native", "zeroshot", "probe", "none")


class HeadError(ValueError):
    pass


def resolve_head(requested: str, teacher, dataset) -> str:
    """The head kind to use; 'auto' picks native, then zeroshot, then probe, then none."""
    if requested not in HEAD_KINDS:
        raise HeadError(f"unknown --head {requested!r}; choose one of: {', '.join(HEAD_KINDS)}")
    native_classes = getattr(teacher.model, "num_classes", 0) if teacher.kind == "timm" else 0
    has_labels = any(s.label >= 0 and s.split == Split.TRAIN for s in dataset.samples)
    if requested == "auto":
        if native_classes and native_classes == len(dataset.classes) and dataset.name == "imagenet":
            return "native"
        if teacher.kind == "open_clip":
            return "zeroshot"
        return "probe" if has_labels else "none"
    if requested == "native":
        if native_classes != len(dataset.classes):
            raise HeadError(f"--head native: the teacher's classifier has {native_classes} classes, the dataset "
                            f"{len(dataset.classes)}; use --head probe (or zeroshot with an open_clip teacher)")
    if requested == "zeroshot" and teacher.kind != "open_clip":
        raise HeadError("--head zeroshot needs an open_clip teacher; use --head probe")
    if requested == "probe" and not has_labels:
        raise HeadError("--head probe needs labelled train samples; this dataset has none (use --head none)")
    return requested


def fit_probe(features: np.ndarray, targets: np.ndarray, num_classes: int, weight_decay: float = 1e-3,
              max_iter: int = 200, sample_weight: np.ndarray | None = None,
              device: torch.device | str | None = None,
              init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, full batch L-BFGS on standardised features.

    `targets` are class indices [n], or class probabilities [n, C] (soft or pseudo-labels);
    `sample_weight` [n] weighs each row's cross-entropy. Returns (weight [C, D], bias [C]) that act
    on raw features. Deterministic for fixed inputs and device: it starts from zero every time, or from
    `init` (a (weight, bias) on raw features, e.g. the previous fit): the objective is strictly convex
    (weight decay), so the start changes only how many iterations reach its one minimum.
    """
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    y = torch.as_tensor(targets, device=device)
    y = y.float() if y.ndim == 2 else y.long()
    if len(x) == 0:
        raise HeadError("cannot fit a probe on zero labelled samples")
    sw = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(num_classes, x.shape[1], device=x.device)
    b = torch.zeros(num_classes, device=x.device)
    if init is not None:  # the same classifier on the standardised features
        w0 = torch.as_tensor(init[0], dtype=torch.float32, device=x.device)
        w, b = w0 * sigma, torch.as_tensor(init[1], dtype=torch.float32, device=x.device) + w0 @ mu
    w, b = w.requires_grad_(), b.requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = F.cross_entropy(z @ w.T + b, y, reduction="none")
        ce = ce.mean() if sw is None else (ce * sw).sum() / sw.sum().clamp_min(1e-12)
        loss = ce + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / sigma
        bias = b - weight @ mu
    return weight.cpu().numpy(), bias.cpu().numpy()


def fit_store_probe(store, train_split: int = 0) -> None:
    """Fit a probe on the clean-view features of every labelled train sample; fill `logits`.

    The probe is stored under heads/extract (weight, bias, fitted_on) so a later stage can tell
    which samples it saw; the base `logits` then hold its outputs for every view.
    """
    lay = store.layout
    labels = store.array("labels")[:]
    splits = store.array("splits")[:]
    status = store.status()
    fitted_on = (labels >= 0) & (splits == train_split) & (status == Status.DONE)
    chosen = (store.meta.section("head") or {}).get("probe_domains")
    if chosen:  # extract --probe-domain: the labelled train rows of those domains only
        names = list(store.meta.domains)
        fitted_on &= np.isin(store.array("domains")[:], [names.index(d) for d in chosen])
    weight, bias = fit_probe(store.clean_view(fitted_on), labels[fitted_on], lay.num_classes)
    group = store.group.require_group("heads").require_group("extract")
    for name, value in (("weight", weight), ("bias", bias), ("fitted_on", fitted_on.astype(np.uint8))):
        group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True)[...] = value
    for k in range(lay.num_shards):
        r = lay.rows(k)
        feats = store.read("features", r.start, r.stop).astype(np.float32)
        logits = (feats @ weight.T + bias).astype(np.float16)
        logits[status[r.start:r.stop] != 1] = 0
        store.write_arrays(k, {"logits": logits})
    from .cache.integrity import shard_digest

    digest = shard_digest({"weight": weight, "bias": bias, "fitted_on": fitted_on.astype(np.uint8)})
    store.update_attrs(head_fit={"fitted": True, "kind": "probe", "group": "heads/extract", "digest": digest,
                                 "fitted_on": "every labelled sample of the train split"
                                 + (f" of {', '.join(chosen)}" if chosen else ""),
                                 "samples": int(fitted_on.sum())})

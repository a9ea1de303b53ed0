"""The teacher head a scenario may use: the cached logits, or a probe refitted on the scenario's labelled
rows only (and optionally self-trained on its unlabelled rows), kept as derived data of the cache."""
from __future__ import annotations

import numpy as np
import torch

from .adapt import self_train_head, unmixed_views
from .cache.derived import derived_group
from .cache.store import CacheStore
from .heads import fit_probe
from .scenarios import TRAIN, Scenario
from .teachers import LinearHead


def head_fitted_on(store: CacheStore) -> np.ndarray | None:
    """Rows the stored head saw with their labels; None for a head that saw none (zero-shot, none)."""
    kind = store.meta.head_kind
    labels, splits = store.array("labels")[:], store.array("splits")[:]
    if kind == "probe":
        return store.group["heads/extract/fitted_on"][:].astype(bool)
    if kind == "native":  # the teacher's classifier was trained on this dataset's train split
        return (labels >= 0) & (splits == TRAIN)
    return None


def scenario_teacher_head(store: CacheStore, scenario: Scenario, write: bool = True, adapt_rounds: int = 0):
    """(head, info): None to use the cached logits, or a probe fitted on this scenario's labels only.

    A stored head that saw labels of rows the scenario treats as unlabelled or as evaluation
    data is refused (label leakage); the probe is refitted from the cached features in seconds.
    With `adapt_rounds`, the head is then self-trained on the scenario's unlabelled rows (never on
    their labels; `teacher_adaptation`), and info reports the teacher's evaluation top-1 before and after.
    """
    head, info = _scenario_head(store, scenario, write)
    if adapt_rounds <= 0:
        return head, info
    return teacher_adaptation(store, scenario, head, info, adapt_rounds, write)


def _scenario_head(store: CacheStore, scenario: Scenario, write: bool):
    kind = store.meta.head_kind
    seen = head_fitted_on(store)
    if kind != "none" and (seen is None or not (seen & ~scenario.labelled).any()):
        return None, {"teacher_head": kind, "refit": False}
    leaked = int((seen & ~scenario.labelled).sum()) if seen is not None else 0
    path = f"heads/{scenario.digest()}"

    def fit():
        labels = store.array("labels")[:]
        w, b = fit_probe(store.clean_view(scenario.labelled), labels[scenario.labelled],
                         len(store.meta.classes))
        return ({"weight": w, "bias": b, "fitted_on": scenario.labelled.astype(np.uint8)},
                {"kind": "probe", "scenario": scenario.description, "samples": int(scenario.labelled.sum())})

    group = derived_group(store, path, fit, write=write)
    head = LinearHead(torch.from_numpy(group["weight"][:]), torch.from_numpy(group["bias"][:]))
    why = f"stored {kind} head saw labels of {leaked} rows outside this scenario's labelled set" if leaked \
        else "the cache has no teacher logits"
    return head, {"teacher_head": "probe", "refit": True, "reason": why, "group": path}


def teacher_logits(store: CacheStore, head, mask: np.ndarray, view: int | None = None) -> np.ndarray:
    """The scenario's teacher logits for the masked rows: the head on cached features, or cached logits."""
    if head is None:
        return store.masked(mask, "logits", view)
    f = torch.from_numpy(store.masked(mask, "features", view))
    with torch.no_grad():
        return head(f).float().numpy()


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean()) if len(labels) else float("nan")


def teacher_adaptation(store: CacheStore, scenario: Scenario, head, info: dict, rounds: int, write: bool = True):
    """Self-train the teacher head on the scenario's unlabelled rows (cached features, every view that is not
    mixed: adapt.py says why).

    Stored as heads/<scenario>-adapt<rounds> (-unmixed for a cache with mixed views, so a head fitted on every
    view of such a cache is never read); info gains the teacher's evaluation top-1 before and after (evaluation
    labels are read for that report only).
    """
    path = f"heads/{scenario.digest()}-adapt{rounds}" + ("-unmixed" if store.has("mix") else "")

    def adapt():
        labels = store.array("labels")[:]
        num_classes = len(store.meta.classes)
        lab, unl = scenario.labelled, scenario.unlabelled
        w, b = self_train_head(store.masked(lab), labels[lab], store.masked(unl), teacher_logits(store, head, unl),
                               num_classes, rounds=rounds, keep_l=unmixed_views(store, lab),
                               keep_u=unmixed_views(store, unl))
        ev = scenario.evaluation
        before = _top1(teacher_logits(store, head, ev, view=0), labels[ev])
        after = _top1(store.clean_view(ev) @ w.T + b, labels[ev])
        return ({"weight": w, "bias": b}, {"kind": "self-trained probe", "rounds": rounds,
                                           "eval_top1_before": before, "eval_top1_after": after})

    group = derived_group(store, path, adapt, write=write)
    adapted = LinearHead(torch.from_numpy(group["weight"][:]), torch.from_numpy(group["bias"][:]))
    a = group.attrs
    return adapted, dict(info, adapted=True, group=path, rounds=rounds,
                         eval_top1_before=a["eval_top1_before"], eval_top1_after=a["eval_top1_after"])

"""Derived data kept in sub-groups of the cache: scenario probe heads (and, through write_group and
read_group, what a method derives, e.g. KDEP's SVD statistics).

Written once, reused by every later run; the base arrays are never touched.
"""
from __future__ import annotations

import numpy as np
import torch

from .adapt import self_train_head
from .heads import fit_probe
from .location import file_lock, is_remote
from .scenarios import TRAIN, Scenario
from .store import CacheStore
from .teachers import LinearHead


def write_group(store: CacheStore, path: str, arrays: dict[str, np.ndarray], attrs: dict):
    """Write a derived group (into the cache, or beside a read-only cache: CacheStore.derived_write_group)."""
    group = store.derived_write_group()
    for part in path.split("/"):
        group = group.require_group(part)
    for name, value in arrays.items():
        group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True)[...] = value
    group.attrs.update(dict(attrs, complete=True))  # written last: a half-written group is recomputed
    return group


def derived_lock(store: CacheStore, path: str):
    """An inter-process lock for computing one derived group, beside where it is written, so runs started
    together compute it once (the others wait, then read it)."""
    root = store.path if store.writable() else store.side_path()
    lock = root / "derived" / "locks" / (path.replace("/", "__") + ".lock")
    if not is_remote(lock):  # object storage has no locks: runs on one cache there compute it on their own
        lock.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(lock)


def read_group(store: CacheStore, path: str):
    """A complete derived group, wherever it was written; None when there is none yet."""
    for root in store.derived_read_groups():
        try:
            group = root[path]
        except KeyError:
            continue
        if group.attrs.get("complete"):
            return group
    return None


def head_fitted_on(store: CacheStore) -> np.ndarray | None:
    """Rows the stored head saw with their labels; None for a head that saw none (zero-shot, none)."""
    kind = store.attrs["head"]["kind"]
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
    kind = store.attrs["head"]["kind"]
    seen = head_fitted_on(store)
    if kind != "none" and (seen is None or not (seen & ~scenario.labelled).any()):
        return None, {"teacher_head": kind, "refit": False}
    leaked = int((seen & ~scenario.labelled).sum()) if seen is not None else 0
    path = f"heads/{scenario.digest()}"
    group = read_group(store, path)
    if group is None:
        if not write:
            raise RuntimeError(f"scenario probe {path} is missing")
        with derived_lock(store, path):
            group = read_group(store, path)  # another run may have fitted it meanwhile
            if group is None:
                labels = store.array("labels")[:]
                w, b = fit_probe(store.clean_view(scenario.labelled), labels[scenario.labelled],
                                 len(store.attrs["dataset"]["classes"]))
                group = write_group(store, path, {"weight": w, "bias": b,
                                                  "fitted_on": scenario.labelled.astype(np.uint8)},
                                    {"kind": "probe", "scenario": scenario.description,
                                     "samples": int(scenario.labelled.sum())})
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
    """Self-train the teacher head on the scenario's unlabelled rows (cached features, every view).

    Stored as heads/<scenario>-adapt<rounds>; info gains the teacher's evaluation top-1 before and after
    (evaluation labels are read for that report only).
    """
    path = f"heads/{scenario.digest()}-adapt{rounds}"
    labels = store.array("labels")[:]
    group = read_group(store, path)
    if group is None:
        if not write:
            raise RuntimeError(f"adapted teacher head {path} is missing")
        num_classes = len(store.attrs["dataset"]["classes"])
        w, b = self_train_head(store.masked(scenario.labelled), labels[scenario.labelled],
                               store.masked(scenario.unlabelled), teacher_logits(store, head, scenario.unlabelled),
                               num_classes, rounds=rounds)
        ev = scenario.evaluation
        f_e = store.clean_view(ev)
        before = _top1(teacher_logits(store, head, ev, view=0), labels[ev])
        after = _top1(f_e @ w.T + b, labels[ev])
        group = write_group(store, path, {"weight": w, "bias": b},
                            {"kind": "self-trained probe", "rounds": rounds, "eval_top1_before": before,
                             "eval_top1_after": after})
    adapted = LinearHead(torch.from_numpy(group["weight"][:]), torch.from_numpy(group["bias"][:]))
    a = group.attrs
    return adapted, dict(info, adapted=True, group=path, rounds=rounds,
                         eval_top1_before=a["eval_top1_before"], eval_top1_after=a["eval_top1_after"])

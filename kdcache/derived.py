"""Derived data kept in sub-groups of the cache: scenario probe heads (and, through derived_group, what a
method derives, e.g. KDEP's SVD statistics).

Written once, reused by every later run; the base arrays are never touched. A group is computed, checked,
then written, and marked complete last; a group of the wrong shape is computed again.
"""
from __future__ import annotations

from collections.abc import Callable

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
    if group.attrs.get("complete"):  # rewriting a stale group: it is incomplete until its arrays are all written
        group.attrs.update(complete=False)
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


Shapes = dict[str, tuple[int, ...]]


def read_group(store: CacheStore, path: str, shapes: Shapes | None = None):
    """A complete derived group, wherever it was written; None when there is none yet. With `shapes`, a group
    whose arrays have other shapes (one written by an earlier version, or for another cache) counts as none."""
    for root in store.derived_read_groups():
        try:
            group = root[path]
        except KeyError:
            continue
        if group.attrs.get("complete") and _shape_problem(group, shapes) is None:
            return group
    return None


def _shape_problem(arrays, shapes: Shapes | None) -> str | None:
    for name, shape in (shapes or {}).items():
        got = tuple(arrays[name].shape) if name in arrays else None
        if got != tuple(shape):
            return f"{name} has shape {got}, expected {tuple(shape)}"
    return None


def derived_group(store: CacheStore, path: str, compute: Callable[[], tuple[dict[str, np.ndarray], dict]],
                  shapes: Shapes | None = None, write: bool = True):
    """The derived group at `path`, computed first if there is none (or only one of other `shapes`).

    `compute()` returns (arrays, attrs); they are checked against `shapes` before anything is written, under
    a lock, so runs started together compute it once. `write=False` (a rank that only reads) expects it."""
    group = read_group(store, path, shapes)
    if group is not None:
        return group
    if not write:
        raise RuntimeError(f"derived data {path} is missing")
    with derived_lock(store, path):
        group = read_group(store, path, shapes)  # another run may have written it meanwhile
        if group is None:
            arrays, attrs = compute()
            problem = _shape_problem(arrays, shapes)
            if problem:
                raise RuntimeError(f"derived data {path} computed with the wrong shape ({problem}); not written")
            group = write_group(store, path, arrays, attrs)
    return group


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

    def fit():
        labels = store.array("labels")[:]
        w, b = fit_probe(store.clean_view(scenario.labelled), labels[scenario.labelled],
                         len(store.attrs["dataset"]["classes"]))
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
    """Self-train the teacher head on the scenario's unlabelled rows (cached features, every view).

    Stored as heads/<scenario>-adapt<rounds>; info gains the teacher's evaluation top-1 before and after
    (evaluation labels are read for that report only).
    """
    path = f"heads/{scenario.digest()}-adapt{rounds}"

    def adapt():
        labels = store.array("labels")[:]
        num_classes = len(store.attrs["dataset"]["classes"])
        w, b = self_train_head(store.masked(scenario.labelled), labels[scenario.labelled],
                               store.masked(scenario.unlabelled), teacher_logits(store, head, scenario.unlabelled),
                               num_classes, rounds=rounds)
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

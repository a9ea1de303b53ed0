"""Derived data kept in sub-groups of the cache: scenario probe heads and KDEP's SVD statistics.

Written once, reused by every later run; the base arrays are never touched.
"""
from __future__ import annotations

import numpy as np
import torch

from .heads import fit_probe
from .scenarios import TRAIN, Scenario
from .store import CacheStore
from .teachers import LinearHead


def _write_group(store: CacheStore, path: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    group = store.group
    for part in path.split("/"):
        group = group.require_group(part)
    for name, value in arrays.items():
        group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True)[...] = value
    group.attrs.update(dict(attrs, complete=True))  # written last: a half-written group is recomputed


def _read_group(store: CacheStore, path: str):
    try:
        group = store.group[path]
    except KeyError:
        return None
    return group if group.attrs.get("complete") else None


def head_fitted_on(store: CacheStore) -> np.ndarray | None:
    """Rows the stored head saw with their labels; None for a head that saw none (zero-shot, none)."""
    kind = store.attrs["head"]["kind"]
    labels, splits = store.array("labels")[:], store.array("splits")[:]
    if kind == "probe":
        return store.group["heads/extract/fitted_on"][:].astype(bool)
    if kind == "native":  # the teacher's classifier was trained on this dataset's train split
        return (labels >= 0) & (splits == TRAIN)
    return None


def scenario_teacher_head(store: CacheStore, scenario: Scenario, write: bool = True):
    """(head, info): None to use the cached logits, or a probe fitted on this scenario's labels only.

    A stored head that saw labels of rows the scenario treats as unlabelled or as evaluation
    data is refused (label leakage); the probe is refitted from the cached features in seconds.
    """
    kind = store.attrs["head"]["kind"]
    seen = head_fitted_on(store)
    if kind != "none" and (seen is None or not (seen & ~scenario.labelled).any()):
        return None, {"teacher_head": kind, "refit": False}
    leaked = int((seen & ~scenario.labelled).sum()) if seen is not None else 0
    path = f"heads/{scenario.digest()}"
    group = _read_group(store, path)
    if group is None:
        if not write:
            raise RuntimeError(f"scenario probe {path} is missing")
        labels = store.array("labels")[:]
        w, b = fit_probe(store.clean_view(scenario.labelled), labels[scenario.labelled],
                         len(store.attrs["dataset"]["classes"]))
        _write_group(store, path, {"weight": w, "bias": b, "fitted_on": scenario.labelled.astype(np.uint8)},
                     {"kind": "probe", "scenario": scenario.description, "samples": int(scenario.labelled.sum())})
        group = store.group[path]
    head = LinearHead(torch.from_numpy(group["weight"][:]), torch.from_numpy(group["bias"][:]))
    why = f"stored {kind} head saw labels of {leaked} rows outside this scenario's labelled set" if leaked \
        else "the cache has no teacher logits"
    return head, {"teacher_head": "probe", "refit": True, "reason": why, "group": path}


def svd_statistics(store: CacheStore, k: int, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-k right singular vectors of the clean train-split features (KDEP)."""
    path = f"derived/svd-k{k}"
    group = _read_group(store, path)
    if group is None:
        if not write:
            raise RuntimeError(f"{path} is missing")
        status, splits = store.status(), store.array("splits")[:]
        f = torch.from_numpy(store.clean_view((status == 1) & (splits == TRAIN))).double()
        mean = f.mean(0)
        _, s, vh = torch.linalg.svd(f - mean, full_matrices=False)
        comps = vh[:k]
        # fix each vector's sign so the statistics are reproducible
        comps = comps * torch.sign(comps[torch.arange(len(comps)), comps.abs().argmax(1)])[:, None]
        _write_group(store, path, {"mean": mean.float().numpy(), "components": comps.float().numpy(),
                                   "singular_values": s[:k].float().numpy()}, {"rows": int(len(f))})
        group = store.group[path]
    return torch.from_numpy(group["mean"][:]), torch.from_numpy(group["components"][:])

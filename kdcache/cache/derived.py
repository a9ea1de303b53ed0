"""Derived data kept in sub-groups of the cache (scenario probe heads, a method's statistics or fits).

Written once, reused by every later run; the base arrays are never touched. `derived_group` is the one
read-or-compute: read, lock, read again, compute, check the shapes, write, mark complete last; a group of
the wrong shape is computed again. It needs of the store only `derived_read_groups()`,
`derived_write_group()` and `derived_lock(path)` (CacheStore has them; an in-memory store may too).
Imports nothing of kdcache.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Shapes = dict[str, tuple[int, ...]]


def write_group(store, path: str, arrays: dict[str, np.ndarray], attrs: dict):
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


def read_group(store, path: str, shapes: Shapes | None = None):
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


def derived_group(store, path: str, compute: Callable[[], tuple[dict[str, np.ndarray], dict]],
                  shapes: Shapes | None = None, write: bool = True, missing: str = "raise"):
    """The derived group at `path` (its arrays by name), computed first if there is none (or only one of
    other `shapes`).

    `compute()` returns (arrays, attrs); they are checked against `shapes` before anything is written, under
    a lock, so runs started together compute it once. `write=False` (a rank that only reads) expects it to
    exist: `missing="raise"` refuses a missing group, `missing="compute"` computes it without keeping it
    (the arrays are returned as a dict)."""
    group = read_group(store, path, shapes)
    if group is not None:
        return group
    if not write:
        if missing == "compute":
            return _computed(path, compute, shapes)[0]
        raise RuntimeError(f"derived data {path} is missing")
    with store.derived_lock(path):
        group = read_group(store, path, shapes)  # another run may have written it meanwhile
        if group is None:
            group = write_group(store, path, *_computed(path, compute, shapes))
    return group


def _computed(path: str, compute, shapes: Shapes | None) -> tuple[dict[str, np.ndarray], dict]:
    arrays, attrs = compute()
    problem = _shape_problem(arrays, shapes)
    if problem:
        raise RuntimeError(f"derived data {path} computed with the wrong shape ({problem}); not written")
    return arrays, attrs

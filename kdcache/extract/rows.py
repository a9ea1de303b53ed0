"""The row order of an extraction: which dataset sample each cache row holds (`--row-order`, `--row-seed`),
resolved from the options or from the cache already at --out, and the dataset put in that order."""
from __future__ import annotations

from pathlib import Path

from kdcache.cache.format import CacheError, RowOrder
from kdcache.cache.store import CacheStore
from kdcache.datasets import Dataset, row_permutation
from kdcache.options import ConfigError


def recorded_rows(cfg, out: Path) -> RowOrder | None:
    """The row order of the cache at `out` that this extraction would resume (None: it makes a new one)."""
    if cfg.overwrite or not (out / "zarr.json").is_file():
        return None
    try:
        return CacheStore.open(out).meta.rows
    except CacheError:  # half made, or not a cache of this format: opening it for writing decides
        return None


def resolve_rows(cfg, out: Path) -> RowOrder:
    """--row-order and --row-seed as given, or auto (None): what the cache at `out` records, so that a resume
    goes on as the cache began (a cache that records no order is sorted); for a new cache, shuffled with seed 0."""
    recorded = recorded_rows(cfg, out)
    order = cfg.row_order or (recorded.order if recorded else "shuffled")
    if order == "sorted":
        if cfg.row_seed is not None and cfg.row_order:
            raise ConfigError(f"--row-seed {cfg.row_seed} seeds the shuffled row order, and --row-order sorted has "
                              "none: leave one of them out")
        if cfg.row_seed is not None:
            raise ConfigError(f"--row-seed {cfg.row_seed}: the cache at --out {out} holds its rows sorted (made with "
                              "--row-order sorted, or before rows were shuffled), which have no seed: leave --row-seed "
                              "out to resume it, or pass --overwrite to replace it with a shuffled cache")
        return RowOrder()
    if cfg.row_seed is not None:
        return RowOrder(order, cfg.row_seed)
    return RowOrder(order, recorded.seed if recorded and recorded.order == order else 0)


def in_row_order(dataset: Dataset, rows: RowOrder) -> Dataset:
    """`dataset` with sample r the one cache row r holds (its fingerprint stays that of the list as found)."""
    if rows.order == "sorted":
        return dataset
    return dataset.reordered(row_permutation(len(dataset), rows.seed))


def check_rows(store: CacheStore, rows: RowOrder, out: Path) -> None:
    """The cache at `out` holds its rows in the order asked; otherwise an error naming the flag that differs."""
    have = store.meta.rows
    if have == rows:
        return
    flag = "--row-order" if have.order != rows.order else "--row-seed"
    raise CacheError(f"{flag}: the cache at --out {out} holds its rows {have}, this extraction asks "
                     f"for {rows}; leave --row-order and --row-seed out to resume it as it began, or pass --overwrite "
                     "to replace it")

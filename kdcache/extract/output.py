"""The cache an extraction writes into: its folder (checked, created under a lock, cleared for --overwrite),
opened or created with the identity the options give, and repaired shard by shard (--repair)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from kdcache.cache.backend import backend, lock
from kdcache.cache.format import CacheError, IncompleteCreation, Layout, RowOrder
from kdcache.cache.store import CacheStore
from kdcache.extract.rows import check_rows
from kdcache.options import ConfigError


@contextlib.contextmanager
def creation_lock(out: Path):
    """Serialise opening/creating one cache, so two extracts started together agree on one store (on
    object storage only rank 0 of one job creates it: there is no lock there)."""
    backend(out).make_parent(out)
    with lock(out.parent / f".{out.name}.create.lock"):
        yield


def check_out(out: Path) -> None:
    """The nearest existing folder above --out is a folder (cache_location refuses an --out that is a file)."""
    for p in backend(out).parents(out):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            what = "a broken link" if not p.exists() else "a file"
            raise ConfigError(f"--out {out}: {p} is {what}, not a folder; give a folder (a new or an existing one)")


def clear_cache(out: Path) -> None:
    """Remove a cache folder for --overwrite; a symlinked --out keeps its link and loses its contents."""
    backend(out).remove_tree(out)


def open_or_create(out: Path, cfg, layout: Layout, identity: dict, attrs: dict, static: dict) -> CacheStore:
    """The cache at `out` as these options describe it: opened when it matches, created when absent or left
    half-created, replaced with --overwrite; otherwise an error listing what differs."""
    if (out / "zarr.json").is_file():
        try:
            store = CacheStore.open(out, mode="r+")
            problems = store.mismatches(identity)
        except IncompleteCreation:
            store, problems = None, []
            clear_cache(out)
            return CacheStore.create(out, layout, attrs, static, compression=cfg.compression)
        except CacheError as e:
            store, problems = None, [str(e)]
        if store is not None and not cfg.overwrite:
            check_rows(store, RowOrder(**identity["rows"]), out)
        if not problems and not cfg.overwrite:
            return store
        if problems and not cfg.overwrite:
            raise CacheError(f"--out {out} holds a cache made from another teacher, dataset or settings:\n  "
                             + "\n  ".join(problems[:8])
                             + "\npass --overwrite to replace it, or choose another --out")
        clear_cache(out)
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise CacheError(f"--out {out} exists and is not a kdcache cache; pass --overwrite to replace it")
        clear_cache(out)
    store = CacheStore.create(out, layout, attrs, static, compression=cfg.compression)
    return store


def repair(store: CacheStore, static: dict) -> None:
    """Recompute exactly what is damaged: shards whose arrays or packed images differ from their checksums
    (a damaged tar is packed again from the dataset), and static arrays that differ from the dataset."""
    from kdcache.cacheinfo import IMAGES, damaged_shards, head_problems
    from kdcache.pack import shard_name
    from kdcache.cache.integrity import missing_files, repair_static

    if head_problems(store):
        print("repair: the probe head is missing or damaged; refitting it", file=sys.stderr)
        store.update_attrs(head_fit={"fitted": False})
    repair_static(store, static, lambda name: print(f"repair: array {name} differs from the dataset; rewriting it",
                                                    file=sys.stderr))
    damaged = damaged_shards(store)
    for k, why in sorted(damaged.items()):
        print(f"repair: shard {k} {why}; recomputing it", file=sys.stderr)
        if why.startswith(IMAGES):
            (store.images_dir / shard_name(k)).unlink(missing_ok=True)
        store.mark_todo(k)
    missing = {k for _, k in missing_files(store)}
    for k in sorted(missing - set(damaged)):
        print(f"repair: shard {k} has missing files; recomputing it", file=sys.stderr)
        store.mark_todo(k)
    if not damaged and not missing:
        print("repair: every done shard matches its checksum", file=sys.stderr)

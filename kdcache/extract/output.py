"""The cache an extraction writes into: its folder (checked, created under a lock, cleared for --overwrite),
opened or created with the identity the options give, and repaired shard by shard (--repair)."""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from kdcache.location import file_lock, is_remote
from kdcache.options import ConfigError
from kdcache.store import CacheError, CacheStore, IncompleteCreation, Layout


@contextlib.contextmanager
def creation_lock(out: Path):
    """Serialise opening/creating one cache, so two extracts started together agree on one store (on
    object storage only rank 0 of one job creates it: there is no lock there)."""
    if not is_remote(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.create.lock"):
        yield


def check_out(out: Path) -> None:
    """The nearest existing folder above --out is a folder (cache_location refuses an --out that is a file)."""
    if is_remote(out):
        return
    for p in out.parents:
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            what = "a broken link" if not p.exists() else "a file"
            raise ConfigError(f"--out {out}: {p} is {what}, not a folder; give a folder (a new or an existing one)")


def clear_cache(out: Path) -> None:
    """Remove a cache folder for --overwrite; a symlinked --out keeps its link and loses its contents."""
    if is_remote(out):
        out.fs.rm(out.path, recursive=True)
        return
    if out.is_symlink():
        target = out.resolve()
        for child in target.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return
    shutil.rmtree(out)


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
    from kdcache.store import static_digests

    if head_problems(store):
        print("repair: the probe head is missing or damaged; refitting it", file=sys.stderr)
        store.update_attrs(head_fit={"fitted": False})
    fresh = static_digests(static)
    stored = static_digests({n: store.static(n) for n in static})
    for name in sorted(n for n in static if stored[n] != fresh[n]):
        print(f"repair: array {name} differs from the dataset; rewriting it", file=sys.stderr)
        store.write_static(name, static[name])
    if store.checksum_version >= 2 and store.attrs.get("static_digests") != fresh:
        store.update_attrs(static_digests=fresh)
    damaged = damaged_shards(store)
    for k, why in sorted(damaged.items()):
        print(f"repair: shard {k} {why}; recomputing it", file=sys.stderr)
        if why.startswith(IMAGES):
            (store.images_dir / shard_name(k)).unlink(missing_ok=True)
        store.mark_todo(k)
    missing = {k for _, k in store.missing_files()}
    for k in sorted(missing - set(damaged)):
        print(f"repair: shard {k} has missing files; recomputing it", file=sys.stderr)
        store.mark_todo(k)
    if not damaged and not missing:
        print("repair: every done shard matches its checksum", file=sys.stderr)

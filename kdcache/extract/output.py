"""The cache an extraction writes into: its folder (checked, created under a lock, cleared for --overwrite),
opened or created with the identity the options give, and repaired shard by shard (--repair)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

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


def _compression(out: Path, names) -> str:
    """The compression the cache's per-row arrays were created with, read from the first readable array metadata
    among `names` (zstd when none is readable)."""
    import json

    for name in names:
        try:
            doc = json.loads((out / name / "zarr.json").read_bytes())
            inner = [c for codec in doc["codecs"] if codec["name"] == "sharding_indexed"
                     for c in codec["configuration"]["codecs"]]
        except Exception:  # noqa: BLE001 - damaged: try the next array
            continue
        kinds = {c["name"] for c in inner}
        return "blosc" if "blosc" in kinds else "zstd" if "zstd" in kinds else "none"
    return "zstd"


def restore_array_metadata(out: Path) -> list[str]:
    """Write again the zarr.json of every base array whose metadata cannot be read or does not describe the array
    the cache's layout makes (the layout, key width and compression determine it: `allocate` writes the same
    document); returns the names rewritten. Only the root's attributes must be intact (they hold the layout).
    Caches of older formats are left to the open's checks."""
    import json
    import tempfile

    import zarr

    from kdcache.cache.format import CHECKSUM_VERSION, FORMAT_VERSION, arrays
    from kdcache.cache.meta import CacheMeta
    from kdcache.cache.store import allocate

    try:
        attrs = json.loads((out / "zarr.json").read_bytes()).get("attributes", {})
        meta = CacheMeta.from_attrs(attrs, out)
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - the root document itself is damaged: nothing to derive from
        raise CacheError(f"{out}/zarr.json cannot be read ({type(e).__name__}); it holds the cache's identity and "
                         "cannot be derived: re-extract with --overwrite") from None
    if meta.format_version != FORMAT_VERSION or meta.checksums != CHECKSUM_VERSION:
        return []
    expected = meta.expected_arrays()
    damaged = []
    for name, (shape, dtype) in expected.items():
        try:
            arr = zarr.open_array(str(out / name), mode="r", zarr_format=3)
            ok = tuple(arr.shape) == shape and np.dtype(arr.dtype) == np.dtype(dtype)
        except Exception:  # noqa: BLE001 - unreadable metadata
            ok = False
        if not ok:
            damaged.append(name)
    if not damaged:
        return []
    per_row = [a.name for a in arrays() if a.per_row and a.name in expected and a.name not in damaged]
    with tempfile.TemporaryDirectory() as tmp:
        compression = meta.extract_config.get("compression") or _compression(out, per_row)
        allocate(zarr.open_group(tmp, mode="w", zarr_format=3), meta.layout, meta.key_bytes, compression)
        for name in damaged:
            print(f"repair: the metadata (zarr.json) of array {name} is damaged; writing it again from the cache's "
                  "layout", file=sys.stderr)
            backend(out).put(out / name / "zarr.json", (Path(tmp) / name / "zarr.json").read_bytes())
    return damaged


def _clear_probe_head(store: CacheStore) -> None:
    """Remove the probe head's files (the fit writes them anew), and write the `heads` group's metadata again when
    it cannot be read (the scenario heads beside it are derived data, kept)."""
    import json

    import zarr

    heads = store.path / "heads"
    if (heads / "extract").exists():
        backend(store.path).remove_tree(heads / "extract")
    try:
        zarr.open_group(str(heads), mode="r", zarr_format=3)
    except Exception:  # noqa: BLE001 - damaged (or absent) group metadata
        backend(store.path).put(heads / "zarr.json", json.dumps(
            {"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode())


def repair(store: CacheStore, static: dict) -> None:
    """Recompute exactly what is damaged: shards whose arrays or packed images differ from their checksums
    (a damaged tar is packed again from the dataset), and static arrays that differ from the dataset. A shard
    whose data matches one of its two records (shard checksum, array digests) while the other is damaged keeps
    its data: the damaged record is written again from it. Everything is diagnosed before anything is
    written, and every write replaces whole files (a damaged file is never read to be merged into)."""
    from kdcache.cacheinfo import CHECKSUM_RECORD, DIGEST_RECORD, IMAGES, damaged_shards, head_problems
    from kdcache.pack import shard_name
    from kdcache.cache.integrity import missing_files, record_digests, repair_static, shard_checksum

    head = head_problems(store)
    damaged = damaged_shards(store)
    missing = {k for _, k in missing_files(store)}
    status, unreadable = store.status_report()
    if head:
        print("repair: the probe head is missing or damaged; refitting it", file=sys.stderr)
        store.update_attrs(head_fit={"fitted": False})
        _clear_probe_head(store)
    repair_static(store, static, lambda name: print(f"repair: array {name} differs from the dataset or cannot be "
                                                    "read; rewriting it", file=sys.stderr))
    for k in unreadable:
        print(f"repair: the status of shard {k} cannot be read; recomputing the shard", file=sys.stderr)
        store.mark_todo(k)
    for k, why in sorted(damaged.items()):
        r = store.layout.rows(k)
        if why.startswith(CHECKSUM_RECORD) and k not in missing:
            print(f"repair: shard {k} {why}; writing the checksum again from its data", file=sys.stderr)
            store.write_checksum(k, shard_checksum(store, store.read_shard(k), status[r.start:r.stop]))
            continue
        if why.startswith(DIGEST_RECORD) and k not in missing:
            print(f"repair: shard {k} {why}; writing its digests again from its data", file=sys.stderr)
            store.put_record("array_digests", k, np.zeros(store.group["array_digests"].shape[1:], np.uint8))
            record_digests(store, k, dict(store.read_shard(k), status=status[r.start:r.stop]))
            continue
        print(f"repair: shard {k} {why}; recomputing it", file=sys.stderr)
        if why.startswith(IMAGES):
            (store.images_dir / shard_name(k)).unlink(missing_ok=True)
        store.mark_todo(k)
    for k in sorted(missing - set(damaged)):
        print(f"repair: shard {k} has missing files; recomputing it", file=sys.stderr)
        store.mark_todo(k)
    if not damaged and not missing and not unreadable:
        print("repair: every done shard matches its checksum", file=sys.stderr)

"""What a cache recorded about itself, and checks against it: shard checksums, per-array digests, static
digests, the fingerprint, missing shard files, changed status, and the repair of static arrays.

Every function takes an open CacheStore (the store calls the recording ones as it writes); which arrays are
digested or must have a file comes from ARRAYS. Imports cache.format, cache.backend and kdcache.codes only.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..codes import Status
from .backend import chunk_path
from .format import DIGEST_BYTES, CacheError, arrays, digested, shard_arrays, static_arrays


def shard_digest(data: dict[str, np.ndarray]) -> str:
    """sha256 over a shard's arrays, in a fixed order (recorded at write time)."""
    h = hashlib.sha256()
    for name in sorted(data):
        arr = data[name]
        h.update(name.encode())
        if arr.dtype.kind in "OUT":
            h.update("\x00".join(str(x) for x in arr.ravel()).encode())
        else:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def array_digest(values: np.ndarray) -> np.ndarray:
    """16-byte BLAKE2b of one shard's slice of an array (strings joined as in shard_digest)."""
    values = np.asarray(values)
    data = "\x00".join(str(x) for x in values.ravel()).encode() if values.dtype.kind in "OUT" \
        else np.ascontiguousarray(values).tobytes()
    kind = "str" if values.dtype.kind in "OUT" else values.dtype.str  # strings read back as another dtype
    h = hashlib.blake2b(str(values.shape).encode() + kind.encode(), digest_size=DIGEST_BYTES)
    h.update(data)
    return np.frombuffer(h.digest(), np.uint8)


def static_digests(values: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: shard_digest({name: np.asarray(values[name])}) for name in sorted(values)}


def shard_checksum(store, data: dict[str, np.ndarray], status: np.ndarray) -> str:
    """The checksum recorded for a shard: its data arrays, and (checksum version 2) its status."""
    covered = {n: data[n] for n in shard_arrays() if n in data}
    if store.checksum_version >= 2:
        covered["status"] = np.asarray(status, np.uint8)
    return shard_digest(covered)


def record_digests(store, k: int, data: dict[str, np.ndarray]) -> None:
    """Record the digest of each digested array of `data` (shard k's slices) in array_digests."""
    if not store.has("array_digests"):
        return
    names = digested(store.layout)
    digests = store.read_record("array_digests", k)
    if digests is None:  # a damaged record: the arrays not given here are read back and digested again
        digests = np.zeros(store.group["array_digests"].shape[1:], np.uint8)
        others = [n for n in names if n not in data and n in store.group]
        data = {**(store.read_shard(k, others) if others else {}), **data}
    for name, values in data.items():
        if name in names:
            digests[names.index(name)] = array_digest(values)
    store.put_record("array_digests", k, digests)


def check_digests(store, k: int, raw: dict[str, np.ndarray]) -> None:
    """A CacheError when a shard's slices `raw` (as read) differ from the digests recorded when written."""
    if not store.has("array_digests"):
        return
    recorded, names = store.group["array_digests"][k], digested(store.layout)
    for n, values in raw.items():
        if not np.array_equal(array_digest(values), recorded[names.index(n)]):
            raise CacheError(f"cache {store.path}: shard {k} of {n} differs from the digest recorded when it "
                             "was written; check with `info --verify`, fix with `extract --repair`")


def digest_problems(data: dict[str, np.ndarray], digests: np.ndarray, lay=None) -> list[str]:
    """The arrays of `data` (one shard, status included) whose digest differs from the recorded `digests` (of a
    cache of layout `lay`)."""
    names = digested(lay)
    return [n for n, v in data.items() if not np.array_equal(array_digest(v), digests[names.index(n)])]


def fingerprint(store) -> str:
    """Identity of the cache's contents: its identity sections, every shard checksum and the static
    arrays' digests. A resumed run must see the same fingerprint."""
    h = hashlib.sha256(json.dumps(store.meta.identity(), sort_keys=True, default=str).encode())
    h.update("\x00".join(str(x) for x in store.checksums()).encode())
    h.update(json.dumps(store.meta.static_digests or {}, sort_keys=True).encode())
    return h.hexdigest()


def missing_files(store, status: np.ndarray | None = None) -> list[tuple[str, int]]:
    """Shard files that a done shard must have but that are gone (zarr would read them as zeros).
    Cheap: one stat per file; data is read only for a file that is absent. Caches written before every
    chunk was stored (`every_chunk`) have no file for a shard of fill values (the all-zero logits of a
    one-class probe): such a file counts as missing only if the shard's recorded digest (or checksum)
    is not that of fill values. While a probe head is not fitted, its logits are placeholders the fit
    rewrites: they are not checked. Static arrays are checked by their digests instead; text written per
    shard (reasons) is checked by the shard checksum."""
    status = store.status() if status is None else status
    done = store.shard_done(status)
    out = []
    for a in arrays():
        if not (a.sharded and not a.text or a.role == "status") or not store.has(a.name) \
                or ((a.name == "logits" or a.logits_form == "sparse") and store.probe_pending()):
            continue
        arr = store.group[a.name]
        for k in np.flatnonzero(done):
            r = store.layout.rows(int(k))
            if a.zero_when_bad and not (status[r.start:r.stop] == Status.DONE).any():
                continue  # only bad rows: nothing was computed, zeros are right
            if not chunk_path(store.path, a.name, arr, int(k)).is_file() \
                    and not _recorded_as_fill(store, a.name, int(k), status):
                out.append((a.name, int(k)))
    return out


def _recorded_as_fill(store, name: str, k: int, status: np.ndarray) -> bool:
    """Shard k of `name` (whose file is absent, so it reads as fill values) is what was recorded when the
    shard was written: its array digest, or (caches without them) the shard's checksum, matches."""
    r = store.layout.rows(k)
    names = digested(store.layout)
    if store.has("array_digests") and name in names:
        fill = store.read_shard(k, (name,))[name]
        return np.array_equal(array_digest(fill), store.group["array_digests"][k, names.index(name)])
    return str(store.checksums()[k]) == shard_checksum(store, store.read_shard(k), status[r.start:r.stop])


def status_changed(store, status: np.ndarray | None = None) -> list[int]:
    """Done shards whose status differs from the digest recorded when they were written (cheap: the
    status array is small); [] for caches without array digests. (A shard killed between its digests
    and its status is not done, and is recomputed by the extract command.)"""
    if not store.has("array_digests"):
        return []
    status = store.status() if status is None else status
    column = digested().index("status")
    try:  # one batched read (every distill start does this); record by record only when one is damaged
        every = store.group["array_digests"][:, column]
    except Exception:  # noqa: BLE001 - a damaged record: verify's shard checks name it (the checksum judges the status)
        every = None
    out = []
    for k in np.flatnonzero(store.shard_done(status)):
        if every is not None:
            recorded = every[k]
        else:
            row = store.read_record("array_digests", int(k))
            if row is None:
                continue
            recorded = row[column]
        r = store.layout.rows(int(k))
        if not np.array_equal(array_digest(status[r.start:r.stop]), recorded):
            out.append(int(k))
    return out


def static_changed(store, read_keys: bool = True) -> list[str]:
    """Static arrays that differ from the digests recorded at creation ([] for caches without them)."""
    recorded = store.meta.static_digests
    if not recorded:
        return []
    names = [n for n in static_arrays() if read_keys or n != "keys"]
    now = {}
    for n in names:
        try:
            now.update(static_digests({n: store.static(n)}))
        except Exception as e:  # noqa: BLE001 - a damaged shard file of the array
            now[n] = f"unreadable ({type(e).__name__})"
    return [n for n in names if recorded.get(n) != now[n]]


def repair_static(store, static: dict[str, np.ndarray], report=lambda name: None) -> list[str]:
    """Rewrite the static arrays that differ from `static` (the dataset's) or cannot be read, each after
    `report(name)`, and record their digests; returns the names rewritten."""
    fresh = static_digests(static)
    stored = {}
    for n in static:
        try:
            stored[n] = static_digests({n: store.static(n)})[n]
        except Exception:  # noqa: BLE001 - a damaged shard file of the array: rewritten whole
            stored[n] = None
    changed = sorted(n for n in static if stored[n] != fresh[n])
    for name in changed:
        report(name)
        store.write_static(name, static[name])
    if store.checksum_version >= 2 and store.meta.static_digests != fresh:
        store.update_attrs(static_digests=fresh)
    return changed

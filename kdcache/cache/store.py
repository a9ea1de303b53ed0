"""The teacher cache: one Zarr v3 store per dataset + teacher.

Every per-sample array is sharded with S samples per shard, so shard k of every array is one
file. A shard is the unit of work: its data arrays are written first and `status` last, so a
shard whose status is 0 is recomputed on resume. Besides the arrays the store holds an `images`
group (the packed tar shards and per-shard lock files) and derived sub-groups (`heads/`,
`derived/`) that never change the base arrays. Which arrays exist, and how they are allocated,
comes from ARRAYS (cache.format). Imports cache.format, .backend, .meta, .integrity, .sparse and kdcache.codes.
"""
from __future__ import annotations

import json
import os
import shlex
import warnings
from pathlib import Path

import numpy as np
import zarr

from ..codes import Status
from . import integrity
from .backend import backend, cache_path, chunk_path, lock
from .format import (CHECKSUM_VERSION, FEATURE_DTYPES, FORMAT_NAME, FORMAT_VERSION, SPARSE_LOGITS, CacheError,
                     Layout, arrays, dimensions, dtype, present, quantised, shape, shard_arrays, text_arrays)
from .meta import CacheMeta
from .sparse import as_stored, is_sparse, rebuild_from

# The images/ and heads/ groups carry non-Zarr files (tar shards, locks); listing them is expected.
warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr hierarchy.*")


def every_chunk(arr: zarr.Array) -> zarr.Array:
    """`arr` set to store every chunk it is given, fill values included. Zarr by default stores no file for a
    chunk that equals the fill value (zero here), so an all-zero shard (the logits of a degenerate head, a
    single-domain dataset's domains) would look exactly like a deleted file; written this way, an absent
    file always means a lost one. The values read back are the same either way."""
    return arr.with_config({"write_empty_chunks": True})


COMPRESSIONS = ("zstd", "blosc", "none")


def _compressor(name: str):
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if name == "blosc":
        return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    if name == "none":
        return None
    raise CacheError(f"unknown compression {name!r}; choose one of: {', '.join(COMPRESSIONS)}")


def _inner_chunk(shard_size: int, target: int = 256) -> int:
    # the inner chunk must divide the shard
    for c in range(min(target, shard_size), 0, -1):
        if shard_size % c == 0:
            return c
    return shard_size


def allocate(group: zarr.Group, layout: Layout, key_bytes: int, compression: str) -> None:
    """Every array of ARRAYS that a cache of `layout` has: per-row arrays sharded by the cache's shards (inner
    chunks dividing them, compressed), per-shard records one chunk per shard."""
    inner, comp = _inner_chunk(layout.shard_size), _compressor(compression)
    dims = dimensions()
    for a in arrays():
        if not present(a, layout):
            continue
        full = shape(a, layout, key_bytes)
        if a.per_row:
            group.create_array(a.name, shape=full, chunks=(inner, *full[1:]), shards=(layout.shard_size, *full[1:]),
                               dtype=dtype(a, layout), compressors=comp, fill_value=0, dimension_names=dims[a.name])
        else:
            group.create_array(a.name, shape=full, chunks=(1, *full[1:]), dtype=dtype(a, layout), fill_value=0,
                               dimension_names=dims[a.name])


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per vector (last axis): x ~= q * scale, scale = max|x| / 127."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def decoded(name: str, raw: dict[str, np.ndarray], lay: Layout) -> np.ndarray:
    """Array `name` from its stored arrays `raw` (CacheStore._parts): int8 dequantised to float32, sparse logits
    rebuilt (cache.sparse), anything else as stored."""
    if is_sparse(name, lay):
        return rebuild_from(raw, lay.num_classes)
    values, scale = raw[name], quantised().get(name)
    return dequantize_int8(values, raw[scale]) if values.dtype == np.int8 and scale else values


def text_width(values) -> int:
    """Bytes needed to hold the longest of `values` in UTF-8 (at least 1)."""
    return max([len(str(v).encode()) for v in np.asarray(values).ravel()] + [1])


def cut_text(values, width: int) -> np.ndarray:
    """Each string cut to at most `width` UTF-8 bytes at a character boundary, NUL characters replaced by
    U+FFFD (what `encode_text` can keep)."""
    out = [str(v).replace("\x00", "\ufffd").encode()[:width].decode(errors="ignore")
           for v in np.asarray(values).ravel()]
    return np.array(out, dtype=object).astype(str).reshape(np.shape(values))


def encode_text(values, width: int, name: str) -> np.ndarray:
    """Strings as a [n, width] uint8 array of UTF-8 bytes, zero-padded; a longer string is an error."""
    flat = [str(v).encode() for v in np.asarray(values).ravel()]
    out = np.zeros((len(flat), width), np.uint8)
    for i, b in enumerate(flat):
        if len(b) > width:
            raise CacheError(f"{name}[{i}] is {len(b)} bytes of UTF-8, more than the {width} the cache holds")
        if b"\x00" in b:
            raise CacheError(f"{name}[{i}] holds a NUL character, which the cache cannot store")
        out[i, :len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_text(values: np.ndarray) -> np.ndarray:
    """The strings of a uint8 array made by `encode_text` (trailing zero bytes dropped; bytes that are not
    UTF-8, as damage leaves them, read as U+FFFD, so the checksums tell)."""
    values = np.asarray(values, np.uint8)
    out = [bytes(row).rstrip(b"\x00").decode(errors="replace") for row in values.reshape(-1, values.shape[-1])]
    return np.array(out, dtype=object).astype(str).reshape(values.shape[:-1])


def side_path(fingerprint: str) -> Path:
    """Where derived data of a read-only cache goes: $KDCACHE_DERIVED_DIR or the user cache dir,
    one folder per cache fingerprint."""
    base = os.environ.get("KDCACHE_DERIVED_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache" / "derived"
    return Path(base) / fingerprint[:24]


class DerivedPlaces:
    """Where a cache's derived groups are kept: in the cache, or in a side store (one folder per cache
    fingerprint) when the cache is read-only. CacheStore's derived_* methods (cache.derived uses them)."""

    def __init__(self, path: Path, group: zarr.Group, fingerprint):
        self.path, self.group, self.fingerprint = path, group, fingerprint
        self._side: zarr.Group | None = None

    def writable(self) -> bool:
        b = backend(self.path)
        return b.writable(self.path) and b.writable(self.path / "zarr.json")

    def _side_group(self, create: bool) -> zarr.Group | None:
        if self._side is None:
            path = side_path(self.fingerprint())
            if not create and not (path / "zarr.json").is_file():
                return None
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._side = zarr.open_group(str(path), mode="a", zarr_format=3)
            except OSError as e:
                raise CacheError(f"cache {self.path} is read-only and derived data cannot be written to {path} "
                                 f"({e.strerror}); set KDCACHE_DERIVED_DIR to a writable folder") from None
        return self._side

    def write_group(self) -> zarr.Group:
        """Where derived data is written: the cache, or the side store when the cache is read-only."""
        return self.group if self.writable() else self._side_group(create=True)

    def read_groups(self) -> list[zarr.Group]:
        """Where derived data is looked up, in order: the cache, then the side store if there is one."""
        side = None if self.writable() else self._side_group(create=False)
        return [self.group] + ([side] if side is not None else [])

    def lock(self, path: str):
        """An inter-process lock for computing derived group `path`, beside where it is written (runs started
        together compute it once); a no-op on object storage."""
        root = self.path if self.writable() else side_path(self.fingerprint())
        return lock(root / "derived" / "locks" / (path.replace("/", "__") + ".lock"), parents=True)


class ShardRecords:
    """The per-shard records of a cache (shard_checksums, array_digests) and the files behind its arrays: read entry
    by entry, so one damaged record is found as that record, and written as whole new files, so a damaged one is
    replaced, never merged into. A base of CacheStore (which gives `path`, `group`, `layout`, `text`, `writer`)."""

    def _unlink(self, name: str, k: int) -> None:
        """Remove shard k's file of array `name` (per-row arrays: the zarr shard of cache shard k; per-shard records:
        the chunk of entry k)."""
        chunk_path(self.path, name, self.group[name], k).unlink(missing_ok=True)

    def put_record(self, name: str, k: int, values: np.ndarray) -> None:
        """Entry k of a per-shard record (shard_checksums, array_digests), written as a new file: the old one is
        never read, so a damaged record is replaced, not merged into."""
        self._unlink(name, k)
        self.writer(name)[k] = values

    def read_record(self, name: str, k: int) -> np.ndarray | None:
        """Entry k of a per-shard record as stored, or None when its file cannot be read (damaged)."""
        try:
            return self.group[name][k]
        except Exception:  # noqa: BLE001 - a damaged chunk raises from the codec
            return None

    def checksums(self) -> np.ndarray:
        """Every shard's recorded checksum (hex; "" for a shard never written); a CacheError naming the first
        shard whose record cannot be read (a damaged file: `extract --repair` writes it again)."""
        try:
            return self.text("shard_checksums")
        except Exception:  # noqa: BLE001 - a damaged chunk raises from the codec: find which
            for k in range(self.layout.num_shards):
                if self.read_record("shard_checksums", k) is None:
                    raise CacheError(f"cache {self.path}: the recorded checksum of shard {k} (shard_checksums) cannot "
                                     "be read; check with `info --verify`, fix with `extract --repair`") from None
            raise

    def write_checksum(self, k: int, checksum: str) -> None:
        self.put_record("shard_checksums", k, self._stored("shard_checksums", np.array([checksum]))[0])


class CacheStore(ShardRecords):
    """An open cache: creation and opening (format and metadata checked), shard and static reads and writes
    (text codec, int8), status and the hooks of cache.integrity and cache.derived."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = cache_path(path)
        self.group = group
        self.meta = CacheMeta.from_attrs(dict(group.attrs), self.path)  # every field checked once, here
        self.layout = self.meta.layout
        self.meta.check_arrays(group, self.path)
        self._derived = DerivedPlaces(self.path, group, self.fingerprint)

    @classmethod
    def create(cls, path: str | Path, layout: Layout, attrs: dict, static: dict[str, np.ndarray],
               compression: str = "zstd") -> CacheStore:
        """Create an empty cache: every array allocated, per-sample static arrays written."""
        path = cache_path(path)
        # the marker says "creation under way" until the full attributes land at the end
        group = zarr.open_group(str(backend(path).zarr_target(path)), mode="w", zarr_format=3,
                                attributes={"kdcache_creating": True})
        if layout.feature_dtype not in FEATURE_DTYPES:
            raise CacheError(f"unknown --feature-dtype {layout.feature_dtype!r}; choose {' or '.join(FEATURE_DTYPES)}")
        key_bytes = text_width(static["keys"])
        allocate(group, layout, key_bytes, compression)
        for name, values in static.items():
            every_chunk(group[name])[:] = encode_text(values, key_bytes, name) if name in text_arrays() else values
        group.create_group("images", attributes={"about": "packed tar shards (webdataset layout), one per cache shard"})
        meta = dict(attrs)
        meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, key_bytes=key_bytes, layout=layout.as_attrs(),
                    checksums=CHECKSUM_VERSION, static_digests=integrity.static_digests(static))
        group.attrs.put(meta)  # replaces the creation marker
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> CacheStore:
        path = cache_path(path)
        if not (path / "zarr.json").is_file():
            raise CacheError(f"no cache at {path} (run `python cli.py extract ... --out {shlex.quote(str(path))}` first)")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise CacheError(f"{path}/zarr.json cannot be read as a Zarr v3 group ({type(e).__name__}: {e}); "
                             "re-extract with --overwrite") from None
        CacheMeta.check_format(dict(group.attrs), path)
        return cls(path, group)

    # ------------------------------------------------------------------ attributes and identity

    @property
    def attrs(self) -> dict:
        """A copy of the root attributes (for tests and tools; the code reads `meta`)."""
        return dict(self.meta.attrs)

    def mismatches(self, identity: dict) -> list[str]:
        return self.meta.mismatches(identity)

    def update_attrs(self, **values) -> None:
        self.group.attrs.update(values)
        self.meta = CacheMeta.from_attrs(dict(self.group.attrs), self.path)

    @property
    def checksum_version(self) -> int:
        return self.meta.checksums

    @property
    def text_as_bytes(self) -> bool:
        """Format 2: keys, reasons and checksums are stored as fixed-width UTF-8 bytes."""
        return self.meta.format_version >= 2

    def probe_pending(self) -> bool:
        """A probe head that is not fitted yet: the logits of done shards are placeholders until it is."""
        return self.meta.head_kind == "probe" and not self.meta.head_fitted

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    # ------------------------------------------------------------------ status

    def status_report(self) -> tuple[np.ndarray, list[int]]:
        """(per-row status, shards whose status cannot be read): those count as todo (they are recomputed)."""
        arr, unreadable = self.group["status"], []
        try:
            return arr[:], unreadable
        except Exception:  # a damaged status file: read shard by shard and keep what is readable
            out = np.zeros(self.layout.n, np.uint8)
            for k in range(self.layout.num_shards):
                r = self.layout.rows(k)
                try:
                    out[r.start:r.stop] = arr[r.start:r.stop]
                except Exception:
                    unreadable.append(k)
            return out, unreadable

    def status(self) -> np.ndarray:
        """Per-row status; a status shard that cannot be read counts as todo (it is recomputed)."""
        return self.status_report()[0]

    def mark_todo(self, k: int) -> None:
        """Send shard k back to work (its data arrays are rewritten before its status)."""
        r = self.layout.rows(k)
        if self.has("array_digests"):  # no longer a written shard: its digests are void
            self.put_record("array_digests", k, np.zeros(self.group["array_digests"].shape[1:], np.uint8))
        self._put_rows(k, {"status": np.zeros(len(r), np.uint8)})

    def shard_done(self, status: np.ndarray | None = None) -> np.ndarray:
        """Boolean per shard: every row has a final status (done or bad)."""
        status = self.status() if status is None else status
        lay = self.layout
        return np.array([bool(np.all(status[r.start:r.stop] != Status.TODO))
                         for r in (lay.rows(k) for k in range(lay.num_shards))], dtype=bool)

    # ------------------------------------------------------------------ reading

    def _stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """`values` as array `name` stores them (text encoded in format 2)."""
        if not self.text_as_bytes or name not in text_arrays():
            return values
        return encode_text(values, self.group[name].shape[-1], name)

    def _logical(self, name: str, values: np.ndarray) -> np.ndarray:
        """Stored values of array `name` as the code sees them (text decoded in format 2)."""
        return decode_text(values) if self.text_as_bytes and name in text_arrays() else values

    def text(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of a text array (keys, reasons, shard_checksums) as strings, in either format."""
        if name not in text_arrays():
            raise KeyError(f"{name!r} is not a text array ({', '.join(text_arrays())})")
        return self._logical(name, self.group[name][start:stop])

    def static(self, name: str) -> np.ndarray:
        """A whole per-row static array (labels, domains, splits, keys) as written at creation."""
        return self.text(name) if name in text_arrays() else self.group[name][:]

    def read_shard(self, k: int, names=None) -> dict[str, np.ndarray]:
        """Shard k of each array (every array written per shard by default) as written (text decoded)."""
        rows = self.layout.rows(k)
        return {n: self._logical(n, self.group[n][rows.start:rows.stop]) for n in names or shard_arrays()
                if n in self.group}

    def _parts(self, name: str) -> list[str]:
        """The stored arrays that array `name` is read from: itself (and its int8 scale), or the sparse logits."""
        if is_sparse(name, self.layout):
            return list(SPARSE_LOGITS)
        scale = quantised().get(name)
        return [name] + ([scale] if scale and self.has(scale) else [])

    def read_checked(self, name: str, k: int) -> np.ndarray:
        """Shard k of an array, as `read` gives it, after comparing the stored bytes with the digests recorded
        when they were written (caches with array digests); a mismatch is a CacheError naming the shard."""
        raw = self.read_shard(k, self._parts(name))
        integrity.check_digests(self, k, raw)
        return decoded(name, raw, self.layout)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a teacher array as stored (float16), or dequantised to float32 from int8, or (sparse
        logits) the log-probabilities they rebuild. Give whole shards for chunk-aligned reads."""
        return decoded(name, {n: self.group[n][start:stop] for n in self._parts(name)}, self.layout)

    def masked(self, mask: np.ndarray, name: str = "features", view: int | None = None) -> np.ndarray:
        """`name` (float32) for the masked rows, every view [n, V, ...] or one view [n, ...], read shard
        by shard (chunk-aligned)."""
        lay, out = self.layout, []
        for k in range(lay.num_shards):
            r = lay.rows(k)
            m = mask[r.start:r.stop]
            if m.any():
                block = self.read(name, r.start, r.stop)
                out.append((block if view is None else block[:, view])[m].astype(np.float32))
        if out:
            return np.concatenate(out)
        tail = (lay.views, lay.num_classes) if is_sparse(name, lay) else self.group[name].shape[1:]
        return np.zeros((0, *tail[view is not None:]), np.float32)

    def clean_view(self, mask: np.ndarray, name: str = "features") -> np.ndarray:
        """View 0 of `name` (float32) for the masked rows."""
        return self.masked(mask, name, view=0)

    def has(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    # ------------------------------------------------------------------ writing

    def writer(self, name: str) -> zarr.Array:
        """Array `name` for writing: every chunk stored (see `every_chunk`)."""
        return every_chunk(self.group[name])

    def write_static(self, name: str, values: np.ndarray) -> None:
        """Rewrite a whole static array (repair), its shard files removed first (a damaged one cannot be merged
        into)."""
        for k in range(self.layout.num_shards):
            self._unlink(name, k)
        self.writer(name)[:] = self._stored(name, values)

    def write_shard(self, k: int, data: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write one shard's data arrays, its digests and checksum, then its status (last)."""
        if "reasons" in data and self.text_as_bytes:  # checksums cover what is read back
            data = dict(data, reasons=cut_text(data["reasons"], self.group["reasons"].shape[-1]))
        data = as_stored(data, self.layout)
        if self.layout.feature_dtype == "int8":
            data = dict(data)
            for name, scale_name in quantised().items():
                if name in data and data[name].dtype != np.int8:
                    data[name], data[scale_name] = quantize_int8(data[name])
        self._put_rows(k, {n: data[n] for n in shard_arrays() if n in data})
        integrity.record_digests(self, k, dict(data, status=np.asarray(status, np.uint8)))
        self.write_checksum(k, integrity.shard_checksum(self, data, status))
        self._put_rows(k, {"status": np.asarray(status, np.uint8)})

    def write_arrays(self, k: int, data: dict[str, np.ndarray]) -> None:
        """Rewrite some data arrays of a finished shard (e.g. logits of a probe fitted later)."""
        rows = self.layout.rows(k)
        data = as_stored(data, self.layout)
        self._put_rows(k, data)
        integrity.record_digests(self, k, data)
        status = self.group["status"][rows.start:rows.stop]
        self.write_checksum(k, integrity.shard_checksum(self, self.read_shard(k), status))

    def _put_rows(self, k: int, data: dict[str, np.ndarray]) -> None:
        """Shard k of each array, its file removed first: zarr would otherwise merge the new data into the old
        file, which fails if that file is damaged (and costs a read)."""
        rows = self.layout.rows(k)
        for name, values in data.items():
            self._unlink(name, k)
            self.writer(name)[rows.start:rows.stop] = self._stored(name, values)

    def fingerprint(self) -> str:
        return integrity.fingerprint(self)

    # ------------------------------------------------------------------ derived data (cache.derived)

    def derived_read_groups(self) -> list[zarr.Group]:
        return self._derived.read_groups()

    def derived_write_group(self) -> zarr.Group:
        return self._derived.write_group()

    def derived_lock(self, path: str):
        return self._derived.lock(path)

    def nbytes_on_disk(self, name: str) -> int:
        return backend(self.path).size(self.path / name)

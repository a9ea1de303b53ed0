"""The teacher cache: one Zarr v3 store per dataset + teacher.

Every per-sample array is sharded with S samples per shard, so shard k of every array is one
file. A shard is the unit of work: its data arrays are written first and `status` last, so a
shard whose status is 0 is recomputed on resume. Besides the arrays the store holds an `images`
group (the packed tar shards and per-shard lock files) and derived sub-groups (`heads/`,
`derived/`) that never change the base arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .codes import Status
from .location import cache_path, is_remote

FORMAT_NAME = "kdcache"
# 1: keys, reasons and shard checksums are Zarr `string` arrays. 2: they are fixed-width UTF-8 bytes
# (uint8, zero-padded), so readers without Zarr's variable-length strings (tensorstore) open every array.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TEXT_ARRAYS = ("keys", "reasons", "shard_checksums")
REASON_BYTES = 240  # a bad row's reason is cut (at a character boundary) to this many UTF-8 bytes
# written per shard, before status
SHARD_ARRAYS = ("features", "feature_scale", "logits", "tokens", "token_scale", "views", "reasons", "image_digests")
STATIC_ARRAYS = ("labels", "domains", "splits", "keys")
# 1: a shard's checksum covers its data arrays. 2: also its status and the digest of every packed image
# (`image_digests`, one per row), and the static arrays carry digests in the attributes.
CHECKSUM_VERSION = 2
DIGEST_BYTES = 16
CHECKSUM_CHARS = 64  # a shard checksum: sha256, hex
# version 2 also keeps one digest per (shard, array) in `array_digests`, so a reader can check exactly the
# arrays it reads, every time it reads them
DIGESTED = SHARD_ARRAYS + ("status",)
# named dimensions (Zarr v3 dimension_names), so xarray.open_zarr reads the cache as one dataset
DIMENSIONS = {
    "features": ("row", "view", "feature"), "feature_scale": ("row", "view"), "logits": ("row", "view", "class"),
    "tokens": ("row", "view", "token", "channel"), "token_scale": ("row", "view", "token"),
    "views": ("row", "view", "view_param"), "labels": ("row",), "domains": ("row",), "splits": ("row",),
    "keys": ("row", "key_byte"), "status": ("row",), "reasons": ("row", "reason_byte"),
    "image_digests": ("row", "digest_byte"), "shard_checksums": ("shard", "checksum_char"),
    "array_digests": ("shard", "digested_array", "digest_byte"),
}
IDENTITY_SECTIONS = ("teacher", "dataset", "views", "head", "pack", "tokens", "storage")
FEATURE_DTYPES = ("float16", "int8")
QUANTISED = {"features": "feature_scale", "tokens": "token_scale"}  # int8 array -> its per-vector scale

# The images/ and heads/ groups carry non-Zarr files (tar shards, locks); listing them is expected.
warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr hierarchy.*")


class CacheError(ValueError):
    """The cache is missing, incomplete or does not match; the message says how to fix it."""


class IncompleteCreation(CacheError):
    """The store was being created when its process stopped; nothing in it is computed yet."""


@dataclass(frozen=True)
class Layout:
    n: int
    views: int
    feature_dim: int
    num_classes: int  # 0 when the head is none
    token_grid: int  # 0 when tokens are not cached
    token_dim: int
    shard_size: int
    params: int  # view parameter count
    feature_dtype: str = "float16"  # features and tokens: float16, or int8 with a float32 scale per vector

    @property
    def num_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))


def every_chunk(arr: zarr.Array) -> zarr.Array:
    """`arr` set to store every chunk it is given, fill values included. Zarr by default stores no file for a
    chunk that equals the fill value (zero here), so an all-zero shard (the logits of a degenerate head, a
    single-domain dataset's domains) would look exactly like a deleted file; written this way, an absent
    file always means a lost one. The values read back are the same either way."""
    return arr.with_config({"write_empty_chunks": True})


def _compressor(name: str):
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if name == "blosc":
        return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    if name == "none":
        return None
    raise CacheError(f"unknown compression {name!r}; choose zstd, blosc or none")


def _inner_chunk(shard_size: int, target: int = 256) -> int:
    # the inner chunk must divide the shard
    for c in range(min(target, shard_size), 0, -1):
        if shard_size % c == 0:
            return c
    return shard_size


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per vector (last axis): x ~= q * scale, scale = max|x| / 127."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


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


class CacheStore:
    def __init__(self, path: str | Path, group: zarr.Group):
        from .meta import CacheMeta

        self.path = cache_path(path)
        self.group = group
        a = dict(group.attrs)
        self.attrs = a
        self.meta = CacheMeta.from_attrs(a, self.path)  # every field checked once, here
        self.layout = self.meta.layout
        self.meta.check_arrays(group, self.path)
        self._side: zarr.Group | None = None

    # ------------------------------------------------------------------ creation / opening

    @classmethod
    def create(cls, path: str | Path, layout: Layout, attrs: dict, static: dict[str, np.ndarray],
               compression: str = "zstd") -> CacheStore:
        """Create an empty cache: every array allocated, per-sample static arrays written."""
        path = cache_path(path)
        # the marker says "creation under way" until the full attributes land at the end
        # a symlinked cache folder keeps its link: zarr replaces what it points to
        target = path.resolve() if not is_remote(path) and path.is_symlink() else path
        group = zarr.open_group(str(target), mode="w", zarr_format=3, attributes={"kdcache_creating": True})
        S, N, V = layout.shard_size, layout.n, layout.views
        inner = _inner_chunk(S)
        comp = _compressor(compression)

        def make(name, shape_tail, dtype, compress=True):
            group.create_array(name, shape=(N, *shape_tail), chunks=(inner, *shape_tail),
                               shards=(S, *shape_tail), dtype=dtype,
                               compressors=comp if compress and comp is not None else None,
                               fill_value="" if dtype is str else 0, dimension_names=DIMENSIONS[name])

        if layout.feature_dtype not in FEATURE_DTYPES:
            raise CacheError(f"unknown --feature-dtype {layout.feature_dtype!r}; choose {' or '.join(FEATURE_DTYPES)}")
        int8 = layout.feature_dtype == "int8"
        make("features", (V, layout.feature_dim), layout.feature_dtype)
        if int8:
            make("feature_scale", (V,), "float32")
        if layout.num_classes:
            make("logits", (V, layout.num_classes), "float16")
        if layout.token_grid:
            make("tokens", (V, layout.token_grid ** 2, layout.token_dim), layout.feature_dtype)
            if int8:
                make("token_scale", (V, layout.token_grid ** 2), "float32")
        make("views", (V, layout.params), "float32")
        make("labels", (), "int32")
        make("domains", (), "int16")
        make("splits", (), "int8")
        key_bytes = text_width(static["keys"])
        make("keys", (key_bytes,), "uint8")
        make("status", (), "uint8")
        make("reasons", (REASON_BYTES,), "uint8")
        make("image_digests", (DIGEST_BYTES,), "uint8")
        group.create_array("shard_checksums", shape=(layout.num_shards, CHECKSUM_CHARS), chunks=(1, CHECKSUM_CHARS),
                           dtype="uint8", fill_value=0, dimension_names=DIMENSIONS["shard_checksums"])
        group.create_array("array_digests", shape=(layout.num_shards, len(DIGESTED), DIGEST_BYTES),
                           chunks=(1, len(DIGESTED), DIGEST_BYTES), dtype="uint8", fill_value=0,
                           dimension_names=DIMENSIONS["array_digests"])
        for name, values in static.items():
            every_chunk(group[name])[:] = encode_text(values, key_bytes, name) if name == "keys" else values
        group.create_group("images", attributes={"about": "packed tar shards (webdataset layout), one per cache shard"})
        meta = dict(attrs)
        meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, key_bytes=key_bytes, layout=layout.__dict__,
                    checksums=CHECKSUM_VERSION, static_digests=static_digests(static))
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
        if group.attrs.get("kdcache_creating"):
            raise IncompleteCreation(f"{path}: the cache's creation was interrupted; run extract again")
        if group.attrs.get("format") != FORMAT_NAME:
            raise CacheError(f"{path} is a Zarr store but not a {FORMAT_NAME} cache")
        if group.attrs.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{path}: cache format version {group.attrs.get('format_version')} is not one this "
                             f"kdcache reads ({', '.join(map(str, READABLE_VERSIONS))}); re-extract with --overwrite, "
                             "or use the kdcache that wrote it")
        return cls(path, group)

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict:
        return {k: self.attrs.get(k) for k in IDENTITY_SECTIONS}

    def mismatches(self, identity: dict) -> list[str]:
        """Sections (and fields) where this cache differs from a requested identity."""
        out = []
        mine = json.loads(json.dumps(self.identity()))
        theirs = json.loads(json.dumps(identity))
        for section in IDENTITY_SECTIONS:
            a, b = mine.get(section), theirs.get(section)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                out += [f"{section}.{f}: cache has {a.get(f)!r}, asked for {b.get(f)!r}" for f in fields]
            else:
                out.append(f"{section}: cache has {a!r}, asked for {b!r}")
        return out

    # ------------------------------------------------------------------ shards

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    def status(self) -> np.ndarray:
        """Per-row status; a status shard that cannot be read counts as todo (it is recomputed)."""
        arr = self.group["status"]
        self.status_unreadable: list[int] = []
        try:
            return arr[:]
        except Exception:  # a damaged status file: read shard by shard and keep what is readable
            out = np.zeros(self.layout.n, np.uint8)
            for k in range(self.layout.num_shards):
                r = self.layout.rows(k)
                try:
                    out[r.start:r.stop] = arr[r.start:r.stop]
                except Exception:
                    self.status_unreadable.append(k)
            return out

    def mark_todo(self, k: int) -> None:
        """Send shard k back to work (its data arrays are rewritten before its status)."""
        r = self.layout.rows(k)
        if "array_digests" in self.group:  # no longer a written shard: its digests are void
            self.group["array_digests"][k] = np.zeros(self.group["array_digests"].shape[1:], np.uint8)
        self.group["status"][r.start:r.stop] = np.zeros(len(r), np.uint8)

    def shard_done(self, status: np.ndarray | None = None) -> np.ndarray:
        """Boolean per shard: every row has a final status (done or bad)."""
        status = self.status() if status is None else status
        lay = self.layout
        return np.array([bool(np.all(status[r.start:r.stop] != Status.TODO))
                         for r in (lay.rows(k) for k in range(lay.num_shards))], dtype=bool)

    @property
    def checksum_version(self) -> int:
        return int(self.attrs.get("checksums", 1))

    def shard_checksum(self, data: dict[str, np.ndarray], status: np.ndarray) -> str:
        """The checksum recorded for a shard: its data arrays, and (version 2) its status."""
        covered = {n: data[n] for n in SHARD_ARRAYS if n in data}
        if self.checksum_version >= 2:
            covered["status"] = np.asarray(status, np.uint8)
        return shard_digest(covered)

    @property
    def text_as_bytes(self) -> bool:
        """Format 2: keys, reasons and checksums are stored as fixed-width UTF-8 bytes."""
        return self.meta.format_version >= 2

    def _stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """`values` as array `name` stores them (text encoded in format 2)."""
        if not self.text_as_bytes or name not in TEXT_ARRAYS:
            return values
        return encode_text(values, self.group[name].shape[-1], name)

    def _logical(self, name: str, values: np.ndarray) -> np.ndarray:
        """Stored values of array `name` as the code sees them (text decoded in format 2)."""
        return decode_text(values) if self.text_as_bytes and name in TEXT_ARRAYS else values

    def text(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of a text array (keys, reasons, shard_checksums) as strings, in either format."""
        if name not in TEXT_ARRAYS:
            raise KeyError(f"{name!r} is not a text array ({', '.join(TEXT_ARRAYS)})")
        return self._logical(name, self.group[name][start:stop])

    def static(self, name: str) -> np.ndarray:
        """A whole per-row static array (labels, domains, splits, keys) as written at creation."""
        return self.text(name) if name in TEXT_ARRAYS else self.group[name][:]

    def _writer(self, name: str) -> zarr.Array:
        """Array `name` for writing: every chunk stored (see `every_chunk`)."""
        return every_chunk(self.group[name])

    def write_static(self, name: str, values: np.ndarray) -> None:
        """Rewrite a whole static array (repair)."""
        self._writer(name)[:] = self._stored(name, values)

    def write_shard(self, k: int, data: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write one shard's data arrays, its checksum, then its status (last)."""
        rows = self.layout.rows(k)
        if "reasons" in data and self.text_as_bytes:  # checksums cover what is read back
            data = dict(data, reasons=cut_text(data["reasons"], self.group["reasons"].shape[-1]))
        if self.layout.feature_dtype == "int8":
            data = dict(data)
            for name, scale_name in QUANTISED.items():
                if name in data and data[name].dtype != np.int8:
                    data[name], data[scale_name] = quantize_int8(data[name])
        for name in SHARD_ARRAYS:
            if name in data:
                self._drop_shard_file(name, k)
                self._writer(name)[rows.start:rows.stop] = self._stored(name, data[name])
        self._record_digests(k, dict(data, status=np.asarray(status, np.uint8)))
        self._write_checksum(k, self.shard_checksum(data, status))
        self._writer("status")[rows.start:rows.stop] = status

    def _drop_shard_file(self, name: str, k: int) -> None:
        """Remove shard k's file of an array before rewriting it whole: zarr would otherwise merge the
        new data into the old file, which fails if that file is damaged (and costs a read)."""
        arr = self.group[name]
        key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
        (self.path / name / key).unlink(missing_ok=True)

    def _record_digests(self, k: int, data: dict[str, np.ndarray]) -> None:
        if "array_digests" not in self.group:
            return
        digests = self.group["array_digests"][k]
        for name, values in data.items():
            if name in DIGESTED:
                digests[DIGESTED.index(name)] = array_digest(values)
        self._writer("array_digests")[k] = digests

    def read_checked(self, name: str, k: int) -> np.ndarray:
        """Shard k of an array, as `read` gives it, after comparing the stored bytes with the digests recorded
        when they were written (caches with array digests); a mismatch is a CacheError naming the shard."""
        rows = self.layout.rows(k)
        names = [name] + ([QUANTISED[name]] if name in QUANTISED and QUANTISED[name] in self.group else [])
        raw = {n: self._logical(n, self.group[n][rows.start:rows.stop]) for n in names}
        if "array_digests" in self.group:
            recorded = self.group["array_digests"][k]
            for n, values in raw.items():
                if not np.array_equal(array_digest(values), recorded[DIGESTED.index(n)]):
                    raise CacheError(f"cache {self.path}: shard {k} of {n} differs from the digest recorded when it "
                                     "was written; check with `info --verify`, fix with `extract --repair`")
        values = raw[name]
        if values.dtype == np.int8 and name in QUANTISED:
            return dequantize_int8(values, raw[QUANTISED[name]])
        return values

    def write_arrays(self, k: int, data: dict[str, np.ndarray]) -> None:
        """Rewrite some data arrays of a finished shard (e.g. logits of a probe fitted later)."""
        rows = self.layout.rows(k)
        for name, values in data.items():
            self._drop_shard_file(name, k)
            self._writer(name)[rows.start:rows.stop] = self._stored(name, values)
        self._record_digests(k, data)
        self._write_checksum(k, self.shard_checksum(self.read_shard(k), self.group["status"][rows.start:rows.stop]))

    def _write_checksum(self, k: int, checksum: str) -> None:
        self._writer("shard_checksums")[k] = self._stored("shard_checksums", np.array([checksum]))[0]

    def checksums(self) -> np.ndarray:
        """Every shard's recorded checksum (hex; "" for a shard never written)."""
        return self.text("shard_checksums")

    def read_shard(self, k: int, names=SHARD_ARRAYS) -> dict[str, np.ndarray]:
        """Shard k of each array as written (text decoded)."""
        rows = self.layout.rows(k)
        return {n: self._logical(n, self.group[n][rows.start:rows.stop]) for n in names if n in self.group}

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a teacher array as stored (float16), or dequantised to float32 from int8.
        Give whole shards for chunk-aligned reads."""
        values = self.group[name][start:stop]
        if values.dtype == np.int8 and name in QUANTISED:
            return dequantize_int8(values, self.group[QUANTISED[name]][start:stop])
        return values

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
        tail = self.group[name].shape[1:] if view is None else self.group[name].shape[2:]
        return np.zeros((0, *tail), np.float32)

    def clean_view(self, mask: np.ndarray, name: str = "features") -> np.ndarray:
        """View 0 of `name` (float32) for the masked rows."""
        return self.masked(mask, name, view=0)

    def missing_files(self, status: np.ndarray | None = None) -> list[tuple[str, int]]:
        """Shard files that a done shard must have but that are gone (zarr would read them as zeros).
        Cheap: one stat per file; data is read only for a file that is absent. Caches written before every
        chunk was stored (`every_chunk`) have no file for a shard of fill values (the all-zero logits of a
        one-class probe): such a file counts as missing only if the shard's recorded digest (or checksum)
        is not that of fill values. While a probe head is not fitted, its logits are placeholders the fit
        rewrites: they are not checked. Static arrays are checked by their digests instead."""
        status = self.status() if status is None else status
        done = self.shard_done(status)
        out = []
        for name in ("features", "feature_scale", "logits", "tokens", "token_scale", "views", "image_digests",
                     "status"):
            if name not in self.group or (name == "logits" and self.probe_pending()):
                continue
            arr = self.group[name]
            for k in np.flatnonzero(done):
                r = self.layout.rows(int(k))
                if name not in ("status", "image_digests") and not (status[r.start:r.stop] == Status.DONE).any():
                    continue  # only bad rows: nothing was computed, zeros are right
                key = arr.metadata.encode_chunk_key((int(k),) + (0,) * (arr.ndim - 1))
                if not (self.path / name / key).is_file() and not self._recorded_as_fill(name, int(k), status):
                    out.append((name, int(k)))
        return out

    def probe_pending(self) -> bool:
        """A probe head that is not fitted yet: the logits of done shards are placeholders until it is."""
        return self.meta.head_kind == "probe" and not self.meta.head_fitted

    def _recorded_as_fill(self, name: str, k: int, status: np.ndarray) -> bool:
        """Shard k of `name` (whose file is absent, so it reads as fill values) is what was recorded when the
        shard was written: its array digest, or (caches without them) the shard's checksum, matches."""
        r = self.layout.rows(k)
        if "array_digests" in self.group and name in DIGESTED:
            fill = self._logical(name, self.group[name][r.start:r.stop])
            return np.array_equal(array_digest(fill), self.group["array_digests"][k, DIGESTED.index(name)])
        return str(self.checksums()[k]) == self.shard_checksum(self.read_shard(k), status[r.start:r.stop])

    def status_changed(self, status: np.ndarray | None = None) -> list[int]:
        """Done shards whose status differs from the digest recorded when they were written (cheap: the
        status array is small); [] for caches without array digests. (A shard killed between its digests
        and its status is not done, and is recomputed by the extract command.)"""
        if "array_digests" not in self.group:
            return []
        status = self.status() if status is None else status
        try:
            recorded = self.group["array_digests"][:, DIGESTED.index("status")]
        except Exception:  # noqa: BLE001 - a damaged digest file: every done shard is suspect
            return [int(k) for k in np.flatnonzero(self.shard_done(status))]
        out = []
        for k in np.flatnonzero(self.shard_done(status)):
            r = self.layout.rows(int(k))
            if not np.array_equal(array_digest(status[r.start:r.stop]), recorded[k]):
                out.append(int(k))
        return out

    def fingerprint(self) -> str:
        """Identity of the cache's contents: its identity sections, every shard checksum and the static
        arrays' digests. A resumed run must see the same fingerprint."""
        h = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode())
        h.update("\x00".join(str(x) for x in self.checksums()).encode())
        h.update(json.dumps(self.attrs.get("static_digests") or {}, sort_keys=True).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ derived data

    def writable(self) -> bool:
        if is_remote(self.path):  # object storage: writable as far as this process can tell (its credentials decide)
            return True
        return os.access(self.path, os.W_OK) and os.access(self.path / "zarr.json", os.W_OK)

    def side_path(self) -> Path:
        """Where derived data of a read-only cache goes: $KDCACHE_DERIVED_DIR or the user cache dir,
        one folder per cache fingerprint."""
        base = os.environ.get("KDCACHE_DERIVED_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache" / "derived"
        return Path(base) / self.fingerprint()[:24]

    def _side_group(self, create: bool) -> zarr.Group | None:
        if self._side is None:
            path = self.side_path()
            if not create and not (path / "zarr.json").is_file():
                return None
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._side = zarr.open_group(str(path), mode="a", zarr_format=3)
            except OSError as e:
                raise CacheError(f"cache {self.path} is read-only and derived data cannot be written to {path} "
                                 f"({e.strerror}); set KDCACHE_DERIVED_DIR to a writable folder") from None
        return self._side

    def derived_write_group(self) -> zarr.Group:
        """Where derived data is written: the cache, or the side store when the cache is read-only."""
        return self.group if self.writable() else self._side_group(create=True)

    def derived_read_groups(self) -> list[zarr.Group]:
        """Where derived data is looked up, in order: the cache, then the side store if there is one."""
        side = None if self.writable() else self._side_group(create=False)
        return [self.group] + ([side] if side is not None else [])

    def has(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def update_attrs(self, **values) -> None:
        from .meta import CacheMeta

        self.group.attrs.update(values)
        self.attrs.update(values)
        self.meta = CacheMeta.from_attrs(self.attrs, self.path)

    def nbytes_on_disk(self, name: str) -> int:
        p = self.path / name
        if is_remote(p):
            try:
                return int(p.fs.du(p.path, total=True))
            except FileNotFoundError:
                return 0
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

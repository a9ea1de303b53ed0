"""The cache's format, declared once: versions, constants, the Layout and ARRAYS, one row per array.

Every other module of the package derives what it does with an array from its row: `store` allocates
and writes it, `meta` checks its shape and dtype, `integrity` digests, verifies and repairs it, the
extraction fills it and the loader streams it. Imports nothing of kdcache.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

FORMAT_NAME = "kdcache"
# 1: keys, reasons and shard checksums are Zarr `string` arrays. 2: they are fixed-width UTF-8 bytes
# (uint8, zero-padded), so readers without Zarr's variable-length strings (tensorstore) open every array.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REASON_BYTES = 240  # a bad row's reason is cut (at a character boundary) to this many UTF-8 bytes
# 1: a shard's checksum covers its data arrays. 2: also its status and the digest of every packed image
# (`image_digests`, one per row), and the static arrays carry digests in the attributes.
CHECKSUM_VERSION = 2
DIGEST_BYTES = 16
CHECKSUM_CHARS = 64  # a shard checksum: sha256, hex
IDENTITY_SECTIONS = ("teacher", "dataset", "views", "head", "pack", "tokens", "storage", "rows")
# identity sections that caches made before they existed do not record: such a cache reads as this value (and its
# fingerprint, which hashes the sections recorded, stays what it was)
OPTIONAL_SECTIONS = {"rows": {"order": "sorted"}}
ROW_ORDERS = ("shuffled", "sorted")
FEATURE_DTYPES = ("float16", "int8")
FEATURE = "feature"  # an ArraySpec dtype: the layout's feature_dtype (float16, or int8 with a scale array)
INDEX = "index"  # an ArraySpec dtype: class indices, int16 when the classes fit (< 32768), else int32
SPARSE_LOGITS = ("logit_index", "logit_prob", "logit_rest")  # the stored form of `logits` with --logits-topk


class CacheError(ValueError):
    """The cache is missing, incomplete or does not match; the message says how to fix it."""


class IncompleteCreation(CacheError):
    """The store was being created when its process stopped; nothing in it is computed yet."""


OPTIONAL_FIELDS = ("mix_params", "logits_topk")  # Layout fields recorded only when set (0: the feature is off)


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
    mix_params: int = 0  # numbers per mixed-view record (kdcache.mixing); 0: views are not mixed (no `mix` array)
    logits_topk: int = 0  # > 0: logits stored sparse (the teacher's top-K probabilities and the leftover mass)

    def as_attrs(self) -> dict:
        """The layout as the attributes record it (a field at its "absent" default is left out, so caches
        without the feature keep the attributes they had before it existed)."""
        return {k: v for k, v in self.__dict__.items() if not (k in OPTIONAL_FIELDS and v == 0)}

    @property
    def num_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))


@dataclass(frozen=True)
class RowOrder:
    """Which dataset sample each row of the cache holds. `sorted`: row r holds sample r of the dataset's own list
    (its sorted key order: class, or domain then class; every cache made before rows were shuffled). `shuffled`:
    row r holds sample order[r] of a permutation drawn with `seed` (kdcache.datasets.row_permutation), so that
    every shard, and every stream that reads a few shards, holds a fair sample of the classes."""

    order: str = "sorted"
    seed: int | None = None  # shuffled only

    def as_attrs(self) -> dict:
        """The `rows` section of the identity."""
        return {"order": self.order, **({"seed": self.seed} if self.order == "shuffled" else {})}

    def __str__(self) -> str:
        return f"{self.order} (seed {self.seed})" if self.order == "shuffled" else self.order


@dataclass(frozen=True)
class ArraySpec:
    """One cached array.

    shape: symbols of DIMS, the first `rows` (one entry per sample, sharded with the samples) or `shards`
    (one entry per shard). An array one of whose dimensions is 0 in a layout (logits without a head,
    tokens not cached) is not in that cache.
    role: `output` (the teacher's output per view, filled by the extraction and streamed by the loader),
    `pass` (written per shard by the extraction besides the outputs), `scale` (the int8 scale of
    `scale_of`, written with it), `sparse` (the stored form of sparse logits, written in their place),
    `static` (per row, written at creation), `status` (written last per shard), `checksums` / `digests` (the
    per-shard records)."""

    name: str
    shape: tuple[str, ...]
    dtype: str
    role: str
    digested: bool = False  # has a per-shard digest in array_digests (the order of ARRAYS is its index)
    scale_of: str | None = None  # the int8 array this is the per-vector scale of
    text: bool = False  # strings: `string` in format 1, fixed-width UTF-8 bytes (last dimension) in format 2
    since_checksums: int = 1  # written by caches of this checksum version on
    zero_when_bad: bool = False  # a shard of only bad rows holds fill values (no file needed in older caches)
    optional: bool = False  # digested last, and counted in array_digests only by caches that hold it
    logits_form: str = ""  # "dense" / "sparse": stored only when the layout's logits are dense / sparse (top-K)

    @property
    def per_row(self) -> bool:
        return self.shape[0] == "rows"

    @property
    def sharded(self) -> bool:
        """Written shard by shard with the data arrays (before the status)."""
        return self.role in ("output", "pass", "scale", "sparse")


# symbol -> (Zarr dimension name, its size in a layout; `key_bytes` comes from the cache's attributes)
DIMS = {
    "rows": ("row", lambda lay, kb: lay.n),
    "shards": ("shard", lambda lay, kb: lay.num_shards),
    "views": ("view", lambda lay, kb: lay.views),
    "feature_dim": ("feature", lambda lay, kb: lay.feature_dim),
    "classes": ("class", lambda lay, kb: lay.num_classes),
    "topk": ("top_class", lambda lay, kb: lay.logits_topk),
    "tokens": ("token", lambda lay, kb: lay.token_grid ** 2),
    "token_dim": ("channel", lambda lay, kb: lay.token_dim),
    "params": ("view_param", lambda lay, kb: lay.params),
    "mix_params": ("mix_param", lambda lay, kb: lay.mix_params),
    "key_bytes": ("key_byte", lambda lay, kb: kb),
    "reason_bytes": ("reason_byte", lambda lay, kb: REASON_BYTES),
    "digest_bytes": ("digest_byte", lambda lay, kb: DIGEST_BYTES),
    "checksum_chars": ("checksum_char", lambda lay, kb: CHECKSUM_CHARS),
    "digested": ("digested_array", lambda lay, kb: len(digested(lay))),
}

ARRAYS: list[ArraySpec] = [
    ArraySpec("features", ("rows", "views", "feature_dim"), FEATURE, "output", digested=True, zero_when_bad=True),
    ArraySpec("feature_scale", ("rows", "views"), "float32", "scale", digested=True, scale_of="features",
              zero_when_bad=True),
    ArraySpec("logits", ("rows", "views", "classes"), "float16", "output", digested=True, zero_when_bad=True,
              logits_form="dense"),
    ArraySpec("tokens", ("rows", "views", "tokens", "token_dim"), FEATURE, "output", digested=True,
              zero_when_bad=True),
    ArraySpec("token_scale", ("rows", "views", "tokens"), "float32", "scale", digested=True, scale_of="tokens",
              zero_when_bad=True),
    ArraySpec("views", ("rows", "views", "params"), "float32", "pass", digested=True, zero_when_bad=True),
    # a mixed view's partner (row in the shard), lambda, cutmix box and the partner's view (kdcache.mixing)
    ArraySpec("mix", ("rows", "views", "mix_params"), "float32", "pass", digested=True, zero_when_bad=True,
              optional=True),
    ArraySpec("labels", ("rows",), "int32", "static"),
    ArraySpec("domains", ("rows",), "int16", "static"),
    ArraySpec("splits", ("rows",), "int8", "static"),
    ArraySpec("keys", ("rows", "key_bytes"), "uint8", "static", text=True),
    ArraySpec("status", ("rows",), "uint8", "status", digested=True),
    ArraySpec("reasons", ("rows", "reason_bytes"), "uint8", "pass", digested=True, text=True),
    ArraySpec("image_digests", ("rows", "digest_bytes"), "uint8", "pass", digested=True, since_checksums=2),
    ArraySpec("shard_checksums", ("shards", "checksum_chars"), "uint8", "checksums", text=True),
    ArraySpec("array_digests", ("shards", "digested", "digest_bytes"), "uint8", "digests", since_checksums=2),
    # --logits-topk K: per view the teacher's K most probable classes, their probabilities (softmax at T=1) and
    # the probability left to the other classes; readers of `logits` get the distribution they make
    # (cache.sparse), written from dense logits by the store
    ArraySpec("logit_index", ("rows", "views", "topk"), INDEX, "sparse", digested=True, zero_when_bad=True,
              logits_form="sparse", optional=True),
    ArraySpec("logit_prob", ("rows", "views", "topk"), "float16", "sparse", digested=True, zero_when_bad=True,
              logits_form="sparse", optional=True),
    ArraySpec("logit_rest", ("rows", "views"), "float16", "sparse", digested=True, zero_when_bad=True,
              logits_form="sparse", optional=True),
]


def arrays() -> list[ArraySpec]:
    """The table (read at each call, so a table extended at run time is seen everywhere)."""
    return ARRAYS


def spec(name: str) -> ArraySpec:
    for a in arrays():
        if a.name == name:
            return a
    raise KeyError(f"{name!r} is not a cache array")


def shard_arrays() -> tuple[str, ...]:
    """Written per shard, before the status (the order is the one they are written in)."""
    return tuple(a.name for a in arrays() if a.sharded)


def digested(lay: Layout | None = None) -> tuple[str, ...]:
    """The arrays with a digest per shard; `array_digests[k, i]` is the digest of the i-th. Optional arrays come
    last, so the others keep their index; with a layout, only the optional arrays a cache of it holds."""
    fixed = [a for a in arrays() if a.digested and not a.optional]
    extra = [a.name for a in arrays() if a.digested and a.optional and (lay is None or present(a, lay))]
    return tuple([a.name for a in fixed if a.sharded] + [a.name for a in fixed if not a.sharded] + extra)


def static_arrays() -> tuple[str, ...]:
    return tuple(a.name for a in arrays() if a.role == "static")


def text_arrays() -> tuple[str, ...]:
    return tuple(a.name for a in arrays() if a.text)


def outputs() -> tuple[str, ...]:
    """The teacher's outputs per view, as the extraction computes them and the loader streams them."""
    return tuple(a.name for a in arrays() if a.role == "output")


def quantised() -> dict[str, str]:
    """int8 array -> its per-vector scale array."""
    return {a.scale_of: a.name for a in arrays() if a.scale_of}


def dimensions() -> dict[str, tuple[str, ...]]:
    """Named dimensions (Zarr v3 dimension_names), so xarray.open_zarr reads the cache as one dataset."""
    return {a.name: tuple(DIMS[s][0] for s in a.shape) for a in arrays()}


def present(a: ArraySpec, lay: Layout, checksums: int = CHECKSUM_VERSION) -> bool:
    """Array `a` is part of a cache of layout `lay` (and checksum version `checksums`)."""
    if checksums < a.since_checksums:
        return False
    if a.logits_form and (a.logits_form == "sparse") != (lay.logits_topk > 0):
        return False
    if a.scale_of is not None and (lay.feature_dtype != "int8" or not present(spec(a.scale_of), lay, checksums)):
        return False
    return all(DIMS[s][1](lay, 1) > 0 for s in a.shape)


def computed(a: ArraySpec, lay: Layout) -> bool:
    """`a` is a teacher output the extraction computes for a cache of `lay`: logits are computed dense and
    stored sparse when the layout says so (the store sparsifies them as it writes)."""
    return a.role == "output" and present(a, replace(lay, logits_topk=0))


def shape(a: ArraySpec, lay: Layout, key_bytes: int = 0, text_as_bytes: bool = True) -> tuple[int, ...]:
    dims = a.shape if text_as_bytes or not a.text else a.shape[:-1]
    return tuple(DIMS[s][1](lay, key_bytes) for s in dims)


def dtype(a: ArraySpec, lay: Layout, text_as_bytes: bool = True) -> str:
    if a.text and not text_as_bytes:
        return "str"
    if a.dtype == INDEX:
        return index_dtype(lay.num_classes)
    return lay.feature_dtype if a.dtype == FEATURE else a.dtype


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes < 2 ** 15 else "int32"


def buffer_dtype(a: ArraySpec) -> str:
    """What the teacher's outputs are held as before they are written (float16; int8 is quantised on write)."""
    return "float16" if a.dtype == FEATURE else a.dtype

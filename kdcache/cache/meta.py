"""The cache's metadata, read and validated in one place: the only reader of the root attributes.

`CacheMeta.from_attrs` turns the root group's attributes into typed fields and refuses a missing,
mistyped or inconsistent field with one error naming it; `check_arrays` compares every array's
shape and dtype (from its zarr.json) with what ARRAYS and the layout say it must be. Both run whenever
a cache is opened, so a hand-edited or damaged zarr.json is an error before any data is read.
Imports only cache.format.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .format import (FEATURE_DTYPES, FORMAT_NAME, IDENTITY_SECTIONS, OPTIONAL_FIELDS, OPTIONAL_SECTIONS,
                     READABLE_VERSIONS, ROW_ORDERS, CacheError, IncompleteCreation, Layout, RowOrder, arrays, dtype,
                     present, shape)

# what fixes a base array's damaged metadata: the layout in the root's attributes determines it
_METADATA_FIX = ("run the extract command again with --repair (it writes the metadata again from the cache's layout; "
                 "caches of an older format: re-extract with --overwrite)")
HEAD_KINDS = ("probe", "native", "zeroshot", "none")


def _error(path: Path, field: str, problem: str):
    return CacheError(f"cache {path}: metadata field {field!r} {problem}; its zarr.json was edited or damaged "
                      f"(check with `python cli.py info --cache {shlex.quote(str(path))} --verify`, or re-extract with --overwrite)")


def _get(d: dict, dotted: str, kind, path: Path, *, low: int | None = None):
    value = d
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise _error(path, dotted, "is missing")
        value = value[part]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise _error(path, dotted, f"is {value!r}, not {getattr(kind, '__name__', kind)}")
    if low is not None and value < low:
        raise _error(path, dotted, f"is {value}, below {low}")
    return value


def _row_order(a: dict, path: Path) -> RowOrder:
    """The `rows` section as a RowOrder; a cache without one (made before rows were shuffled) is sorted."""
    if "rows" not in a:
        return RowOrder()
    order = _get(a, "rows.order", str, path)
    if order not in ROW_ORDERS:
        raise _error(path, "rows.order", f"is {order!r}, not one of {ROW_ORDERS}")
    if order == "sorted":
        if "seed" in a["rows"]:
            raise _error(path, "rows.seed", "is set, but sorted rows have no seed")
        return RowOrder()
    return RowOrder(order, _get(a, "rows.seed", int, path, low=0))


# the extract flags that set each identity field (the longest recorded prefix of a field's path names them)
IDENTITY_FLAGS = {
    "teacher": "--teacher", "teacher.weights": "--teacher-weights, --random-init", "teacher.feature_point": "--feature",
    "teacher.preprocess": "--teacher-input-size", "dataset": "--dataset, --data-root, --dataset-opt, --domain",
    "views.V": "--views", "views.policy": "--view-policy", "views.policy_params": "--view-policy",
    "views.seed": "--view-seed", "views.decode": "--decode", "views.mix": "--mix, --mix-prob, --mix-alpha",
    "head.kind": "--head", "head.logits_topk": "--logits-topk", "head.probe_domains": "--probe-domain",
    "pack.image_bound": "--image-bound", "pack.shard_size": "--shard-size", "tokens": "--tokens",
    "storage.feature_dtype": "--feature-dtype", "rows": "--row-order, --row-seed"}
SHOWN_CHARS = 60  # a recorded value longer than this is cut in a message


def _flags_of(path: str) -> str:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in IDENTITY_FLAGS:
            return f" ({IDENTITY_FLAGS['.'.join(parts[:n])]})"
    return ""


def _shown(value) -> str:
    """A recorded value as a message shows it: `none` for a feature left out (off), a mixed-views record by its
    mode and odds, anything long cut."""
    if value is None:
        return "none"
    if isinstance(value, str) and is_digest(value):
        return value[:12]
    if isinstance(value, dict) and "mode" in value:
        return f"{value['mode']} (prob {value.get('prob')}, alpha {value.get('alpha')})"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def is_digest(text: str) -> bool:
    """A sha256 hex digest (a fingerprint): a message shows its first 12 digits, as everywhere."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _differences(path: str, a, b, depth: int) -> list[str]:
    """One line per field where the cache's record `a` differs from the asked-for `b`, down to `depth` levels,
    each naming the flags that set it."""
    if a == b:
        return []
    if depth > 0 and isinstance(a, dict) and isinstance(b, dict):
        return [line for k in sorted(set(a) | set(b))
                for line in _differences(f"{path}.{k}", a.get(k), b.get(k), depth - 1)]
    return [f"{path}{_flags_of(path)}: the cache has {_shown(a)}, this command asks for {_shown(b)}"]


@dataclass(frozen=True)
class CacheMeta:
    layout: Layout
    teacher: str
    feature_dim: int
    input_size: int
    classes: tuple
    domains: tuple
    head_kind: str
    head_fitted: bool
    image_bound: int
    checksums: int
    replay: int
    format_version: int = 1
    key_bytes: int = 0  # format 2: the width of the keys array
    rows: RowOrder = RowOrder()  # which dataset sample each row holds (caches that record none: sorted)
    attrs: dict = field(default_factory=dict, repr=False, compare=False)  # as read; use the accessors below

    @staticmethod
    def check_format(a: dict, path: Path) -> None:
        """The attributes are those of a finished cache in a format this kdcache reads."""
        if a.get("kdcache_creating"):
            raise IncompleteCreation(f"{path}: the cache's creation was interrupted; run extract again")
        if a.get("format") != FORMAT_NAME:
            raise CacheError(f"{path} is a Zarr store but not a {FORMAT_NAME} cache")
        if a.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{path}: cache format version {a.get('format_version')} is not one this "
                             f"kdcache reads ({', '.join(map(str, READABLE_VERSIONS))}); re-extract with --overwrite, "
                             "or use the kdcache that wrote it")

    @classmethod
    def from_attrs(cls, a: dict, path: Path) -> CacheMeta:
        lay_raw = a.get("layout")
        if not isinstance(lay_raw, dict):
            raise _error(path, "layout", "is missing")
        fields = {f.name: f for f in dataclasses.fields(Layout)}
        unknown = sorted(set(lay_raw) - set(fields))
        if unknown:
            raise _error(path, f"layout.{unknown[0]}", "is not a layout field")
        values = {}
        for name, f in fields.items():
            if name == "feature_dtype":
                v = lay_raw.get(name, "float16")
                if v not in FEATURE_DTYPES:
                    raise _error(path, "layout.feature_dtype", f"is {v!r}, not one of {FEATURE_DTYPES}")
                values[name] = v
            elif name in OPTIONAL_FIELDS and name not in lay_raw:  # recorded only when set
                values[name] = 0
            else:
                low = 1 if name in ("n", "views", "feature_dim", "shard_size", "params") else 0
                values[name] = _get(a, f"layout.{name}", int, path, low=low)
        lay = Layout(**values)
        if lay.logits_topk and lay.logits_topk >= lay.num_classes:
            raise _error(path, "layout.logits_topk", f"is {lay.logits_topk}, not below the {lay.num_classes} classes")
        teacher = _get(a, "teacher.name", str, path)
        feature_dim = _get(a, "teacher.feature_dim", int, path, low=1)
        input_size = _get(a, "teacher.preprocess.input_size", int, path, low=1)
        classes = _get(a, "dataset.classes", list, path)
        domains = _get(a, "dataset.domains", list, path)
        n = _get(a, "dataset.N", int, path, low=1)
        views = _get(a, "views.V", int, path, low=1)
        head = _get(a, "head.kind", str, path)
        if head not in HEAD_KINDS:
            raise _error(path, "head.kind", f"is {head!r}, not one of {HEAD_KINDS}")
        fitted = a.get("head_fit", {}).get("fitted") if isinstance(a.get("head_fit"), dict) else None
        if not isinstance(fitted, bool):
            raise _error(path, "head_fit.fitted", "is missing or not true/false")
        grid = _get(a, "tokens.grid", int, path, low=0)
        bound = _get(a, "pack.image_bound", int, path, low=1)
        shard_size = _get(a, "pack.shard_size", int, path, low=1)
        checksums = a.get("checksums", 1)
        if checksums not in (1, 2):
            raise _error(path, "checksums", f"is {checksums!r}, not 1 or 2")
        replay = a["views"].get("replay", 1)
        version = _get(a, "format_version", int, path, low=1)
        key_bytes = _get(a, "key_bytes", int, path, low=1) if version >= 2 else 0
        # the same facts are recorded twice (layout and identity): they must agree
        pairs = [("layout.n", lay.n, "dataset.N", n), ("layout.views", lay.views, "views.V", views),
                 ("layout.feature_dim", lay.feature_dim, "teacher.feature_dim", feature_dim),
                 ("layout.token_grid", lay.token_grid, "tokens.grid", grid),
                 ("layout.shard_size", lay.shard_size, "pack.shard_size", shard_size),
                 ("layout.logits_topk", lay.logits_topk, "head.logits_topk", a["head"].get("logits_topk", 0))]
        if head == "probe":
            pairs.append(("layout.num_classes", lay.num_classes, "len(dataset.classes)", len(classes)))
        if head == "none":
            pairs.append(("layout.num_classes", lay.num_classes, "(head none)", 0))
        for f1, v1, f2, v2 in pairs:
            if v1 != v2:
                raise _error(path, f1, f"is {v1} but {f2} is {v2}")
        if len(domains) < 1 or len(classes) < 1:
            raise _error(path, "dataset.classes" if not classes else "dataset.domains", "is empty")
        return cls(lay, teacher, feature_dim, input_size, tuple(classes), tuple(domains), head, fitted, bound,
                   int(checksums), int(replay), version, key_bytes, _row_order(a, path), json.loads(json.dumps(a)))

    def expected_arrays(self) -> dict[str, tuple[tuple, str]]:
        """name -> (shape, dtype) of every base array of a cache with this layout (from ARRAYS)."""
        as_bytes = self.format_version >= 2  # text as fixed-width UTF-8 bytes
        return {a.name: (shape(a, self.layout, self.key_bytes, as_bytes), dtype(a, self.layout, as_bytes))
                for a in arrays() if present(a, self.layout, self.checksums)}

    def check_arrays(self, group, path: Path) -> None:
        """Every expected array exists with the expected shape and dtype (metadata only, no data read)."""
        for name, (shape, dtype) in self.expected_arrays().items():
            try:
                arr = group[name]
            except KeyError:
                raise CacheError(f"cache {path}: array {name!r} is missing; re-extract with --overwrite, or restore "
                                 "it from a copy") from None
            except Exception as e:  # a damaged zarr.json of the array
                raise CacheError(f"cache {path}: array {name!r} has unreadable metadata ({type(e).__name__}: {e}); "
                                 f"{_METADATA_FIX}") from None
            got = arr.dtype
            is_str = got.kind in "OUT" or str(got).startswith(("<U", "StringDType")) or "String" in type(got).__name__
            same = is_str if dtype == "str" else (not is_str and np.dtype(got) == np.dtype(dtype))
            if tuple(arr.shape) != shape or not same:
                raise CacheError(f"cache {path}: array {name!r} is {got} {tuple(arr.shape)}, expected {dtype} {shape}; "
                                 f"its zarr.json was edited or damaged: {_METADATA_FIX}")

    def probe_missing(self, group) -> str | None:
        """The first missing part of a fitted probe head (heads/extract), or None."""
        if self.head_kind != "probe" or not self.head_fitted:
            return None
        for name in ("weight", "bias", "fitted_on"):
            try:
                group[f"heads/extract/{name}"]
            except KeyError:
                return f"heads/extract/{name}"
            except Exception:  # noqa: BLE001 - damaged metadata of the head (or of its groups)
                return f"heads/extract/{name} (its metadata cannot be read)"
        return None

    # ------------------------------------------------------------------ typed accessors of the other attributes

    def section(self, name: str, default=None):
        """A copy of one recorded section (teacher, dataset, views, head, head_fit, tokens, storage, config...)."""
        value = self.attrs.get(name, default)
        return json.loads(json.dumps(value)) if value is not None else None

    def identity(self) -> dict:
        """The identity sections as recorded (an optional section the cache does not record is left out)."""
        return {k: self.section(k) for k in IDENTITY_SECTIONS if k not in OPTIONAL_SECTIONS or k in self.attrs}

    def mismatches(self, identity: dict) -> list[str]:
        """Sections (and fields) where this cache differs from a requested identity (an optional section that
        either side leaves out counts as its value in OPTIONAL_SECTIONS)."""
        out = []
        mine, theirs = self.identity(), json.loads(json.dumps(identity))
        for side in (mine, theirs):
            for name, value in OPTIONAL_SECTIONS.items():
                side.setdefault(name, json.loads(json.dumps(value)))
        for section in IDENTITY_SECTIONS:
            out += _differences(section, mine.get(section), theirs.get(section), depth=2)
        return out

    @property
    def extract_config(self) -> dict:
        """The extract command's options as recorded ({} for caches without them)."""
        return self.section("config") or {}

    @property
    def token_dim(self) -> int:
        """The width of a cached token, as recorded (tokens.dim)."""
        return self.attrs["tokens"]["dim"]

    @property
    def command(self) -> str | None:
        return self.attrs.get("command")

    @property
    def teacher_weights(self) -> str:
        """The tag of the weights the cache was extracted with."""
        return self.attrs["teacher"]["weights"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.attrs["dataset"]["fingerprint"]

    @property
    def static_digests(self) -> dict | None:
        return self.section("static_digests")

    @property
    def head_digest(self) -> str | None:
        """The digest of the fitted probe head's arrays, recorded when it was fitted."""
        fit = self.attrs.get("head_fit")
        return fit.get("digest") if isinstance(fit, dict) else None

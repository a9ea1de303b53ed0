"""The cache's metadata, read and validated in one place.

`CacheMeta.from_attrs` turns the root group's attributes into typed fields and refuses a missing,
mistyped or inconsistent field with one error naming it; `check_arrays` compares every array's
shape and dtype (from its zarr.json) with what the layout says it must be. Both run whenever a
cache is opened, so a hand-edited or damaged zarr.json is an error before any data is read.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEAD_KINDS = ("probe", "native", "zeroshot", "none")


def _error(path: Path, field: str, problem: str):
    from .store import CacheError

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


@dataclass(frozen=True)
class CacheMeta:
    layout: Layout  # noqa: F821
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

    @classmethod
    def from_attrs(cls, a: dict, path: Path) -> CacheMeta:
        from .store import FEATURE_DTYPES, Layout

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
            else:
                low = 1 if name in ("n", "views", "feature_dim", "shard_size", "params") else 0
                values[name] = _get(a, f"layout.{name}", int, path, low=low)
        lay = Layout(**values)
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
                 ("layout.shard_size", lay.shard_size, "pack.shard_size", shard_size)]
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
                   int(checksums), int(replay), version, key_bytes)

    def expected_arrays(self) -> dict[str, tuple[tuple, str]]:
        """name -> (shape, dtype) of every base array of a cache with this layout."""
        lay = self.layout
        N, V, D = lay.n, lay.views, lay.feature_dim
        out = {"features": ((N, V, D), lay.feature_dtype), "views": ((N, V, lay.params), "float32"),
               "labels": ((N,), "int32"), "domains": ((N,), "int16"), "splits": ((N,), "int8"),
               "status": ((N,), "uint8"), "shard_checksums": ((lay.num_shards,), "str"), "keys": ((N,), "str"),
               "reasons": ((N,), "str")}
        if self.format_version >= 2:  # text as fixed-width UTF-8 bytes
            from .store import CHECKSUM_CHARS, REASON_BYTES

            out.update(shard_checksums=((lay.num_shards, CHECKSUM_CHARS), "uint8"), keys=((N, self.key_bytes), "uint8"),
                       reasons=((N, REASON_BYTES), "uint8"))
        if lay.feature_dtype == "int8":
            out["feature_scale"] = ((N, V), "float32")
        if lay.num_classes:
            out["logits"] = ((N, V, lay.num_classes), "float16")
        if lay.token_grid:
            out["tokens"] = ((N, V, lay.token_grid ** 2, lay.token_dim), lay.feature_dtype)
            if lay.feature_dtype == "int8":
                out["token_scale"] = ((N, V, lay.token_grid ** 2), "float32")
        if self.checksums >= 2:
            from .store import DIGEST_BYTES, DIGESTED

            out["image_digests"] = ((N, DIGEST_BYTES), "uint8")
            out["array_digests"] = ((lay.num_shards, len(DIGESTED), DIGEST_BYTES), "uint8")
        return out

    def check_arrays(self, group, path: Path) -> None:
        """Every expected array exists with the expected shape and dtype (metadata only, no data read)."""
        from .store import CacheError

        for name, (shape, dtype) in self.expected_arrays().items():
            try:
                arr = group[name]
            except KeyError:
                raise CacheError(f"cache {path}: array {name!r} is missing; re-extract with --overwrite, or restore "
                                 "it from a copy") from None
            except Exception as e:  # a damaged zarr.json of the array
                raise CacheError(f"cache {path}: array {name!r} has unreadable metadata ({type(e).__name__}: {e}); "
                                 "re-extract with --overwrite") from None
            got = arr.dtype
            is_str = got.kind in "OUT" or str(got).startswith(("<U", "StringDType")) or "String" in type(got).__name__
            same = is_str if dtype == "str" else (not is_str and np.dtype(got) == np.dtype(dtype))
            if tuple(arr.shape) != shape or not same:
                raise CacheError(f"cache {path}: array {name!r} is {got} {tuple(arr.shape)}, expected {dtype} {shape}; "
                                 "its zarr.json was edited or damaged: re-extract with --overwrite")

    def probe_missing(self, group) -> str | None:
        """The first missing part of a fitted probe head (heads/extract), or None."""
        if self.head_kind != "probe" or not self.head_fitted:
            return None
        for name in ("weight", "bias", "fitted_on"):
            try:
                group[f"heads/extract/{name}"]
            except KeyError:
                return f"heads/extract/{name}"
        return None

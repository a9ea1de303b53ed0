"""Every array of a cache is repairable or re-derivable, its metadata included.

For each array a cache holds (data, records, static, status) and for its zarr.json: a damaged file is named by
`info --verify` (or refused at open, naming the fix), and `extract --repair` gives back the very cache that was
damaged, fingerprint included. Records whose data is intact (a shard checksum, a shard's array digests) are
written again from the data, not recomputed. A cache whose root document is damaged is refused before anything
is written.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_cache, tiny_extract_cfg
from hypothesis import HealthCheck, given, settings, strategies as st

from kdcache import cacheinfo
from kdcache.cache.backend import chunk_path
from kdcache.cache.format import CacheError, arrays
from kdcache.cache.store import CacheStore
from kdcache.stages import extract

N, S = 48, 8


def _cfg(out, **kw) -> extract.ExtractConfig:
    return tiny_extract_cfg(out, N, S, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return extract.run(_cfg(tmp_path_factory.mktemp("repair") / "ref"))


def _names(reference) -> list[str]:
    store = CacheStore.open(reference)
    return [a.name for a in arrays() if store.has(a.name)]


ARRAY_NAMES = ["features", "logits", "views", "labels", "domains", "splits", "keys", "status", "reasons",
               "image_digests", "shard_checksums", "array_digests"]
# by default the metadata arrays (the round-three cases) and one data array; every array under -m slow (and in
# `make fuzz`, which damages every array of a cache at random)
QUICK = ("features", "labels", "keys", "status", "shard_checksums", "array_digests")
EVERY_ARRAY = [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in ARRAY_NAMES]
METADATA = [n if n in ("status", "features") else pytest.param(n, marks=pytest.mark.slow) for n in ARRAY_NAMES]


def test_the_list_covers_every_array_of_the_cache(reference):
    assert sorted(_names(reference)) == sorted(ARRAY_NAMES)


def _file(cache: Path, name: str, k: int) -> Path:
    store = CacheStore.open(cache)
    return chunk_path(cache, name, store.group[name], k)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _found(cache: Path) -> str:
    """What verify says (or the open's refusal)."""
    try:
        return "\n".join(cacheinfo.verify(CacheStore.open(cache)))
    except CacheError as e:
        return str(e)


def _repaired_equals(reference: Path, cache: Path, named: str) -> None:
    found = _found(cache)
    assert named in found, found
    extract.run(_cfg(cache, repair=True))
    assert cacheinfo.verify(CacheStore.open(cache)) == []
    assert_same_cache(reference, cache)
    assert CacheStore.open(cache).fingerprint() == CacheStore.open(reference).fingerprint()


@pytest.mark.parametrize("name", EVERY_ARRAY)
def test_a_truncated_shard_file_of_any_array_is_named_and_repaired(reference, tmp_path, name):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    path = _file(cache, name, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    # per-shard damage names its shard (an unreadable status makes the shard todo); static arrays are named
    named = {"labels": "labels", "domains": "domains", "splits": "splits", "keys": "keys",
             "status": "status: shard(s) 2"}.get(name, "shard 2")
    _repaired_equals(reference, cache, named)


@pytest.mark.parametrize("name", METADATA)
def test_damaged_array_metadata_is_written_again_from_the_layout(reference, tmp_path, name):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    doc = cache / name / "zarr.json"
    doc.write_bytes(doc.read_bytes()[:120])
    _repaired_equals(reference, cache, f"array {name!r}")
    assert "--repair" in _found_refusal(reference, tmp_path, name)


def _found_refusal(reference, tmp_path, name) -> str:
    cache = tmp_path / "again"
    shutil.copytree(reference, cache)
    (cache / name / "zarr.json").write_text("{")
    return _found(cache)


def _rewrite_record(cache: Path, name: str, k: int, change) -> None:
    store = CacheStore.open(cache, mode="r+")
    values = store.group[name][k]
    store.put_record(name, k, change(values.copy()))


@pytest.mark.parametrize("name", ["shard_checksums", "array_digests"])
def test_a_readable_but_wrong_record_is_named_and_written_again_without_recomputing(reference, tmp_path, name,
                                                                                     monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)

    def change(v):
        v[..., 3] = (v[..., 3].astype(np.int64) + 1) % 256 if name == "array_digests" else ord("0") + (v[..., 3] == ord("0"))
        return v

    _rewrite_record(cache, name, 3, change)
    found = _found(cache)
    assert "shard 3: recorded" in found and name in found, found
    shards_recomputed = []
    real = extract.teacher_pass
    monkeypatch.setattr(extract, "teacher_pass", lambda store, ds, t, spec, shards, **kw:
                        shards_recomputed.extend(shards) or real(store, ds, t, spec, shards, **kw))
    extract.run(_cfg(cache, repair=True))
    assert shards_recomputed == []
    assert cacheinfo.verify(CacheStore.open(cache)) == []
    assert_same_cache(reference, cache)
    assert CacheStore.open(cache).fingerprint() == CacheStore.open(reference).fingerprint()


def test_a_changed_status_value_is_named_and_the_shard_recomputed(reference, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    store = CacheStore.open(cache, mode="r+")
    r = store.layout.rows(1)
    status = store.group["status"][r.start:r.stop]
    status[0] = 2  # a done row now reads as bad
    store._put_rows(1, {"status": status})
    _repaired_equals(reference, cache, "shard(s) 1 differ from the status recorded")


def test_a_damaged_root_document_is_refused_before_anything_is_written(reference, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    (cache / "zarr.json").write_bytes((reference / "zarr.json").read_bytes()[:200])
    before = _tree_digest(cache)
    with pytest.raises(CacheError, match="zarr.json"):
        extract.run(_cfg(cache, repair=True))
    assert _tree_digest(cache) == before


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(ARRAY_NAMES), k=st.integers(0, N // S - 1), cut=st.floats(0.0, 0.95),
       flips=st.lists(st.integers(0, 10**6), min_size=1, max_size=4), truncate=st.booleans())
def test_random_damage_to_any_array_is_repaired_or_harmless(reference, tmp_path_factory, name, k, cut, flips, truncate):
    cache = tmp_path_factory.mktemp("fuzz") / "cache"
    shutil.copytree(reference, cache)
    path = _file(cache, name, k)
    data = bytearray(path.read_bytes())
    if truncate:
        data = data[: int(len(data) * cut)]
    else:
        for f in flips:
            data[f % len(data)] ^= 0xA5
    path.write_bytes(bytes(data))
    extract.run(_cfg(cache, repair=True))
    assert cacheinfo.verify(CacheStore.open(cache)) == []
    assert_same_cache(reference, cache)


@pytest.mark.parametrize("part", ["heads/extract/bias/zarr.json", "heads/extract/weight/c/0/0"])
def test_a_damaged_probe_head_is_named_and_fitted_again(reference, tmp_path, part):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    path = cache / part
    path.write_bytes(path.read_bytes()[:20] + b"\xff\xfe" + path.read_bytes()[22:])
    _repaired_equals(reference, cache, "head:")


def test_an_unreadable_checksum_record_is_a_cache_error_where_distill_binds_the_run(reference, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    path = _file(cache, "shard_checksums", 4)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CacheError, match="checksum of shard 4 .*--repair"):
        CacheStore.open(cache).fingerprint()

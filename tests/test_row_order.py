"""The cache's row order: a new cache holds the dataset's samples in a seeded permutation (so a shard is a fair
sample of the classes, not a run of one), the same one in every per-row array, packed tar and teacher output;
`--row-order sorted`, and every cache made before rows were shuffled, keep the dataset's own order."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from conftest import TINY, assert_same_cache, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.cache.format import RowOrder
from kdcache.cache.store import CacheStore
from kdcache.datasets import create_dataset, row_permutation, synthetic_image
from kdcache.extract.rows import in_row_order
from kdcache.images import decode_packed
from kdcache.pack import pack_shard, read_members, shard_name
from kdcache.train.inputs import check_dataset, open_cache

N, S, C, SIZE = 192, 12, 8, 32  # a shard of the sorted list is one class of one domain
OPTIONS = {"n": N, "classes": C, "size": SIZE, "sort": 1}
ARGS = TINY + [a for k, v in OPTIONS.items() for a in ("--dataset-opt", f"{k}={v}")] + [
    "--views", "2", "--shard-size", str(S), "--workers", "0", "--batch-size", "16"]


def _dataset():
    return create_dataset("synthetic", **OPTIONS)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffled") / "cache"
    run_cli("extract", *ARGS, "--out", out)
    return out


@pytest.fixture(scope="module")
def in_order(tmp_path_factory):
    out = tmp_path_factory.mktemp("sorted") / "cache"
    run_cli("extract", *ARGS, "--row-order", "sorted", "--out", out)
    return out


def _shard_classes(labels: np.ndarray) -> list[int]:
    return [len(set(labels[k * S:(k + 1) * S].tolist())) for k in range(N // S)]


# ----------------------------------------------------------------------------- the permutation


def test_row_permutation_is_pinned():
    """The order of a seed never changes (a cache resumed under another numpy must get the same rows)."""
    assert row_permutation(10, 0).tolist() == [2, 4, 6, 8, 5, 1, 7, 0, 9, 3]
    assert row_permutation(10, 1).tolist() == [7, 4, 8, 1, 2, 6, 5, 0, 9, 3]
    assert row_permutation(0, 3).tolist() == [] and row_permutation(1, 2**32 - 1).tolist() == [0]


@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_row_permutation_is_a_seeded_permutation(n, seed):
    order = row_permutation(n, seed)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, row_permutation(n, seed))
    if n >= 20:  # another seed, another order; and no sorted run survives
        assert not np.array_equal(order, row_permutation(n, seed + 1))
        assert not np.array_equal(order, np.arange(n))


@given(n=st.integers(1, 60), classes=st.integers(1, 6), domains=st.integers(1, 3), sort=st.integers(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_a_reordered_dataset_holds_the_permuted_samples_and_keeps_its_fingerprint(n, classes, domains, sort, seed):
    listed = create_dataset("synthetic", n=n, classes=classes, domains=domains, size=8, sort=sort)
    rows = in_row_order(listed, RowOrder("shuffled", seed))
    order = row_permutation(n, seed)
    assert rows.samples == [listed.samples[i] for i in order]
    assert rows.fingerprint() == listed.fingerprint() == rows.describe()["fingerprint"]
    r = int(np.argmax(order))  # the row holding the last sample reads that sample's bytes
    assert rows.read_bytes(r) == listed.read_bytes(n - 1)
    assert in_row_order(listed, RowOrder()) is listed
    with pytest.raises(ValueError, match="permutation"):
        listed.reordered([0] * n if n > 1 else [1])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), shard_size=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_packed_rows_hold_the_images_of_the_permuted_samples(tmp_path_factory, n, shard_size, seed):
    """pack_shard over the reordered dataset: member r of a tar is the image of the sample that row r holds."""
    tmp = tmp_path_factory.mktemp("pack")
    rows = in_row_order(create_dataset("synthetic", n=n, classes=3, size=8, sort=1), RowOrder("shuffled", seed))
    for k in range((n + shard_size - 1) // shard_size):
        span = range(k * shard_size, min((k + 1) * shard_size, n))
        pack_shard(rows, span, tmp / shard_name(k), 64)
        found, problems = read_members(tmp / shard_name(k), span)
        assert not problems and sorted(found) == list(span)
        for r, (ext, data) in found.items():
            s = rows.samples[r]
            index = int(s.key.rsplit("/", 1)[1][:6])
            expected = synthetic_image(index, s.label, s.domain, 8)
            assert ext == "png" and np.array_equal(decode_packed(data).permute(1, 2, 0).numpy(), expected)


# ----------------------------------------------------------------------------- extraction


def test_a_new_cache_holds_its_rows_shuffled_and_every_array_agrees(shuffled, in_order):
    store, listed = CacheStore.open(shuffled), _dataset()
    labels = store.static("labels")
    assert store.attrs["rows"] == {"order": "shuffled", "seed": 0} and store.meta.rows == RowOrder("shuffled", 0)
    assert store.attrs["config"]["row_order"] == "shuffled" and store.attrs["config"]["row_seed"] == 0
    assert not (np.diff(labels) >= 0).all()  # not sorted
    assert min(_shard_classes(labels)) >= 4 and np.mean(_shard_classes(labels)) >= 5  # sorted: 1 class a shard
    # the fingerprint is the dataset's own, as listed: distill's dataset check passes
    assert store.meta.dataset_fingerprint == listed.fingerprint()
    check_dataset(open_cache(str(shuffled)))
    # row r holds the sample whose key it records: label, domain, split and the packed image
    by_key = {s.key: s for s in listed.samples}
    keys = [str(k) for k in store.text("keys")]
    assert sorted(keys) == sorted(by_key)
    samples = [by_key[k] for k in keys]
    assert np.array_equal(labels, [s.label for s in samples])
    assert np.array_equal(store.static("domains"), [s.domain for s in samples])
    assert np.array_equal(store.static("splits"), [s.split for s in samples])
    for k in (0, N // S - 1):
        found, _ = read_members(store.images_dir / shard_name(k), store.layout.rows(k))
        for r, (_, data) in found.items():
            s = samples[r]
            pixels = synthetic_image(int(keys[r].rsplit("/", 1)[1][:6]), s.label, s.domain, SIZE)
            assert np.array_equal(decode_packed(data).permute(1, 2, 0).numpy(), pixels)
    # the same rows as the sorted cache, permuted: static arrays and packed images exactly, the teacher's clean
    # view up to the batch a row was computed in
    other = CacheStore.open(in_order)
    order = np.array([listed.samples.index(by_key[k]) for k in keys])
    assert np.array_equal(order, row_permutation(N, 0))
    for name in ("labels", "domains", "splits", "image_digests"):
        assert np.array_equal(store.array(name)[:], other.array(name)[:][order]), name
    assert list(other.text("keys")[order]) == keys
    clean, clean_sorted = store.read("features", 0, N)[:, 0], other.read("features", 0, N)[:, 0]
    assert np.allclose(clean.astype(np.float32), clean_sorted[order].astype(np.float32), atol=2e-3, rtol=1e-2)


def test_sorted_rows_keep_the_datasets_order(in_order):
    store, listed = CacheStore.open(in_order), _dataset()
    assert store.attrs["rows"] == {"order": "sorted"} and store.meta.rows == RowOrder()
    assert [str(k) for k in store.text("keys")] == [s.key for s in listed.samples]
    assert np.array_equal(store.static("labels"), [s.label for s in listed.samples])
    assert _shard_classes(store.static("labels")) == [1] * (N // S)  # what shuffling is for
    assert store.meta.dataset_fingerprint == listed.fingerprint()


def test_the_same_seed_gives_the_same_cache_resumed_or_not_and_another_seed_another_order(shuffled, tmp_path):
    again = tmp_path / "again"
    run_cli("extract", *ARGS, "--row-seed", "0", "--out", again)
    assert_same_cache(shuffled, again)
    store = CacheStore.open(again, mode="r+")
    for k in (1, 5):  # sent back to work, one with its tar gone: resumed bit-identical
        store.mark_todo(k)
    (store.images_dir / shard_name(5)).unlink()
    run_cli("extract", *ARGS, "--out", again)
    assert_same_cache(shuffled, again)
    seven = tmp_path / "seven"
    run_cli("extract", *ARGS, "--row-seed", "7", "--out", seven)
    a, b = CacheStore.open(shuffled), CacheStore.open(seven)
    assert b.meta.rows == RowOrder("shuffled", 7) and b.meta.dataset_fingerprint == a.meta.dataset_fingerprint
    assert list(b.text("keys")) != list(a.text("keys")) and sorted(b.text("keys")) == sorted(a.text("keys"))
    assert list(b.text("keys")) == [_dataset().samples[i].key for i in row_permutation(N, 7)]


def test_repair_rewrites_damaged_static_arrays_in_the_row_order(shuffled, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(shuffled, out)
    g = zarr.open_group(str(out), mode="r+")
    g["labels"][:] = np.sort(g["labels"][:])  # as a sorted listing would have them
    run_cli("extract", *ARGS, "--repair", "--out", out)
    assert_same_cache(shuffled, out)


def test_resuming_with_another_order_is_refused_naming_the_flag(shuffled, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(shuffled, out)
    for flags, named in ((["--row-seed", "5"], "--row-seed"), (["--row-order", "sorted"], "--row-order")):
        r = run_cli("extract", *ARGS, *flags, "--out", out, check=False)
        assert r.returncode != 0 and f"{named}: the cache at --out" in r.stderr, r.stderr
        assert "shuffled (seed 0)" in r.stderr and "--overwrite" in r.stderr
    assert_same_cache(shuffled, out)
    r = run_cli("extract", *ARGS, "--row-order", "sorted", "--overwrite", "--out", out, check=False)
    assert r.returncode == 0 and CacheStore.open(out).meta.rows == RowOrder()


@pytest.mark.parametrize("flags, message", [
    (["--row-order", "random"], "unknown --row-order 'random'; choose one of: shuffled, sorted"),
    (["--row-seed", "-1"], "--row-seed must be between 0 and"),
    (["--row-seed", str(2**32)], "--row-seed must be between 0 and"),
    (["--row-order", "sorted", "--row-seed", "3"], "--row-seed 3 seeds the shuffled row order"),
])
def test_a_wrong_row_option_is_an_error_naming_it(tmp_path, flags, message):
    r = run_cli("extract", *ARGS, *flags, "--out", tmp_path / "cache", check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists()


def _as_made_before_row_orders(path) -> None:
    """What a cache made before rows were shuffled holds: no `rows` section, no row options in its config."""
    g = zarr.open_group(str(path), mode="r+")
    attrs = dict(g.attrs)
    attrs.pop("rows")
    attrs["config"] = {k: v for k, v in attrs["config"].items() if k not in ("row_order", "row_seed")}
    g.attrs.put(attrs)


def test_a_cache_made_before_row_orders_reads_as_sorted_resumes_and_streams(in_order, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(in_order, old)
    _as_made_before_row_orders(old)
    store = CacheStore.open(old, mode="r+")
    assert store.meta.rows == RowOrder() and "rows" not in store.meta.identity()  # its fingerprint is unchanged
    assert "rows      sorted (the dataset's key order)" in run_cli("info", "--cache", old).stdout
    check_dataset(open_cache(str(old)))
    store.mark_todo(2)
    (store.images_dir / shard_name(2)).unlink()
    run_cli("extract", *ARGS, "--out", old)  # no row option: the cache's own order
    assert_same_cache(in_order, old)
    assert "rows" not in CacheStore.open(old).attrs
    r = run_cli("extract", *ARGS, "--row-order", "shuffled", "--out", old, check=False)
    assert r.returncode != 0 and "--row-order: the cache at --out" in r.stderr and "rows sorted" in r.stderr
    r = run_cli("extract", *ARGS, "--row-seed", "1", "--out", old, check=False)
    assert r.returncode != 0 and "--row-seed 1: the cache at --out" in r.stderr, r.stderr
    run_cli("extract", *ARGS, "--row-order", "sorted", "--out", old)  # the order it holds, named
    assert_same_cache(in_order, old)


def test_info_shows_the_row_order(shuffled):
    assert "rows      shuffled (seed 0)" in run_cli("info", "--cache", shuffled).stdout
    summary = json.loads(run_cli("info", "--cache", shuffled, "--json").stdout)
    assert summary["row_order"] == {"order": "shuffled", "seed": 0}

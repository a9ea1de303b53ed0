"""Every batch a fair sample: a cache whose rows are sorted by class (an existing cache, written before rows were
shuffled at extraction, or any cache of a sorted dataset), read in small shards by one rank or two, still gives
batches whose make-up is close to an i.i.d. draw; the make-up is measured, and the plan tells it without images.

Scaled down: 144 sorted rows of 6 classes in 16-row shards and batches of 6 behind a 4-row shuffle buffer stand for ImageNet's 1,300
rows a class in 1,024-row shards and batches of 64 behind a 512-row buffer (a shard, and a buffer, hold one or two
classes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_image
from hypothesis import given
from hypothesis import strategies as st

from kdcache.cache.store import CacheStore
from kdcache.train.loader import (CacheStream, Makeup, StreamConfig, StreamLoader, batch_rows, epoch_plan,
                                  makeup_of, makeup_problem, rank_shards)

CLASSES, PER_CLASS, S, BATCH, BUFFER = 6, 24, 16, 6, 4


@pytest.fixture(scope="module")
def sorted_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sorted")
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            write_image(root / "images" / f"class{c}" / f"{i:03d}.png", c * PER_CLASS + i)
    out = root / "cache"
    run_cli("extract", "--dataset", "imagefolder", "--data-root", str(root / "images"), "--teacher", "test_vit",
            "--random-init", "--no-progress", "--views", "2", "--shard-size", str(S), "--workers", "0",
            *ROW_ORDER_SORTED, "--out", str(out))
    return out


# the layout of every cache made before rows were shuffled at extraction
ROW_ORDER_SORTED = ["--row-order", "sorted"]


def _batches(cache: Path, rank: int, world: int, epoch: int, workers: int = 0, **kw) -> tuple[list, dict]:
    store = CacheStore.open(cache)
    labels = store.array("labels")[:].astype(np.int64)
    reps = np.ones(len(labels), np.int32)
    cfg = StreamConfig(str(cache), image_size=16, seed=3, shuffle_buffer=BUFFER, **kw)
    stream = CacheStream(cfg, rank_shards(reps, S, 3, epoch, rank, world), reps, labels, epoch)
    loader = StreamLoader(stream, BATCH, workers, classes=labels)
    rows = [b["row"].tolist() for b in loader]
    return rows, loader.makeup()


@pytest.mark.parametrize("world", [1, 2])
def test_a_class_sorted_cache_in_small_shards_gives_batches_close_to_an_iid_draw(sorted_cache, world):
    labels = CacheStore.open(sorted_cache).array("labels")[:]
    assert np.all(np.diff(labels) >= 0) and len(np.unique(labels)) == CLASSES  # the cache's rows are sorted
    for rank in range(world):
        for epoch in range(2):
            rows, makeup = _batches(sorted_cache, rank, world, epoch)
            assert sorted(r for b in rows for r in b) == sorted(
                r for k in rank_shards(np.ones(len(labels), np.int32), S, 3, epoch, rank, world)
                for r in range(k * S, (k + 1) * S))
            assert makeup["classes_per_batch"] >= 0.8 * makeup["iid_classes_per_batch"], makeup
            assert makeup["largest_class_share"] <= 1.3 * makeup["iid_largest_class_share"], makeup
            assert makeup_problem(makeup) is None
            # the make-up the loader measured is that of the rows its batches held
            m = Makeup()
            for b in rows:
                m.add(labels[b].astype(np.int64))
            assert m.summary(3) == makeup


def test_the_plan_tells_the_stream_s_batches_without_images_for_any_workers(sorted_cache):
    labels = CacheStore.open(sorted_cache).array("labels")[:].astype(np.int64)
    reps = np.ones(len(labels), np.int32)
    cfg = StreamConfig(str(sorted_cache), image_size=16, seed=3, shuffle_buffer=BUFFER)
    shards = rank_shards(reps, S, 3, 1, 0, 1)
    planned = batch_rows(epoch_plan(cfg, shards, reps, S, 1, 2), cfg, 1).tolist()
    rows, _ = _batches(sorted_cache, 0, 1, 1)
    assert [r for b in rows for r in b] == planned
    assert _batches(sorted_cache, 0, 1, 1, workers=2)[0] == rows
    # the views of the stream are the plan's too
    got = [(s["row"], s["view"]) for s in CacheStream(cfg, shards, reps, labels, 1)]
    plan = epoch_plan(cfg, shards, reps, S, 1, 2)
    assert sorted(got) == sorted(zip(plan.rows.tolist(), plan.views.tolist()))


def test_one_shard_at_a_time_is_the_class_sorted_stream_and_is_flagged(sorted_cache):
    """--interleave 1 draws inside one shard at a time, as the stream did before windows: batches of one or two
    classes, which the make-up check reports."""
    _, makeup = _batches(sorted_cache, 0, 1, 0, interleave=1)
    assert makeup["classes_per_batch"] < 0.6 * makeup["iid_classes_per_batch"], makeup
    assert makeup_problem(makeup)


@given(st.integers(2, 40), st.integers(5, 60), st.sampled_from([4, 8, 16, 32]), st.integers(1, 4),
       st.sampled_from([8, 16, 32]), st.integers(0, 2 ** 32), st.integers(0, 3))
def test_sorted_layouts_give_fair_batches_on_every_rank(classes, per_class, shard_size, world, batch, seed, epoch):
    """Without images: any sorted layout, shard size and number of ranks, the default interleave gives batches close
    to an i.i.d. draw of the rank's rows. The make-up is taken over four consecutive epochs and where a rank has at
    least 16 batches in them: over fewer, an i.i.d. draw itself strays past the bounds (4 batches of 8 from 8
    classes: a largest class share of 0.41 against the expected 0.27, seen from a plain permutation)."""
    n = classes * per_class
    labels = np.repeat(np.arange(classes), per_class)
    reps = np.ones(n, np.int32)
    cfg = StreamConfig("unused", image_size=16, seed=seed, shuffle_buffer=BUFFER)
    keys = ("classes_per_batch", "largest_class_share", "iid_classes_per_batch", "iid_largest_class_share")
    for rank in range(world):
        epochs = []  # each epoch's make-up against the i.i.d. draw of that epoch's rows (a rank's rows change)
        for e in range(epoch, epoch + 4):
            shards = rank_shards(reps, shard_size, seed, e, rank, world)
            rows = batch_rows(epoch_plan(cfg, shards, reps, shard_size, e, 2), cfg, e)
            if len(rows) >= batch:
                epochs.append(makeup_of(rows, labels, batch))
        total = sum(x["batches"] for x in epochs)
        if total < 16:
            continue
        m = {k: sum(x[k] * x["batches"] for x in epochs) / total for k in keys}
        assert m["classes_per_batch"] >= 0.8 * m["iid_classes_per_batch"] - 0.5, m
        assert m["largest_class_share"] <= 1.3 * m["iid_largest_class_share"] + 0.05, m

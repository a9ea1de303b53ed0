"""The training stream draws each row's views without replacement across epochs: seeded by (seed, row) only,
so E epochs see min(E, V) distinct views of a row, whatever the shard order, ranks, workers or resumes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli
from hypothesis import given
from hypothesis import strategies as st

from kdcache.cache.store import CacheStore
from kdcache.train.loader import (CacheStream, StreamConfig, StreamLoader, rank_shards, shard_draws,
                                  view_permutations)

N, S, V = 24, 8, 3


def _epochs(seed, n, shard_size, reps, views, epochs, world=1):
    """{row: [views drawn, epoch by epoch]} of every shard of every rank, as the stream draws them."""
    cfg = StreamConfig(cache="unused", image_size=16, seed=seed)
    seen: dict[int, list[int]] = {}
    for e in range(epochs):
        for rank in range(world):
            for k in rank_shards(reps, shard_size, seed, e, rank, world):
                rows = range(k * shard_size, min((k + 1) * shard_size, n))
                draws, got = shard_draws(cfg, reps, rows, e, k, views)
                for r, v in zip(draws.tolist(), got.tolist()):
                    seen.setdefault(r, []).append(v)
    return seen


@given(st.integers(1, 12), st.integers(1, 10), st.integers(1, 3), st.integers(0, 2 ** 32), st.integers(1, 3))
def test_each_row_walks_its_own_permutation_of_views_across_epochs(views, epochs, repeats, seed, world):
    n, shard_size = 11, 4
    reps = np.full(n, repeats, np.int32)
    reps[3] = 0  # a row not streamed
    seen = _epochs(seed, n, shard_size, reps, views, epochs, world)
    assert 3 not in seen and len(seen) == n - 1
    perms = view_permutations(seed, np.arange(n), views)
    for row, got in seen.items():
        assert len(got) == epochs * repeats
        # each epoch's draws of a row take the next `repeats` places of its permutation (in the stream's order)
        for e in range(epochs):
            block = sorted(got[e * repeats:(e + 1) * repeats])
            assert block == sorted(perms[row][(e * repeats + i) % views] for i in range(repeats))
        assert len(set(got)) == min(epochs * repeats, views)
        assert sorted(perms[row]) == list(range(views))


@given(st.integers(0, 2 ** 63), st.integers(1, 64))
def test_a_row_s_permutation_depends_on_the_seed_and_the_row_alone(seed, views):
    rows = np.array([5, 0, 9, 5])
    p = view_permutations(seed, rows, views)
    assert np.array_equal(p[0], p[3]) and np.array_equal(p[1], view_permutations(seed, np.array([0]), views)[0])
    assert np.array_equal(np.sort(p, 1), np.tile(np.arange(views), (4, 1)))


def test_sixty_four_views_over_ten_epochs_are_ten_distinct_ones_and_permutations_differ_by_row_and_seed():
    seen = _epochs(0, 40, 8, np.ones(40, np.int32), 64, 10)
    assert all(len(set(v)) == 10 for v in seen.values())
    a, b = view_permutations(0, np.arange(200), 64), view_permutations(1, np.arange(200), 64)
    assert len({tuple(x) for x in a}) == 200 and not np.array_equal(a, b)
    # over many rows, every view is as likely to come first
    first = np.bincount(view_permutations(3, np.arange(6400), 64)[:, 0], minlength=64)
    assert first.min() > 50 and first.max() < 160


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("draws") / "cache"
    run_cli("extract", *TINY, "--dataset-opt", f"n={N}", "--views", str(V), "--shard-size", str(S),
            "--workers", "0", "--out", str(out))
    return out


def _stream(cache, epoch, workers, shards=None):
    store = CacheStore.open(cache)
    reps = np.ones(N, np.int32)
    cfg = StreamConfig(cache=str(cache), image_size=16, seed=4, shuffle_buffer=8)
    stream = CacheStream(cfg, shards if shards is not None else rank_shards(reps, S, 4, epoch, 0, 1), reps,
                         store.array("labels")[:], epoch)
    return [(int(r), int(v)) for b in StreamLoader(stream, 5, workers) for r, v in zip(b["row"], b["view"])]


def test_the_stream_s_views_are_the_same_for_any_workers_and_a_resumed_epoch(cache):
    # epochs 0..3 in one go, and epoch 3 alone (as a run resumed there computes it), with other workers
    run = [_stream(cache, e, workers=0) for e in range(4)]
    assert _stream(cache, 3, workers=2) == run[3]
    perms = view_permutations(4, np.arange(N), V)
    for e, pairs in enumerate(run):
        assert sorted(r for r, _ in pairs) == list(range(N))
        assert all(v == perms[r][e % V] for r, v in pairs)
    # three epochs of three views: every view of every row once
    for r in range(N):
        assert sorted(v for pairs in run[:3] for row, v in pairs if row == r) == [0, 1, 2]
    # a shard streamed alone (another rank's share) draws the same views for its rows
    alone = _stream(cache, 1, workers=0, shards=[2])
    assert sorted(alone) == sorted(p for p in run[1] if p[0] >= 2 * S)

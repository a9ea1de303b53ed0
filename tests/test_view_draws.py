"""The training stream's views: a draw takes the clean view 0 with a fixed probability (--clean-share) whatever V
is; otherwise each row walks its own permutation of views 1..V-1 without replacement across epochs, seeded by
(seed, row) only, so E epochs see min(E, V - 1) distinct other views of a row, whatever the shard order, ranks,
workers or resumes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli
from hypothesis import given
from hypothesis import strategies as st

from kdcache.cache.store import CacheStore
from kdcache.train.loader import (CacheStream, StreamConfig, StreamLoader, draw_views, epoch_plan, rank_shards,
                                  view_permutations)

N, S, V = 24, 8, 3


def _epochs(seed, n, shard_size, reps, views, epochs, world=1, clean_share=0.0, interleave=0):
    """{row: [views drawn, epoch by epoch]} of every rank, as the stream's plan draws them."""
    cfg = StreamConfig(cache="unused", image_size=16, seed=seed, clean_share=clean_share, interleave=interleave)
    seen: dict[int, list[int]] = {}
    for e in range(epochs):
        for rank in range(world):
            plan = epoch_plan(cfg, rank_shards(reps, shard_size, seed, e, rank, world), reps, shard_size, e, views)
            for r, v in zip(plan.rows.tolist(), plan.views.tolist()):
                seen.setdefault(r, []).append(v)
    return seen


@given(st.integers(2, 12), st.integers(1, 10), st.integers(1, 3), st.integers(0, 2 ** 32), st.integers(1, 3),
       st.integers(0, 3))
def test_without_clean_draws_each_row_walks_its_own_permutation_of_views_1_to_v(views, epochs, repeats, seed,
                                                                                 world, interleave):
    n, shard_size = 11, 4
    reps = np.full(n, repeats, np.int32)
    reps[3] = 0  # a row not streamed
    seen = _epochs(seed, n, shard_size, reps, views, epochs, world, clean_share=0.0, interleave=interleave)
    assert 3 not in seen and len(seen) == n - 1
    perms = 1 + view_permutations(seed, np.arange(n), views - 1)
    for row, got in seen.items():
        assert len(got) == epochs * repeats
        # each epoch's draws of a row take the next `repeats` places of its permutation (in the stream's order)
        for e in range(epochs):
            block = sorted(got[e * repeats:(e + 1) * repeats])
            assert block == sorted(perms[row][(e * repeats + i) % (views - 1)] for i in range(repeats))
        assert len(set(got)) == min(epochs * repeats, views - 1) and 0 not in got


@given(st.integers(1, 40), st.floats(0, 1), st.integers(0, 2 ** 32), st.integers(1, 6), st.integers(1, 3))
def test_the_clean_share_is_the_same_whatever_v_and_other_views_never_repeat_early(views, share, seed, epochs,
                                                                                   repeats):
    rows = np.repeat(np.arange(300), repeats)
    got = np.stack([draw_views(seed, rows, np.full(len(rows), repeats), e, views, share)
                    for e in range(epochs)], 1)
    got = got.reshape(300, repeats, epochs).transpose(0, 2, 1).reshape(300, -1)  # [row, turn]
    if views == 1:
        assert not got.any()
        return
    turns = epochs * repeats
    clean = (got == 0).sum(1)
    assert np.all(np.abs(clean - share * turns) < 1 + 1e-9)  # each row's clean turns: the share, within one
    if 0 < share < 1 and turns * 300 >= 200:
        assert abs(clean.mean() / turns - share) < 0.1  # the phases are spread, not all rows alike
    for seq in got.tolist():  # a row's other views: each of views 1..V-1 before any comes again
        other = [v for v in seq if v]
        for i in range(len(other)):
            window = other[max(0, i - views + 2):i + 1]
            assert len(set(window)) == len(window)


def test_a_row_s_views_do_not_depend_on_its_neighbours_or_the_draw_order():
    rows = np.array([7, 3, 7, 9, 3, 7])
    reps = np.array([3, 2, 3, 1, 2, 3])
    got = draw_views(5, rows, reps, 2, 6, 0.3)
    alone = draw_views(5, np.array([7, 7, 7]), np.array([3, 3, 3]), 2, 6, 0.3)
    assert sorted(got[rows == 7].tolist()) == sorted(alone.tolist())
    flipped = draw_views(5, rows[::-1].copy(), reps[::-1].copy(), 2, 6, 0.3)
    assert sorted(zip(rows.tolist(), got.tolist())) == sorted(zip(rows[::-1].tolist(), flipped.tolist()))


@given(st.integers(0, 2 ** 63), st.integers(1, 64))
def test_a_row_s_permutation_depends_on_the_seed_and_the_row_alone(seed, views):
    rows = np.array([5, 0, 9, 5])
    p = view_permutations(seed, rows, views)
    assert np.array_equal(p[0], p[3]) and np.array_equal(p[1], view_permutations(seed, np.array([0]), views)[0])
    assert np.array_equal(np.sort(p, 1), np.tile(np.arange(views), (4, 1)))


def test_sixty_five_views_over_ten_epochs_are_ten_distinct_ones_and_permutations_differ_by_row_and_seed():
    seen = _epochs(0, 40, 8, np.ones(40, np.int32), 65, 10)
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


def _stream(cache, epoch, workers, shards=None, share=0.0):
    store = CacheStore.open(cache)
    reps = np.ones(N, np.int32)
    cfg = StreamConfig(cache=str(cache), image_size=16, seed=4, shuffle_buffer=8, clean_share=share)
    stream = CacheStream(cfg, shards if shards is not None else rank_shards(reps, S, 4, epoch, 0, 1), reps,
                         store.array("labels")[:], epoch)
    return [(int(r), int(v)) for b in StreamLoader(stream, 5, workers) for r, v in zip(b["row"], b["view"])]


def test_the_stream_s_views_are_the_same_for_any_workers_and_a_resumed_epoch(cache):
    # epochs 0..3 in one go, and epoch 3 alone (as a run resumed there computes it), with other workers
    run = [_stream(cache, e, workers=0) for e in range(4)]
    assert _stream(cache, 3, workers=2) == run[3]
    perms = 1 + view_permutations(4, np.arange(N), V - 1)
    for e, pairs in enumerate(run):
        assert sorted(r for r, _ in pairs) == list(range(N))
        assert all(v == perms[r][e % (V - 1)] for r, v in pairs)
    # two epochs of the two other views: each of them once for every row
    for r in range(N):
        assert sorted(v for pairs in run[:2] for row, v in pairs if row == r) == [1, 2]
    # a shard streamed alone (another rank's share) draws the same views for its rows
    alone = _stream(cache, 1, workers=0, shards=[2])
    assert sorted(alone) == sorted(p for p in run[1] if p[0] >= 2 * S)
    # with clean draws, the stream's views are the plan's, for any workers
    shared = _stream(cache, 2, workers=0, share=0.5)
    assert _stream(cache, 2, workers=2, share=0.5) == shared
    assert 0 < sum(v == 0 for _, v in shared) < N

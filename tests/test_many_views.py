"""Many views are cheap: an image is decoded once for all its views, one shard file holds every view of its
rows (a training epoch reads each shard in one pass), and the shard buffer's memory is bounded."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, run_cli

from kdcache import replay
from kdcache.cache.format import Layout
from kdcache.cache.store import CacheStore
from kdcache.extract.teacher import MAX_SHARD_BUFFER, check_shard_buffer
from kdcache.extraction import ShardBuffer
from kdcache.options import ConfigError
from kdcache.stages import extract

N, S, V = 12, 8, 16


def test_sixteen_views_decode_each_image_once_and_a_shard_is_one_file_of_every_view(tmp_path, monkeypatch):
    decoded = []
    real = replay.decode_packed
    monkeypatch.setattr(replay, "decode_packed", lambda data, bound=None: decoded.append(1) or real(data, bound))
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N),), teacher="test_vit",
                                random_init=True, teacher_input_size=32, views=V, shard_size=S, batch_size=24,
                                workers=0, logits_topk=3, out=str(tmp_path / "cache"), progress=False)
    stats = extract.extract(cfg).stats
    assert stats.views == N * V and len(decoded) == N  # one decode per image, for all of its 16 views
    store = CacheStore.open(tmp_path / "cache")
    for name in ("features", "logit_index", "logit_prob", "logit_rest", "views"):
        arr = store.array(name)
        assert arr.shards[:2] == (S, V) and arr.chunks[1] == V, name  # every view of a shard's rows together
        files = sorted(p.name for p in (tmp_path / "cache" / name / "c").iterdir())
        assert files == ["0", "1"], name  # one file per shard


def test_the_shard_buffer_grows_with_views_and_is_refused_past_its_bound():
    lay = Layout(n=10, views=64, feature_dim=1024, num_classes=1000, token_grid=0, token_dim=0, shard_size=1024,
                 params=10)
    per_view = 2 * (1024 + 1000) + 4 * 10  # float16 features and (dense, even when stored top-K) logits
    assert ShardBuffer.nbytes(1024, lay) == 1024 * 64 * per_view
    check_shard_buffer(lay)  # 64 views of 1024 rows: 0.27 GiB
    big = Layout(**(lay.__dict__ | {"views": 1024, "shard_size": 16384}))
    assert ShardBuffer.nbytes(16384, big) > MAX_SHARD_BUFFER
    with pytest.raises(ConfigError, match="--views 1024 with --shard-size 16384"):
        check_shard_buffer(big)

"""The demo's stage digests: one line per stage, equal exactly when that stage's bytes are equal."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kdcache.stages import distill, extract
from kdcache.stages.demo import render_digests, stage_digests
from kdcache.cache.store import CacheStore


@pytest.fixture(scope="module")
def cache_and_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("demo")
    cache = extract.run(extract.ExtractConfig(
        dataset="synthetic", dataset_options=(("n", 64), ("classes", 4)), teacher="test_efficientnet",
        random_init=True, teacher_input_size=32, views=2, head="probe", shard_size=32, batch_size=32, workers=0,
        out=str(tmp / "cache"), progress=False))
    run = tmp / "run"
    distill.run(distill.DistillConfig(cache=str(cache), student="test_efficientnet", image_size=32, scenario="ssl",
                                      labels_per_class=2, epochs=1, batch_size=16, workers=0, out=str(run),
                                      progress=False))
    return cache, run


def test_stage_digests_are_stable_and_change_only_where_the_bytes_change(cache_and_run, tmp_path):
    cache, run = cache_and_run
    first = stage_digests(cache, [run])
    assert [name.split(" (")[0] for name, _ in first] == ["view parameters", "teacher outputs", "probe head",
                                                         f"student {run.name}"]
    assert stage_digests(cache, [run]) == first
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    store = CacheStore.open(copy, "r+")
    features = store.array("features")
    row = features[0]
    features[0] = np.nextafter(row, np.inf).astype(row.dtype)  # one ulp: a kernel that rounds otherwise
    changed = stage_digests(copy, [run])
    assert changed[0] == first[0] and changed[2:] == first[2:]
    assert changed[1][1] != first[1][1]
    table = render_digests(first)
    assert f"`{first[1][1][:16]}`" in table and table.count("\n| ") == len(first) + 2  # header, rule, one row a stage

"""A cached array is one row of ARRAYS: a row added to the table (and nothing else) is allocated, filled
by the extraction, digested, verified, repaired and streamed to a method."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache.cache.format as fmt
from kdcache.cache.format import ArraySpec, CacheError
from kdcache.cache.integrity import array_digest, missing_files
from kdcache.cache.store import CacheStore
from kdcache.cacheinfo import verify
from kdcache.train.engine import TrainModule, _to
from kdcache.train.loader import CacheStream, StreamConfig
from kdcache.methods import Method, TeacherBatch
from kdcache.stages import extract
from kdcache.teachers import Teacher

N, S, V = 24, 8, 2
EXTRA = ArraySpec("centred", ("rows", "views", "feature_dim"), "float16", "output", digested=True, zero_when_bad=True)


@pytest.fixture
def extra_array(monkeypatch):
    """The table with one more teacher output, and a teacher that computes it (features minus their mean)."""
    monkeypatch.setattr(fmt, "ARRAYS", [*fmt.ARRAYS, EXTRA])
    forward = Teacher.forward

    def with_centred(self, images, token_grid=0):
        out = forward(self, images, token_grid)
        return dict(out, centred=out["features"] - out["features"].mean(-1, keepdim=True))

    monkeypatch.setattr(Teacher, "forward", with_centred)


def _cfg(out, **kw) -> extract.ExtractConfig:
    return extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N),), teacher="test_vit", random_init=True,
                                 views=V, shard_size=S, batch_size=6, workers=0, out=str(out), progress=False, **kw)


def test_a_row_of_arrays_is_created_written_digested_verified_repaired_and_streamed(extra_array, tmp_path):
    store = CacheStore.open(extract.run(_cfg(tmp_path / "cache")), mode="r+")
    lay = store.layout
    # created, with its shape and dimension names, and checked on every open
    arr = store.array("centred")
    assert arr.shape == (N, V, lay.feature_dim) and arr.dtype == np.float16
    assert arr.metadata.dimension_names == ("row", "view", "feature")
    assert store.meta.expected_arrays()["centred"] == ((N, V, lay.feature_dim), "float16")
    # written by the extraction
    features, centred = store.array("features")[:].astype(np.float32), arr[:].astype(np.float32)
    assert np.abs(centred).max() > 0
    np.testing.assert_allclose(centred, features - features.mean(-1, keepdims=True), atol=2e-2)
    # digested shard by shard, and verified
    index = fmt.digested().index("centred")
    for k in range(lay.num_shards):
        r = lay.rows(k)
        assert np.array_equal(store.array("array_digests")[k, index], array_digest(arr[r.start:r.stop]))
    assert verify(store) == []
    # damage is detected (verify, the checked read), a lost file too, and repair restores it
    damaged = arr[S:2 * S]
    damaged[0, 0, 0] += 1
    store.writer("centred")[S:2 * S] = damaged
    problems = verify(store)
    assert any(p.startswith("shard 1:") for p in problems), problems
    with pytest.raises(CacheError, match="shard 1 of centred"):
        store.read_checked("centred", 1)
    (tmp_path / "cache" / "centred" / "c" / "2" / "0" / "0").unlink()
    assert ("centred", 2) in missing_files(store)
    extract.run(_cfg(tmp_path / "cache", repair=True))
    store = CacheStore.open(tmp_path / "cache")
    assert verify(store) == [] and np.array_equal(store.array("centred")[:].astype(np.float32), centred)
    # streamed by the loader, and handed to a method as TeacherBatch.extra
    reps = np.ones(N, np.int32)
    samples = list(CacheStream(StreamConfig(str(tmp_path / "cache"), 32, clean_only=True), [0], reps,
                               store.array("labels")[:], 0))
    assert samples and all(torch.equal(s["centred"], torch.from_numpy(centred[s["row"], s["view"]])) for s in samples)
    batch = {key: torch.stack([s[key] for s in samples[:4]]) if isinstance(samples[0][key], torch.Tensor)
             else torch.tensor([s[key] for s in samples[:4]]) for key in samples[0]}
    seen = {}

    class Probe(Method):
        def extra(self, out, teacher: TeacherBatch, labels):
            seen.update(teacher.extra)
            return {}

    from kdcache.methods.base import Dims
    from kdcache.students import create_student

    classes = len(store.meta.classes)
    student = create_student("test_efficientnet", classes)
    module = TrainModule(student, Probe(Dims(student.dims(32)["feature"], lay.feature_dim, classes)))
    module(**_to(batch, torch.device("cpu"), False))
    assert torch.equal(seen["centred"], batch["centred"])


def test_the_cache_package_imports_only_the_layers_below_it_and_storage_is_decided_in_backend():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kdcache"
    below = {"format": set(), "backend": set(), "meta": {"format"}, "integrity": {"format", "backend"},
             "store": {"format", "backend", "meta", "integrity", "sparse"}, "derived": set(), "sparse": {"format"}}
    for name, allowed in below.items():
        for node in ast.walk(ast.parse((root / "cache" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used = {node.module} if node.module else {a.name for a in node.names}
                assert used <= allowed, (name, used)
            elif isinstance(node, ast.ImportFrom) and node.level > 1:
                assert (node.level, node.module) == (2, "codes"), (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] == "kdcache" for n in names), (name, names)
    for path in root.rglob("*.py"):
        if path != root / "cache" / "backend.py":
            text = path.read_text()
            assert "is_remote" not in text and "is_url" not in text, path

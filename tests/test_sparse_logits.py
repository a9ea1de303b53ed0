"""Sparse logits (extract --logits-topk K): stored as the teacher's top-K probabilities and the leftover mass,
read back everywhere as the log-probabilities of the distribution they make."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdcache.cache.format import SPARSE_LOGITS, CacheError, digested
from kdcache.cache.sparse import nbytes_per_view, rebuild, rebuild_from, sparsify
from kdcache.cache.store import CacheStore
from kdcache.cacheinfo import summarize, verify
from kdcache.options import ConfigError
from kdcache.stages import distill, extract

N, S, V, K = 48, 16, 3, 3
ARGS = TINY + ["--dataset-opt", f"n={N}", "--views", str(V), "--shard-size", str(S), "--batch-size", "8",
               "--workers", "0"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """The same extraction twice: dense logits, and top-K logits."""
    tmp = tmp_path_factory.mktemp("sparse")
    run_cli("extract", *ARGS, "--out", str(tmp / "dense"))
    run_cli("extract", *ARGS, "--logits-topk", str(K), "--out", str(tmp / "sparse"))
    return tmp / "dense", tmp / "sparse"


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float32), -1).numpy()


@given(st.integers(2, 300).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, c - 1))),
       st.integers(0, 2 ** 31 - 1), st.floats(0.1, 30))
@example(ck=(141, 2), seed=4796, spread=0.125)  # two top probabilities equal in float16
def test_the_rebuilt_distribution_sums_to_one_and_keeps_the_top_k(ck, seed, spread):
    c, k = ck
    z = (np.random.default_rng(seed).standard_normal((5, 2, c)) * spread).astype(np.float16)
    parts = sparsify(z, k)
    assert parts["logit_index"].dtype == np.int16 and parts["logit_index"].shape == (5, 2, k)
    assert parts["logit_prob"].dtype == np.float16 and parts["logit_rest"].shape == (5, 2)
    p = _softmax(z)
    q = _softmax(rebuild_from(parts, c))  # what every reader's softmax gives
    np.testing.assert_allclose(q.sum(-1), 1, atol=1e-5)
    order = np.argsort(-p, -1, kind="stable")[..., :k]
    assert np.array_equal(parts["logit_index"], order)
    top_p, top_q = np.take_along_axis(p, order, -1), np.take_along_axis(q, order, -1)
    # float16 probabilities (relative 2**-11), normalised by a total within k+1 such roundings of 1
    np.testing.assert_allclose(top_q, top_p, rtol=(k + 2) * 2 ** -11, atol=1e-7)
    others = np.ones_like(p, bool)
    np.put_along_axis(others, order, False, -1)
    rest = (1 - top_p.sum(-1, keepdims=True)) / (c - k)  # the leftover, evenly
    np.testing.assert_allclose(np.where(others, q, 0), np.where(others, rest, 0), rtol=0.02, atol=(k + 2) * 2 ** -11)
    # the rebuilt top class is the teacher's, or one whose probability rounds to the same float16
    best = np.take_along_axis(p, q.argmax(-1)[..., None], -1)[..., 0]
    assert ((q.argmax(-1) == p.argmax(-1)) | (best >= p.max(-1) * (1 - 2 ** -10))).all()


@given(hnp.arrays(np.float16, (3, 7), elements=st.floats(-60000, 60000, width=16)), st.integers(1, 6))
def test_any_finite_logits_rebuild_to_finite_log_probabilities(z, k):
    out = rebuild_from(sparsify(z, k), 7)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.exp(out).sum(-1), 1, atol=1e-5)


def test_bytes_per_view_of_top_10():
    assert nbytes_per_view(10, 1000) == 10 * 2 + 10 * 2 + 2 == 42  # int16 indices below 32768 classes
    assert nbytes_per_view(10, 40000) == 10 * 4 + 10 * 2 + 2
    assert sparsify(np.zeros((1, 40000), np.float16), 10)["logit_index"].dtype == np.int32


def test_a_sparse_cache_stores_top_k_and_reads_back_the_dense_top_k(caches):
    dense, sparse = (CacheStore.open(p) for p in caches)
    assert sparse.has("logit_index") and not sparse.has("logits")
    assert not dense.has("logit_index") and dense.has("logits")
    assert sparse.layout.logits_topk == K and sparse.meta.section("head")["logits_topk"] == K
    assert "logits_topk" not in dense.meta.section("head") and "logits_topk" not in dense.attrs["layout"]
    assert sparse.array("logit_index").dtype == np.int16 and sparse.array("logit_index").shape == (N, V, K)
    assert sparse.array("logit_rest").shape == (N, V)
    # array digests of sparse caches end with the sparse arrays; dense caches keep their table
    assert digested(sparse.layout)[-3:] == SPARSE_LOGITS and not set(SPARSE_LOGITS) & set(digested(dense.layout))
    assert sparse.array("array_digests").shape[1] == dense.array("array_digests").shape[1] + 3
    # the same teacher outputs, stored two ways
    assert np.array_equal(dense.array("features")[:], sparse.array("features")[:])
    p = _softmax(dense.read("logits", 0, N))
    for got in (sparse.read("logits", 0, N), np.concatenate([sparse.read_checked("logits", k) for k in range(3)]),
                sparse.masked(np.ones(N, bool), "logits")):
        q = _softmax(got)
        assert got.shape == (N, V, dense.layout.num_classes) and got.dtype == np.float32
        np.testing.assert_allclose(q.sum(-1), 1, atol=1e-5)
        top = sparse.array("logit_index")[:].astype(np.int64)
        np.testing.assert_allclose(np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1), rtol=3e-3,
                                   atol=1e-7)  # float16 subnormals: steps of 6e-8
    assert sparse.clean_view(np.ones(N, bool), "logits").shape == (N, dense.layout.num_classes)
    assert sparse.masked(np.zeros(N, bool), "logits", view=0).shape == (0, dense.layout.num_classes)
    # info's raw size counts the logits as each cache stores them
    raw = {name: summarize(store)["bytes_per_view"]["features+logits raw fp16"] for name, store in
           (("dense", dense), ("sparse", sparse))}
    c = dense.layout.num_classes
    assert raw["dense"] - raw["sparse"] == 2 * c - nbytes_per_view(K, c) > 0


def test_a_sparse_cache_verifies_and_its_damage_is_found(caches, tmp_path):
    import shutil

    store = CacheStore.open(caches[1])
    assert verify(store) == []
    info = summarize(store)
    assert info["bytes_per_view"]["logits"] > 0  # on disk: with this tiny cache mostly the shard indices
    shown = run_cli("info", "--cache", str(caches[1]), "--verify").stdout
    assert f"logits top-{K}" in shown and "verify    ok" in shown
    copy = tmp_path / "copy"
    shutil.copytree(caches[1], copy)
    damaged = CacheStore.open(copy, mode="r+")
    prob = damaged.array("logit_prob")[S:2 * S]
    prob[0, 0, 0] = prob[0, 0, 0] / 2 + np.float16(0.01)
    damaged.writer("logit_prob")[S:2 * S] = prob
    assert any(p.startswith("shard 1:") for p in verify(damaged))
    with pytest.raises(CacheError, match="shard 1 of logit_prob"):
        damaged.read_checked("logits", 1)


def test_another_top_k_on_the_same_cache_is_refused(caches):
    proc = run_cli("extract", *ARGS, "--logits-topk", str(K + 1), "--out", str(caches[1]), check=False)
    assert proc.returncode != 0 and "head.logits_topk" in proc.stderr + proc.stdout


def test_auto_top_k_is_sparse_from_100_classes_and_a_resume_keeps_the_caches_own(tmp_path):
    """--logits-topk left out: top-10 for a new cache whose head has 100 classes or more, dense below; the K of a
    cache already at --out otherwise (a dense cache of many classes resumes dense), and an explicit K wins."""
    from kdcache.extract.teacher import AUTO_TOPK, AUTO_TOPK_CLASSES, resolve_topk

    def made(name: str, classes: int, *extra: str) -> CacheStore:
        run_cli("extract", *TINY, "--dataset-opt", "n=8", "--dataset-opt", f"classes={classes}", "--views", "2",
                "--shard-size", "8", "--batch-size", "8", "--workers", "0", "--head", "probe", *extra,
                "--out", str(tmp_path / name))
        return CacheStore.open(tmp_path / name)

    assert made("many", AUTO_TOPK_CLASSES).layout.logits_topk == AUTO_TOPK
    assert made("few", AUTO_TOPK_CLASSES - 1).layout.logits_topk == 0
    dense = made("dense", AUTO_TOPK_CLASSES, "--logits-topk", "0")
    assert dense.layout.logits_topk == 0 and dense.has("logits")
    cfg = extract.ExtractConfig(dataset="synthetic", out=str(tmp_path / "dense"))
    assert resolve_topk(cfg, tmp_path / "dense", AUTO_TOPK_CLASSES) == 0  # the cache's own K
    assert resolve_topk(dataclasses.replace(cfg, overwrite=True), tmp_path / "dense", AUTO_TOPK_CLASSES) == AUTO_TOPK
    assert resolve_topk(dataclasses.replace(cfg, logits_topk=3), tmp_path / "dense", AUTO_TOPK_CLASSES) == 3
    assert made("dense", AUTO_TOPK_CLASSES).layout.logits_topk == 0  # resumed without the flag: still dense


@pytest.mark.parametrize("extra, expect", [
    (["--logits-topk", "8"], "--logits-topk 8: must be between 1 and 7"),  # the synthetic set has 8 classes
    (["--logits-topk", "-1"], "--logits-topk"),
    (["--logits-topk", "2", "--head", "none"], "--logits-topk 2: the cache has no logits"),
])
def test_a_bad_top_k_is_an_error_naming_the_flag(extra, expect, tmp_path):
    proc = run_cli("extract", *ARGS, *extra, "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode != 0 and expect in proc.stderr + proc.stdout
    assert not (tmp_path / "c" / "zarr.json").exists()


def test_check_topk_directly():
    from kdcache.cache.format import Layout
    from kdcache.extract.teacher import check_topk

    lay = Layout(n=4, views=1, feature_dim=4, num_classes=5, token_grid=0, token_dim=0, shard_size=4, params=1)
    check_topk(extract.ExtractConfig(logits_topk=4), lay)
    with pytest.raises(ConfigError, match="--logits-topk 5"):
        check_topk(extract.ExtractConfig(logits_topk=5), lay)


def test_the_stream_reads_the_rebuilt_logits(caches):
    from kdcache.train.loader import CacheStream, StreamConfig

    store = CacheStore.open(caches[1])
    cfg = StreamConfig(cache=str(caches[1]), image_size=16, logits=True, shuffle_buffer=1)
    stream = CacheStream(cfg, [0, 2], np.ones(N, np.int32), store.array("labels")[:], epoch=0)
    full, seen = store.read("logits", 0, N), 0
    for sample in stream:
        np.testing.assert_array_equal(sample["logits"].numpy(), full[sample["row"], sample["view"]])
        seen += 1
    assert seen == 2 * S


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    """A sparse cache of a teacher with its own classifier (--head native): every scenario reads its cached
    logits (no stored probe that saw other labels is refitted)."""
    from tiny_teacher import train_tiny_teacher

    tmp = tmp_path_factory.mktemp("native")
    weights = train_tiny_teacher(tmp / "teacher.safetensors", classes=8, n=160, epochs=1)
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", 96),), teacher="test_efficientnet",
                                teacher_weights=str(weights), teacher_input_size=48, head="native", views=V,
                                logits_topk=K, shard_size=32, batch_size=32, workers=0, out=str(tmp / "cache"),
                                progress=False)
    return extract.run(cfg)


@pytest.mark.parametrize("method", ["kd", "dkd", "customkd"])
def test_kd_dkd_and_customkd_train_and_evaluate_from_a_sparse_cache(native, method, tmp_path, monkeypatch):
    import json

    from kdcache import scenario_heads

    store = CacheStore.open(native)
    assert store.meta.head_kind == "native" and store.layout.logits_topk == K
    # the stored head taken as one that saw no labels (as a zero-shot head), so that the ssl scenario reads the
    # cached logits: CustomKD's first customisation then reads the unlabelled rows' sparse logits
    monkeypatch.setattr(scenario_heads, "head_fitted_on", lambda store: None)
    cfg = distill.DistillConfig(cache=str(native), student="test_efficientnet", image_size=32, scenario="ssl",
                                labels_per_class=2, epochs=2, batch_size=16, workers=0, out=str(tmp_path / "run"),
                                method=method, progress=False, check_dataset=False)
    run = Path(distill.run(cfg))
    summary = json.loads((run / "summary.json").read_text())
    assert '"refit": false' in json.dumps(summary)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    run_cli("evaluate", "--run", str(run), "--no-onnx", "--latency-repeats", "1", "--no-progress")
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report["teacher_metrics"]["top1"] <= 1


def test_the_teacher_logits_every_reader_takes_are_the_rebuilt_ones(native):
    from kdcache.scenario_heads import teacher_logits

    store = CacheStore.open(native)
    mask = np.arange(store.layout.n) % 3 == 0
    expect = rebuild(store.array("logit_index")[:], store.array("logit_prob")[:], store.array("logit_rest")[:],
                     store.layout.num_classes)
    np.testing.assert_array_equal(teacher_logits(store, None, mask), expect[mask])
    np.testing.assert_array_equal(teacher_logits(store, None, mask, view=0), expect[mask, 0])


def test_the_views_picture_captions_a_sparse_cache_with_its_rebuilt_top_class(caches):
    from kdcache.viewpicture import _caption, cached_logits

    dense, sparse = (CacheStore.open(c) for c in caches)
    logits = cached_logits(sparse, [4, 5])
    assert logits is not None and not sparse.has("logits") and sorted(logits) == [4, 5]
    for row in (4, 5):
        np.testing.assert_array_equal(logits[row], sparse.read("logits", row, row + 1)[0])
    p = _softmax(logits[5][1])
    top = int(p.argmax())
    assert p[top] == p[int(sparse.array("logit_index")[5, 1, 0])]  # the stored top class (or a float16 tie)
    assert _caption(sparse, logits, 5, 1) == f"view 1: {sparse.meta.classes[top]} {p[top]:.2f}"
    assert cached_logits(dense, [0]) is not None and dense.has("logits")


def test_the_online_teacher_compares_its_logits_in_the_sparse_form_the_cache_holds(caches, tmp_path):
    import json

    cfg = distill.DistillConfig(cache=str(caches[1]), student="test_efficientnet", image_size=32, method="kd",
                                scenario="supervised", epochs=1, batch_size=16, workers=0, online_teacher=True,
                                out=str(tmp_path / "online"), progress=False)
    summary = json.loads((distill.run(cfg) / "summary.json").read_text())
    proof = summary["replay_cosine"]
    drawn = summary["counts"]["labelled"] + summary["counts"]["unlabelled"]
    assert not summary["head"]["refit"] and proof["compared"] == 2 * drawn  # features and logits of each view
    assert proof["min"] >= 0.999, proof


def test_a_probe_fitted_on_the_source_domains_is_read_by_uda_runs_from_them(tmp_path):
    """extract --probe-domain: the probe sees the labels of those domains only, so a uda run from them reads the
    cache's (here sparse) logits instead of refitting; a run from another domain still refits."""
    from kdcache.scenario_heads import scenario_teacher_head
    from kdcache.scenarios import make_scenario

    out = tmp_path / "source-probe"
    run_cli("extract", *ARGS, "--head", "probe", "--probe-domain", "domain0", "--logits-topk", str(K),
            "--out", str(out))
    store = CacheStore.open(out, mode="r+")
    labels, domains, splits = (store.array(n)[:] for n in ("labels", "domains", "splits"))
    fitted_on = store.group["heads/extract/fitted_on"][:].astype(bool)
    assert fitted_on.any() and np.array_equal(fitted_on, (labels >= 0) & (splits == 0) & (domains == 0))
    assert store.meta.section("head")["probe_domains"] == ["domain0"]

    def head_of(source, target):
        scenario = make_scenario("uda", labels, domains, splits, store.status(), ["domain0", "domain1"],
                                 source=[source], target=[target])
        return scenario_teacher_head(store, scenario)

    head, info = head_of("domain0", "domain1")
    assert head is None and not info["refit"]  # reads the cached top-K logits
    head, info = head_of("domain1", "domain0")
    assert head is not None and info["refit"] and "outside this scenario" in info["reason"]


@pytest.mark.parametrize("extra, expect", [
    (["--head", "none", "--probe-domain", "domain0"], "--probe-domain chooses the rows a probe head"),
    (["--head", "probe", "--probe-domain", "domain7"], "--probe-domain domain7: not a domain"),
])
def test_a_bad_probe_domain_is_an_error_naming_the_flag(extra, expect, tmp_path):
    proc = run_cli("extract", *ARGS, *extra, "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode != 0 and expect in proc.stdout + proc.stderr
    assert not (tmp_path / "c").exists()

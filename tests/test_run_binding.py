"""A run is bound to its cache by identity, not by path: evaluate refuses another cache at the recorded path
(naming both), finds the cache from any folder, takes an explicit --cache for a moved one; a moved run folder
resumes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from kdcache.cache.format import CacheError
from kdcache.stages import distill, evaluate, extract


def _extract(out: Path, seed: int) -> Path:
    return extract.run(extract.ExtractConfig(
        dataset="synthetic", dataset_options=(("n", 48), ("classes", 4)), teacher="test_vit", random_init=True,
        view_seed=seed, views=1, shard_size=16, workers=0, out=str(out), progress=False))


def _distill(cache: str, out: Path, **kw) -> Path:
    base = dict(cache=cache, student="test_efficientnet", image_size=32, method="kd", scenario="supervised",
                epochs=1, batch_size=16, workers=0, out=str(out), progress=False)
    return distill.run(distill.DistillConfig(**(base | kw)))


def _evaluate(run: Path, **kw) -> dict:
    evaluate.run(evaluate.EvaluateConfig(run=str(run), workers=0, latency_repeats=1, latency_batch=0, onnx=False,
                                         progress=False, **kw))
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: cache/a (trained on, by a relative path), cache/b (another cache of the same dataset), runs/r."""
    root = tmp_path_factory.mktemp("project")
    _extract(root / "cache" / "a", seed=0)
    _extract(root / "cache" / "b", seed=1)
    here = os.getcwd()
    os.chdir(root)
    try:
        _distill("cache/a", Path("runs/r"))
    finally:
        os.chdir(here)
    return root


def test_the_run_records_where_and_which_cache(project):
    summary = json.loads((project / "runs/r/summary.json").read_text())
    assert summary["cache_location"] == str((project / "cache/a").resolve())
    assert len(summary["cache_fingerprint"]) == 64


def test_evaluate_finds_a_relative_cache_from_another_folder(project, tmp_path):
    proc = run_cli("evaluate", "--run", str(project / "runs/r"), "--workers", "0", "--latency-repeats", "1",
                   "--latency-batch", "0", "--no-onnx", "--no-progress", cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr


def test_another_cache_at_the_recorded_path_is_refused_naming_both(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    shutil.rmtree(root / "cache/a")
    shutil.copytree(project / "cache/b", root / "cache/a")  # the folder now holds another cache
    run = root / "runs/r"
    (run / "summary.json").write_text((run / "summary.json").read_text().replace(str(project), str(root)))
    with pytest.raises(CacheError, match="not the one run .* was trained on .*fingerprint.*--cache") as e:
        _evaluate(run)
    assert str(root / "cache/a") in str(e.value)
    # the cache it was trained on, moved elsewhere, is accepted with --cache
    shutil.copytree(project / "cache/a", tmp_path / "moved")
    report = _evaluate(run, cache=str(tmp_path / "moved"))
    assert report["student_metrics"]["n"] > 0
    with pytest.raises(CacheError, match="not the one run"):
        _evaluate(run, cache=str(project / "cache/b"))


def test_a_lost_cache_asks_for_cache(project, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(project / "runs/r", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["cache_location"] = str(tmp_path / "gone")
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CacheError, match="no longer at .*gone.*pass --cache"):
        _evaluate(run)


def test_a_moved_run_folder_resumes(project, tmp_path):
    cache = str(project / "cache/a")
    first = _distill(cache, tmp_path / "first", epochs=1)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(first), str(moved))
    _distill(cache, moved, epochs=2, resume=True)
    lines = (moved / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2

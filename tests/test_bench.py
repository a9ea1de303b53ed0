"""The benchmark script runs (a CI-sized section) and renders the committed results."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_results_render_with_every_target_row():
    bench = _bench()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        text = bench.render(json.loads(path.read_text()))
        for row in ("distill-from-cache epoch / supervised-only epoch", "extraction / model-only views/s",
                    "chunk-aligned cache reads", "cache bytes per view"):
            assert row in text, (path.name, row)


def test_cache_reads_section_runs(tmp_path, capsys):
    bench = _bench()
    bench.main(["--quick", "--only", "cache_reads", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    result = json.loads(line.split("cache_reads: ", 1)[1].rsplit(" (", 1)[0])
    assert result["aligned_views_per_s"] > result["random_views_per_s"] > 0
    assert not list(tmp_path.iterdir())  # --only prints and writes no results file

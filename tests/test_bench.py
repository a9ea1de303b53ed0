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


def test_a_ratio_reports_its_spread_and_flags_noise_when_the_repeats_disagree():
    bench = _bench()
    steady = bench.spread([0.95, 0.97, 0.93], ">=", 0.9)
    assert (steady["median"], steady["min"], steady["max"], steady["n"]) == (0.95, 0.93, 0.97, 3)
    assert steady["meets"] and not steady["noisy"]
    noisy = bench.spread([0.95, 0.85, 0.92], ">=", 0.9)
    assert noisy["meets"] and noisy["noisy"]  # the median meets the target, one repeat does not
    slow = bench.spread([1.3, 1.2, 1.25], "<=", 1.1)
    assert not slow["meets"] and not slow["noisy"]
    r = {"machine": "m", "command": "c", "wall_s": 60, "torch": "t",
         "machine_before": {"processor": "x86_64", "cores": 2, "cpu_count": 2, "load_1min": 1.5, "torch_threads": 2},
         "machine_after": {"load_1min": 1.9},
         "extraction": {"tiny": {"input_size": 64, "ratio": noisy, "extraction_over_model_only": 0.92,
                                 "model_only_views_per_s": 1, "extraction_views_per_s": 1,
                                 "whole_command_views_per_s": 1, "whole_command_over_model_only": 1,
                                 "first_run_views_per_s_with_packing": 1, "stream_views_per_s_one_core": 1}}}
    text = bench.render(r)
    assert "| 0.920 | 0.850–0.950 (3) | >= 0.9 | meets, **noisy** |" in text
    assert "2 usable cores of 2" in text and "load 1.50 before, 1.90 after" in text

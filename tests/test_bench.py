"""The benchmark script runs (a CI-sized section) and renders the committed results."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_results_render_with_every_target_row():
    bench = _bench()
    for path in (ROOT / "benchmarks" / "results").glob("cpu-*.json"):
        text = bench.render(json.loads(path.read_text()))
        for row in ("distill-from-cache epoch / supervised-only epoch", "extraction / model-only views/s",
                    "chunk-aligned cache reads", "cache bytes per view", "customkd run / kd run of",
                    "Training batches of 64"):
            assert row in text, (path.name, row)


def test_cache_reads_section_runs(tmp_path, capsys):
    bench = _bench()
    bench.main(["--quick", "--only", "cache_reads", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    result = json.loads(line.split("cache_reads: ", 1)[1].rsplit(" (", 1)[0])
    assert result["aligned_views_per_s"] > result["random_views_per_s"] > 0
    assert not list(tmp_path.iterdir())  # --only prints and writes no results file


def test_stream_makeup_section_shows_sorted_caches_mixed_and_the_one_shard_stream_not(tmp_path, capsys):
    bench = _bench()
    bench.main(["--quick", "--only", "stream_makeup", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    result = json.loads(line.split("stream_makeup: ", 1)[1].rsplit(" (", 1)[0])
    for world in (1, 8):
        fair, one = (result[f"sorted, interleave {i}, {world} rank(s)"] for i in ("auto", 1))
        assert fair["classes_per_batch"] >= 0.7 * fair["iid_classes_per_batch"]
        assert one["classes_per_batch"] < 0.5 * one["iid_classes_per_batch"]  # (--quick: 131 rows a class)
        shuffled = result[f"shuffled, interleave auto, {world} rank(s)"]
        assert abs(shuffled["classes_per_batch"] - shuffled["iid_classes_per_batch"]) < 1
    text = bench.render({"machine": "m", "command": "c", "wall_s": 1, "torch": "t", "stream_makeup": result})
    assert "| sorted, interleave 1, 8 rank(s) |" in text


def test_method_cost_section_times_whole_runs_against_kd(tmp_path, capsys):
    bench = _bench()
    bench.main(["--tiny", "--only", "method_cost", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    result = json.loads(line.split("method_cost: ", 1)[1].rsplit(" (", 1)[0])
    assert set(result["run_s"]) == {"kd", "customkd", "customkd, moving customisation on the clean record"}
    assert all(v > 0 for v in result["run_s"].values())
    for name in ("customkd", "customkd, moving customisation on the clean record"):
        s = result[f"{name} / kd spread"]
        assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"] and s["target"] == "<= 1.2"
    text = bench.render({"machine": "m", "command": "c", "wall_s": 1, "torch": "t", "method_cost": result})
    assert "customkd run / kd run of 1 epochs" in text


def test_views_section_runs_and_reports_bytes_and_ratios_per_view_count(tmp_path, capsys):
    bench = _bench()
    bench.main(["--quick", "--only", "views", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    result = json.loads(line.split("views: ", 1)[1].rsplit(" (", 1)[0])
    assert sorted(result, key=int) == ["4", "16", "64"]
    for v, e in result.items():
        b = e["bytes_per_view"]
        assert e["views"] == int(v) and b["features"] > 0 and 0 < b["logits_top10"] and b["logits_dense"] > 0
        assert b["logits_top10_raw"] == 42 and b["logits_dense_raw"] == 200
        assert e["model_only_views_per_s"] > 0 and e["extraction_views_per_s"] > 0
        assert e["ratio"]["n"] == 2 and e["ratio"]["min"] <= e["ratio"]["median"] <= e["ratio"]["max"]
    text = "\n".join(bench.render_views(result))
    assert "| 64 |" in text and "top-10 logits" in text


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


def test_committed_gpu_results_render_with_their_target_rows():
    _bench()
    import gpu_suite

    paths = sorted((ROOT / "benchmarks" / "results").glob("gpu-*.json"))
    if not paths:
        pytest.skip("no GPU results committed yet (benchmarks/gpu_bench.sh makes them)")
    for path in paths:
        r = json.loads(path.read_text())
        assert gpu_suite.render_gpu(r) == path.with_suffix(".md").read_text()


def _fake_parts(out_json, sleep_s):
    import time

    def model_only(ctx):
        assert json.loads(out_json.read_text())["parts"]["environment"]["status"] == "ok"  # written already
        return {"dinov2": {"teacher": "vit_large_patch14_dinov2@224", "input_size": 224, "batch": 256,
                           "bf16_img_per_s": {"median": 3100.0, "min": 3000.0, "max": 3200.0, "n": 3},
                           "peak_memory_gib": 9.5}}

    def extraction(ctx):
        raise RuntimeError("nvJPEG is missing")

    def replay(ctx):
        time.sleep(sleep_s)

    return {"environment": lambda ctx: {"gpu": "Fake GPU", "torch": "t", "cuda": "c", "cores": 16},
            "model_only": model_only, "extraction": extraction, "replay": replay,
            "training": lambda ctx: {"student": "s", "image_size": 224, "batch": 256,
                                     "cache_img_per_s": {"median": 850.0, "min": 800.0, "max": 900.0, "n": 2},
                                     "synthetic_img_per_s": {"median": 1000.0, "min": 990.0, "max": 1010.0, "n": 2},
                                     "cache_over_synthetic": {"median": 0.85, "min": 0.8, "max": 0.9, "n": 2}},
            "pipeline": lambda ctx: {}, "compile": lambda ctx: {}}


def test_gpu_set_writes_its_file_after_every_part_and_keeps_going_past_a_failing_or_slow_one(tmp_path, monkeypatch):
    _bench()
    import torch
    import gpu_suite

    out_json, out_md = tmp_path / "gpu-fake.json", tmp_path / "gpu-fake.md"
    monkeypatch.setattr(gpu_suite, "PARTS", _fake_parts(out_json, sleep_s=5))
    limits = {"environment": (0, 10), "model_only": (0, 10), "extraction": (0, 10), "replay": (0, 1),
              "training": (0, 10), "pipeline": (0, 10), "compile": (100, 200)}
    s = gpu_suite.Settings(deadline_s=60, part_s=limits)
    r = gpu_suite.run_suite(s, torch.device("cpu"), tmp_path, out_json, out_md, "python benchmarks/bench.py --gpu")
    status = {k: v["status"] for k, v in r["parts"].items()}
    assert status == {"environment": "ok", "model_only": "ok", "extraction": "failed", "replay": "timed out",
                      "training": "ok", "pipeline": "ok", "compile": "skipped"}
    assert "nvJPEG is missing" in r["parts"]["extraction"]["error"]
    assert json.loads(out_json.read_text())["parts"] == json.loads(json.dumps(r["parts"]))
    md = out_md.read_text()
    assert md.startswith("# GPU set: Fake GPU")
    assert ("| model-only img/s, vit_large_patch14_dinov2@224 bf16, batch 256 | 3,100 | 3,000–3,200 (3) | >= 3000 "
            "| meets |") in md
    assert "| training from the cache / synthetic | 0.850 | 0.800–0.900 (2) | >= 0.9 | misses |" in md
    assert "| extraction | failed |" in md and "Peak GPU memory (GiB): dinov2 9.5" in md


def test_gpu_set_on_the_cpu_with_tiny_models(tmp_path):
    """The real parts that need no cache, end to end through the command line (the rest: test-slow)."""
    bench = _bench()
    r = bench.main(["--gpu", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--part", "environment",
                    "--part", "model_only"])
    assert {k: v["status"] for k, v in r["parts"].items()} == {"environment": "ok", "model_only": "ok"}
    assert r["environment"]["attention"]["dinov2"]["fused"] > 0
    ladder = r["model_only"]["ladder"]["img_per_s"]
    assert set(ladder) == {"fp32", "bf16 autocast", "bf16 autocast + channels_last"}
    assert all(v["median"] > 0 for v in ladder.values())
    (md,) = tmp_path.glob("gpu-*.md")
    assert "model-only img/s, test_vit@32" in md.read_text()


@pytest.mark.slow
def test_gpu_set_on_the_cpu_runs_every_part(tmp_path):
    bench = _bench()
    r = bench.main(["--gpu", "--device", "cpu", "--tiny", "--out", str(tmp_path), "--deadline-s", "3000"])
    assert all(p["status"] == "ok" for p in r["parts"].values()), r["parts"]
    assert r["replay"]["views_vs_cpu_replay"]["max"] <= 1  # on the CPU: the recorded tolerance
    assert r["extraction"]["dinov2"]["device"]["img_per_s"]["median"] > 0


def test_pipeline_section_gives_views_per_core_for_real_photos(tmp_path):
    bench = _bench()
    a = type("Args", (), {"pipeline_images": 6, "pipeline_views": 2, "repeats": 1})()
    r = bench.bench_pipeline(a, tmp_path)
    photos = [k for k in r if k.startswith("photos")]
    assert len(photos) == 2
    for k in photos + ["MNIST digits 28x28 (demo)"]:
        e = r[k]
        assert e["views_per_s_one_core"]["median"] > 0 and e["decode_ms_per_image"] > 0
        assert e["cores_for_target"] == pytest.approx(12000 / e["views_per_s_one_core"]["median"])
    # the photos packed at 1024 px are larger than at the default bound of 384
    small, large = (r[k]["mean_packed_pixels"] for k in sorted(photos, key=lambda k: "1024" in k))
    assert large > small and max(r[photos[0]]["image_bound"], r[photos[1]]["image_bound"]) == 1024
    assert "| MNIST digits 28x28 (demo) | 784 (~28²) |" in "\n".join(bench.render_pipeline(r))


def test_a_merge_replaces_its_sections_and_their_earlier_merge_line(tmp_path):
    bench = _bench()
    machine = {"load_1min": 0.5}

    def measured(sections, value, wall):
        out = {name: value for name in sections}
        return out | {"command": f"bench --only {' '.join(sections)}", "torch": "t", "wall_s": wall,
                      "machine_before": machine, "machine_after": machine}

    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(measured(["a", "b"], 1, 10.0)))
    for value, wall in ((2, 20.0), (3, 30.0)):  # the views section measured twice
        path.write_text(json.dumps(bench.merged(path, measured(["b"], value, wall), ["b"])))
    merged = bench.merged(path, measured(["a"], 4, 40.0), ["a"])
    assert (merged["a"], merged["b"]) == (4, 3)
    assert [(m["sections"], m["wall_s"]) for m in merged["merged"]] == [(["b"], 30.0), (["a"], 40.0)]


# the sections each test of this file runs (a section added to bench.py without a test here fails below)
TESTED = {"cache_reads", "stream_makeup", "method_cost", "views", "pipeline", "extraction", "storage", "distill",
          "ranks"}


def test_every_section_has_a_test_here():
    assert set(_bench().SECTIONS) == TESTED


def _tiny(sections, tmp_path) -> dict:
    args = ["--tiny", "--out", str(tmp_path)]
    for s in sections:
        args += ["--only", s]
    results = _bench().main(args)
    assert not list(tmp_path.iterdir())  # a tiny run writes no results file
    return results


def test_extraction_storage_and_distill_sections_run_at_tiny_size(tmp_path):
    r = _tiny(["extraction", "storage", "distill"], tmp_path)
    assert set(r) >= {"extraction", "storage", "distill"}
    text = _bench().render(r | {"machine": "m", "command": "c", "wall_s": 1, "torch": "t"})
    for row in ("distill-from-cache epoch / supervised-only epoch", "extraction / model-only views/s",
                "cache bytes per view"):
        assert row in text, row


@pytest.mark.slow
def test_every_section_runs_at_tiny_size(tmp_path):
    r = _tiny([], tmp_path)
    assert set(_bench().SECTIONS) <= set(r)
    assert r["ranks"]["speedup"]["n"] == 2

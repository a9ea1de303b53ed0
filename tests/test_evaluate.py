"""Stage three: report numbers come from the model; ONNX matches torch; the CLI runs all stages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.measure import count_macs, count_params, export_onnx, topk_metrics
from kdcache.students import create_student
from kdcache.stages import distill, evaluate, extract


def test_topk_metrics_known_values():
    logits = np.array([[3, 2, 1, 0, -1, -2], [0, 5, 1, 2, 3, 4], [1, 0, 0, 0, -1, 0.5]], np.float32)
    labels = np.array([0, 0, 5])
    m = topk_metrics(logits, labels, {"first_two": np.array([True, True, False])})
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["groups"]["first_two"] == {"top1": 0.5, "top5": 0.5, "n": 2}


def test_params_and_macs_of_a_known_model():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert count_params(lin) == 12 * 5 + 5
    assert count_macs(lin, torch.randn(1, 3, 2, 2)) == 60


def test_onnx_export_matches_torch(tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", num_classes=7)
    out = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert out["max_abs_diff"] < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 1000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cache = extract.run(extract.ExtractConfig(
        dataset="synthetic", dataset_options=(("n", 120), ("classes", 6)), teacher="test_vit", random_init=True,
        views=2, shard_size=32, workers=0, out=str(tmp / "cache"), progress=False))
    return distill.run(distill.DistillConfig(
        cache=str(cache), student="test_efficientnet", image_size=32, method="kd", scenario="supervised",
        epochs=1, batch_size=16, workers=0, out=str(tmp / "run"), progress=False))


def test_report_numbers_come_from_the_model(run_dir):
    # make the student's answer known: the classifier ignores the image and ranks classes by its bias
    state = load_file(str(run_dir / "student.safetensors"))
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    state["classifier.bias"] = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # class 1 first, 0 last
    save_file(state, str(run_dir / "student.safetensors"))
    evaluate.run(evaluate.EvaluateConfig(run=str(run_dir), workers=0, latency_repeats=3))
    report = json.loads((run_dir / "report.json").read_text())
    g = zarr.open_group(json.loads((run_dir / "summary.json").read_text())["cache"], mode="r")
    labels, splits, domains = g["labels"][:], g["splits"][:], g["domains"][:]
    test = (splits == 1) & (labels >= 0)
    s = report["student_metrics"]
    assert s["n"] == test.sum()
    assert s["top1"] == pytest.approx((labels[test] == 1).mean())
    assert s["top5"] == pytest.approx((labels[test] != 0).mean())
    d0 = test & (domains == 0)
    assert s["groups"]["domain0"]["top1"] == pytest.approx((labels[d0] == 1).mean())
    assert s["groups"]["domain0/test"]["n"] == d0.sum()
    # the teacher's row: its cached clean-view logits (a probe fitted on exactly these train labels)
    t_top1 = (g["logits"][:, 0].astype(np.float32).argmax(1)[test] == labels[test]).mean()
    assert report["teacher_metrics"]["top1"] == pytest.approx(t_top1)
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["params"] > 0 and report["macs"] > 0
    assert report["latency_cpu_b1"]["median_ms"] > 0
    for name in ("report.md", "accuracy_per_domain.png", "training_curves.png", "student.onnx"):
        assert (run_dir / name).is_file(), name
    assert f"{s['top1']:.4f}" in (run_dir / "report.md").read_text()


def test_exported_student_loads_with_timm_alone(run_dir):
    import timm

    evaluate.run(evaluate.EvaluateConfig(run=str(run_dir), workers=0, latency_repeats=2, onnx=False))
    folder = run_dir / "export"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # no kdcache code involved
    cfg = json.loads((folder / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert cfg["num_classes"] == summary["num_classes"] and len(cfg["label_names"]) == summary["num_classes"]
    size = summary["image_size"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, size, size]
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, size, size)
    ours = create_student(summary["student"], summary["num_classes"])
    ours.model.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(data["mean"]).view(1, 3, 1, 1), torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():  # timm's preprocessing constants + the exported weights = our student
        assert torch.allclose(model((x.float() / 255 - mean) / std), ours.eval()(x).logits, atol=1e-4)


def test_cli_extract_distill_evaluate_report(tmp_path):
    runner = CliRunner()
    cache, run = str(tmp_path / "cache"), str(tmp_path / "run")
    steps = [["extract", "--dataset", "synthetic", "--dataset-opt", "n=64", "--teacher", "test_vit", "--random-init",
              "--views", "2", "--workers", "0", "--shard-size", "32", "--out", cache, "--no-progress"],
             ["distill", "--cache", cache, "--student", "test_efficientnet", "--image-size", "32", "--epochs", "1",
              "--method", "customkd", "--scenario", "ssl", "--labels-per-class", "2", "--workers", "0",
              "--out", run, "--no-progress"],
             ["evaluate", "--run", run, "--workers", "0", "--latency-repeats", "3", "--no-onnx"]]
    for args in steps:
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args[0], res.output)
    assert "student top-1" in res.output
    res = runner.invoke(app, ["report", run])
    assert res.exit_code == 0 and "| test_efficientnet | customkd | ssl 2 labels/class" in res.output
    res = runner.invoke(app, ["report", run, str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr == f"error: run folder {tmp_path / 'missing'} does not exist\n"
    # what others load (exports, checkpoints, reports) has the umask's mode, as any file (not safetensors' 0600)
    from kdcache.files import umask

    shared = [f for f in Path(run).rglob("*") if f.is_file() and not f.name.startswith(".")]
    assert {"model.safetensors", "student.safetensors", "method.safetensors", "report.json"} <= {f.name for f in shared}
    assert {f.relative_to(run).as_posix(): oct(f.stat().st_mode & 0o777) for f in shared} \
        == {f.relative_to(run).as_posix(): oct(0o666 & ~umask()) for f in shared}
    res = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a finished distill run" in res.output


def test_evaluate_reads_the_run_config_typed_and_the_cache_through_its_checks(run_dir, tmp_path):
    """The run's config.yaml goes through the typed loader (an unknown key is named, with the closest), and the
    cache through distill's gatekeeping: an incomplete cache is refused with the command that completes it."""
    import shutil

    import yaml

    from kdcache.cache.format import CacheError
    from kdcache.cache.store import CacheStore

    run, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    shutil.copytree(config["cache"], cache)
    (run / "config.yaml").write_text(yaml.safe_dump(dict(config, epoch=3)))
    with pytest.raises(CacheError, match=r"config.yaml is damaged \(unknown option 'epoch' \(did you mean "
                                         r"'epochs'\?\)"):
        evaluate.run(evaluate.EvaluateConfig(run=str(run), workers=0, progress=False, onnx=False))
    (run / "config.yaml").write_text(yaml.safe_dump(dict(config, cache=str(cache))))
    CacheStore.open(cache, mode="r+").mark_todo(0)
    with pytest.raises(CacheError, match=r"is incomplete: 1 of 4 shards are not extracted; resume with"):
        evaluate.run(evaluate.EvaluateConfig(run=str(run), workers=0, progress=False, onnx=False))

"""In-process stage runs: the bad-image zoo inside a real extraction, and the CLI surface."""
from __future__ import annotations

import numpy as np
import torch
from test_datasets import _domainnet_tree
from test_images import zoo
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.images import decode_packed
from kdcache.pack import read_shard, shard_name
from kdcache.cache.store import CacheStore
from kdcache.teachers import create_teacher
from kdcache.views import apply
from kdcache.stages.extract import ExtractConfig, run


def test_bad_image_zoo_in_an_extraction(tmp_path):
    root = tmp_path / "data"
    files = zoo()
    for i, (name, data) in enumerate(sorted(files.items())):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / f"{name}.png").write_bytes(data)
    cfg = ExtractConfig(dataset="imagefolder", data_root=str(root), teacher="test_vit", random_init=True,
                        views=2, shard_size=4, batch_size=3, workers=0, out=str(tmp_path / "cache"),
                        progress=False, image_bound=96)
    store = CacheStore.open(run(cfg))
    keys = [str(k) for k in store.text("keys")]
    status = store.status()
    reasons = store.text("reasons")
    assert len(keys) == len(files)
    for row, key in enumerate(keys):
        name = key.split("/")[-1][:-4]
        if name.endswith("_bad"):
            assert status[row] == 2 and str(reasons[row]), key
            assert not store.array("features")[row].any()
        else:
            assert status[row] == 1 and str(reasons[row]) == "", (key, reasons[row])
    # `info` names each bad row by its key and reason, as text
    from kdcache.cacheinfo import summarize

    listed = summarize(store)["bad_inputs"]
    bad_rows = [row for row in range(len(keys)) if status[row] == 2]
    assert [b["row"] for b in listed] == bad_rows
    assert [b["key"] for b in listed] == [keys[r] for r in bad_rows] and all(b["reason"] for b in listed)
    assert [b["reason"] for b in listed] == [str(reasons[r]) for r in bad_rows]
    # no index shift: every good row holds the features of its own image
    teacher = create_teacher("test_vit", random_init=True)
    feats, views = store.array("features"), store.array("views")
    for k in range(store.layout.num_shards):
        for row, ext, data in read_shard(store.images_dir / shard_name(k)):
            assert keys[row] and (ext == "bad") == (status[row] == 2)
            if ext != "bad":
                x = apply(decode_packed(data), views[row, 1], 160)
                out = teacher(x[None])["features"][0]
                cos = torch.nn.functional.cosine_similarity(out, torch.tensor(feats[row, 1].astype(np.float32)),
                                                            dim=0)
                assert cos > 0.999, keys[row]


def test_cli_extract_then_info_on_a_domainnet_tree(tmp_path):
    _domainnet_tree(tmp_path / "dn")
    runner = CliRunner()
    out = tmp_path / "cache"
    args = ["extract", "--dataset", "domainnet", "--data-root", str(tmp_path / "dn"), "--teacher", "test_vit",
            "--random-init", "--views", "2", "--workers", "0", "--shard-size", "5", "--out", str(out),
            "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["info", "--cache", str(out), "--verify"])
    assert res.exit_code == 0 and res.stderr == "", res.output  # no progress bar off a terminal
    assert runner.invoke(app, ["info", "--cache", str(out), "--verify", "--no-progress"]).stdout == res.stdout
    assert "domainnet: N=12, 2 classes, domains clipart, real" in res.output
    assert "3/3 shards" in res.output and "(complete)" in res.output and "verify    ok" in res.output
    # the same command again resumes (nothing to do) and keeps the cache
    before = CacheStore.open(out).array("features")[:]
    assert runner.invoke(app, args).exit_code == 0
    assert np.array_equal(before, CacheStore.open(out).array("features")[:])


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--dataset", "domainet", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "choose one of" in res.output and "domainnet" in res.output
    res = runner.invoke(app, ["extract", "--dataset", "officehome", "--data-root", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "--data-root" in res.output
    res = runner.invoke(app, ["extract", "--dataset", "synthetic", "--teacher", "test_vit", "--out",
                              str(tmp_path / "c")])
    assert res.exit_code == 2 and "--teacher-weights" in res.output
    res = runner.invoke(app, ["extract", "--teacher", "test_vit", "--random-init", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--dataset is required" in res.output and "synthetic" in res.output
    res = runner.invoke(app, ["info", "--cache", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no cache at" in res.output
    assert not (tmp_path / "c").exists()  # a failed start leaves nothing behind



def test_urls_that_cannot_hold_a_cache_or_a_run_are_refused_by_name(tmp_path, monkeypatch):
    """Runs stay on a file system; a cache URL needs a known protocol whose package is installed. Each is an
    error naming the flag, never a local folder called `s3:`."""
    import importlib.util

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    cases = [(["extract", "--dataset", "synthetic", "--teacher", "test_vit", "--random-init", "--out",
               "nosuchfs://bucket/cache"], "--out", "nosuchfs"),
             (["distill", "--cache", "cache/x", "--out", "s3://bucket/run"], "--out", "object storage"),
             (["extract", "--dataset", "imagefolder", "--data-root", "s3://bucket/images", "--teacher", "test_vit",
               "--random-init", "--out", "c"], "--data-root", "object storage")]
    if importlib.util.find_spec("gcsfs") is None:
        cases.append((["distill", "--cache", "gs://bucket/cache", "--out", "runs/x"], "--cache", "no filesystem"))
    for args, flag, why in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and f"{flag} " in res.output and why in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_yaml_config_with_flags_on_top(tmp_path):
    from kdcache.stages.config import resolve

    (tmp_path / "c.yaml").write_text("views: 3\nteacher: test_vit\nshard_size: 16\n")
    cfg = resolve(ExtractConfig, tmp_path / "c.yaml", views=5, head=None)
    assert (cfg.views, cfg.teacher, cfg.shard_size, cfg.head) == (5, "test_vit", 16, "auto")
    # repeated flags are YAML lists, KEY=VALUE flags a mapping (or the list of pairs a saved config holds)
    (tmp_path / "d.yaml").write_text("domains: [a, b]\ndataset_options: {n: 64, classes: 4}\n")
    cfg = resolve(ExtractConfig, tmp_path / "d.yaml")
    assert cfg.domains == ("a", "b") and cfg.dataset_options == (("n", 64), ("classes", 4))
    (tmp_path / "e.yaml").write_text("dataset_options: [[n, 64], [classes, 4]]\n")
    assert resolve(ExtractConfig, tmp_path / "e.yaml").dataset_options == (("n", 64), ("classes", 4))


def test_every_stage_option_has_a_flag_and_its_default_in_help():
    """One schema per stage: each field (a YAML key) is a flag of the same name, and --help shows the
    schema's default next to each option."""
    import dataclasses
    import inspect
    import re

    from kdcache.schema import FLAG_FIELDS
    from kdcache import schema

    commands = {c.callback.__name__: c.callback for c in app.registered_commands}
    for name, cls in (("extract", schema.ExtractConfig), ("distill", schema.DistillConfig),
                      ("evaluate", schema.EvaluateConfig)):
        flags = {FLAG_FIELDS.get(p, p) for p in inspect.signature(commands[name]).parameters}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in flags]
        assert not missing, f"{name}: YAML-only options {missing}"
    text = re.sub(r"[│\s]+", " ", CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output)
    for flag, default in (("--lr", "0.001"), ("--workers", "4"), ("--weight-decay", "0.05"), ("--epochs", "10"),
                          ("--shuffle-buffer", "512")):
        own = re.search(re.escape(flag) + r" <\w+> (.*?)(?= --[a-z]|$)", text).group(1)  # this option's help only
        assert re.search(r"default:? " + re.escape(default) + r"\b", own), (flag, own)

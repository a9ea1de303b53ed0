"""Stage two: the stream, learning from the cache, resume, DDP, and a read-only cache."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env, read_all, run_cli, write_image
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_teacher import train_tiny_teacher

from kdcache.images import decode_packed
from kdcache.train.loader import CacheStream, StreamConfig, labelled_repeats, rank_shards
from kdcache.methods import MethodError
from kdcache.pack import read_shard, shard_name
from kdcache.scenarios import ScenarioError, make_scenario
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.students import StudentError
from kdcache.views import apply
from kdcache.stages import distill, extract
from kdcache.train import inputs, run_dir

N, CLASSES, S, V = 500, 10, 64, 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache of 500 generated images from a small teacher that was trained on other images."""
    tmp = tmp_path_factory.mktemp("distill")
    weights = train_tiny_teacher(tmp / "teacher.safetensors", classes=CLASSES)
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N), ("classes", CLASSES)),
                                teacher="test_efficientnet", teacher_weights=str(weights), teacher_input_size=48,
                                views=V, tokens=2, shard_size=S, batch_size=64, workers=0, out=str(tmp / "cache"),
                                progress=False)
    return extract.run(cfg)


def _cfg(cache, out, **kw) -> distill.DistillConfig:
    base = dict(cache=str(cache), student="test_efficientnet", image_size=48, scenario="ssl", labels_per_class=2,
                epochs=8, batch_size=32, lr=3e-3, workers=2, out=str(out), progress=False)
    base.update(kw)
    return distill.DistillConfig(**base)


def _final_top1(run_dir: Path) -> float:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["eval"]["top1"]


def test_stream_yields_every_sample_once_with_its_view_and_rows(cache, monkeypatch):
    store = CacheStore.open(cache)
    train = store.array("splits")[:] == 0
    labels = np.where(train, store.array("labels")[:], -1)
    reps = train.astype(np.int32)
    reads = []
    real_array = CacheStore.array
    monkeypatch.setattr(CacheStore, "array", lambda self, name: reads.append(name) or real_array(self, name))
    cfg = StreamConfig(str(cache), image_size=24, seed=3, shuffle_buffer=50, logits=True, tokens=True)
    shards = rank_shards(reps, S, seed=3, epoch=1, rank=0, world=1)
    samples = list(CacheStream(cfg, shards, reps, labels, epoch=1))
    rows = [s["row"] for s in samples]
    assert sorted(rows) == list(np.flatnonzero(train))  # every train row exactly once
    assert rows != sorted(rows)  # shuffled
    assert len(reads) <= 4 * len(shards)  # one chunk-aligned slice per array and shard, never per sample
    monkeypatch.undo()
    feats, views = store.array("features")[:], store.array("views")[:]
    logits, tokens = store.array("logits")[:], store.array("tokens")[:]
    packed = {r: d for k in range(store.layout.num_shards) for r, _, d in read_shard(store.images_dir / shard_name(k))}
    for s in samples[:40]:
        r, v = s["row"], s["view"]
        assert torch.equal(s["image"], apply(decode_packed(packed[r]), views[r, v], 24))
        assert torch.equal(s["feature"], torch.from_numpy(feats[r, v].astype(np.float32)))
        assert torch.equal(s["logits"], torch.from_numpy(logits[r, v].astype(np.float32)))
        assert torch.equal(s["tokens"], torch.from_numpy(tokens[r, v].astype(np.float32)))
        assert s["label"] == labels[r]
    assert len({s["view"] for s in samples}) == V  # views are drawn per sample per epoch
    other = [s["view"] for s in CacheStream(cfg, shards, reps, labels, epoch=2)]
    assert other != [s["view"] for s in samples]


def test_labelled_ratio_repeats_labelled_rows():
    labelled = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    reps = labelled_repeats(labelled, ~labelled, 0.5)
    assert list(reps) == [4] * 2 + [1] * 8  # 8 labelled draws : 8 unlabelled
    assert list(labelled_repeats(labelled, ~labelled, None)) == [1] * 10
    assert list(labelled_repeats(labelled, ~labelled, 0.1)) == [1] * 10  # already 20% labelled


@pytest.mark.slow
def test_kd_and_customkd_beat_supervised_with_few_labels(cache, tmp_path):
    acc = {}
    for method in ("supervised", "kd", "customkd"):
        out = distill.run(_cfg(cache, tmp_path / method, method=method))
        acc[method] = _final_top1(out)
    print("top-1 with 2 labels per class:", acc)
    assert acc["kd"] >= acc["supervised"] + 0.15, acc
    assert acc["customkd"] >= acc["supervised"] + 0.08, acc


def test_every_method_trains_one_epoch_and_cache_base_arrays_never_change(cache, tmp_path):
    base = lambda: {k: v for k, v in read_all(cache).items()  # noqa: E731
                    if not k.startswith(("heads/", "derived/"))}
    before = base()
    for method in ("fitnet", "dkd", "kdep", "scalekd"):
        out = distill.run(_cfg(cache, tmp_path / method, method=method, epochs=1, student="mobilenetv3_small_050",
                               image_size=32))
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert np.isfinite(rec["loss"]) and rec["images"] > 0, (method, rec)
    # the student is a plain timm checkpoint
    import timm

    from kdcache.students import create_student

    plain = timm.create_model("mobilenetv3_small_050", num_classes=CLASSES, pretrained=True,
                              pretrained_cfg_overlay={"file": str(tmp_path / "fitnet" / "student.safetensors"),
                                                      "num_classes": CLASSES})
    ours = create_student("mobilenetv3_small_050", CLASSES)
    ours.model.load_state_dict(load_file(str(tmp_path / "fitnet" / "student.safetensors")))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(plain.eval()(ours.normalize(x)), ours.eval()(x).logits, atol=1e-5)
    after = base()
    assert sorted(before) == sorted(after)
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    derived = read_all(cache)
    assert any(k.startswith("heads/") and k.endswith("fitted_on") and k != "heads/extract/fitted_on"
               for k in derived)  # the ssl scenario refitted a leak-free probe
    assert any(k.startswith("derived/svd") for k in derived)  # KDEP statistics, stored once


def test_leaky_head_is_refused_and_refit_on_scenario_labels(cache):
    store = CacheStore.open(cache, mode="r+")
    from kdcache.scenario_heads import scenario_teacher_head

    sup = make_scenario("supervised", store.array("labels")[:], store.array("domains")[:],
                        store.array("splits")[:], store.status(), ["domain0", "domain1"])
    head, info = scenario_teacher_head(store, sup)
    assert head is None and not info["refit"]  # the extract probe saw exactly these labels
    ssl = make_scenario("ssl", store.array("labels")[:], store.array("domains")[:], store.array("splits")[:],
                        store.status(), ["domain0", "domain1"], labels_per_class=2)
    head, info = scenario_teacher_head(store, ssl)
    assert info["refit"] and "outside this scenario" in info["reason"]
    fitted_on = store.group[info["group"]]["fitted_on"][:].astype(bool)
    assert np.array_equal(fitted_on, ssl.labelled) and fitted_on.sum() == 2 * CLASSES


@pytest.mark.slow
def test_sigkill_then_resume_continues_from_last_checkpoint(cache, tmp_path):
    args = ["distill", "--cache", str(cache), "--student", "test_efficientnet", "--image-size", "32",
            "--scenario", "ssl", "--labels-per-class", "2", "--epochs", "4", "--batch-size", "32",
            "--workers", "0", "--method", "kd", "--no-progress", "--no-check-dataset"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--out", str(ref)], env=cli_env(), check=True,
                   capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--out", str(out)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != "epoch-0003", "the kill must land before the last epoch"
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--out", str(out)], env=cli_env(),
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts over a run
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--out", str(out), "--resume"], env=cli_env(),
                   check=True, capture_output=True)
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    a, b = load_file(str(ref / "student.safetensors")), load_file(str(out / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run ends where an uninterrupted one does"
    changed = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--out", str(out), "--resume",
                              "--lr", "0.5"], env=cli_env(), capture_output=True, text=True)
    assert changed.returncode == 2 and "lr was" in changed.stderr


def test_two_rank_ddp_trains(cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "cli.py"), "distill", "--cache", str(cache), "--student", "test_efficientnet",
           "--image-size", "32", "--scenario", "ssl", "--labels-per-class", "2", "--epochs", "2",
           "--batch-size", "16", "--workers", "0", "--method", "customkd", "--no-progress", "--out", str(out),
           "--method-opt", "student_weight=0.5", "--method-opt", "w_self=1"]  # each rank records its own rows
    proc = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert all(r["steps"] > 0 and np.isfinite(r["loss"]) for r in recs) and recs[-1]["eval"]["n"] > 0
    record = load_file(str(out / "method.safetensors"))["memory._extra_state"]
    unlabelled = len(record)
    assert record[:, -1].sum() > 0.9 * unlabelled  # rank 0's checkpoint holds the rows both ranks recorded


def test_bad_input_stops_before_training(cache, tmp_path):
    def expect(exc, match, where=cache, **kw):
        out = tmp_path / f"r{len(os.listdir(tmp_path))}"
        with pytest.raises(exc, match=match):
            distill.run(_cfg(where, out, **kw))
        assert not (out / "metrics.jsonl").exists()

    expect(StudentError, "unknown --student.*Did you mean", student="mobilenetv3_larg_100")
    expect(MethodError, "choose one of", method="customkdd")
    expect(ScenarioError, "unknown domain.*domain0, domain1", scenario="uda", source=("domain0",),
           target=("domain9",), labels_per_class=None)
    expect(ScenarioError, "labels-per-class", labels_per_class=0)
    with pytest.raises(ScenarioError, match="zero labelled"):
        make_scenario("supervised", np.full(4, -1), np.zeros(4), np.zeros(4), np.ones(4), ["d"])

    broken = tmp_path / "incomplete"
    shutil.copytree(cache, broken)
    store = CacheStore.open(broken, mode="r+")
    store.array("status")[S:2 * S] = 0
    expect(CacheError, "incomplete: 1 of 8 shards.*resume with", where=broken)

    older = tmp_path / "older-replay"
    shutil.copytree(cache, older)
    store = CacheStore.open(older, mode="r+")
    store.update_attrs(views={k: v for k, v in store.attrs["views"].items() if k != "replay"})
    expect(CacheError, "view replay v1.*re-extract", where=older)


def test_dataset_changed_since_extraction_is_refused(tmp_path):
    root = tmp_path / "data"
    for c in range(2):
        for j in range(4):
            write_image(root / f"c{c}" / f"{j}.png", c * 10 + j)
    cfg = extract.ExtractConfig(dataset="imagefolder", data_root=str(root), teacher="test_vit", random_init=True,
                                views=1, shard_size=4, workers=0, out=str(tmp_path / "cache"), progress=False)
    cache = extract.run(cfg)
    write_image(root / "c1" / "new.png", 99)
    with pytest.raises(CacheError, match="changed since extraction"):
        distill.run(_cfg(cache, tmp_path / "run", scenario="supervised", labels_per_class=None,
                         epochs=1))


def test_online_teacher_sees_the_cached_views_and_trains(cache, tmp_path):
    """The --online-teacher reference runs the cache's own teacher on the same replayed views."""
    store = CacheStore.open(cache)
    teacher, head = inputs.online_teacher(store, None, None)
    size = teacher.preprocess.input_size
    train = store.array("splits")[:] == 0
    reps = train.astype(np.int32)
    cfg = StreamConfig(str(cache), image_size=24, seed=1, shuffle_buffer=1, teacher_size=size,
                       teacher_interpolation=teacher.preprocess.interpolation)
    samples = list(CacheStream(cfg, rank_shards(reps, S, 1, 0, 0, 1)[:1], reps, store.array("labels")[:], 0))[:32]
    online = teacher.eval()(torch.stack([s["teacher_image"] for s in samples]))["features"]
    cached = torch.stack([s["feature"] for s in samples])
    assert torch.nn.functional.cosine_similarity(online, cached).min() > 0.999
    out = distill.run(_cfg(cache, tmp_path / "online", method="kd", epochs=1, online_teacher=True))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["kd"]) and rec["eval"]["n"] > 0
    from safetensors.torch import save_file
    weights = load_file(store.attrs["config"]["teacher_weights"])
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(tmp_path / "other.safetensors"))
    other = tmp_path / "other.safetensors"
    with pytest.raises(CacheError, match="not the cache's teacher"):
        distill.run(_cfg(cache, tmp_path / "wrong", method="kd", epochs=1, online_teacher=True,
                         teacher_weights=str(other)))


def _views_by_draw(cache, epoch: int, fresh: bool, seed: int = 1) -> dict:
    store = CacheStore.open(cache)
    reps = (store.array("splits")[:] == 0).astype(np.int32)
    cfg = StreamConfig(str(cache), image_size=24, seed=seed, shuffle_buffer=1, features=False, fresh_views=fresh)
    shards = rank_shards(reps, S, seed, 0, 0, 1)[:1]  # one shard, read in each epoch
    return {(s["row"], s["view"]): s["image"] for s in CacheStream(cfg, shards, reps, store.array("labels")[:], epoch)}


def test_fresh_views_are_new_crops_each_epoch_and_the_clean_view_stays(cache):
    """--online-views fresh: view 0 is the cached clean view; views 1..V-1 are drawn anew per (seed, epoch, row),
    the same on every replay of that epoch and different in the next."""
    cached, fresh = _views_by_draw(cache, 0, False), _views_by_draw(cache, 0, True)
    assert cached.keys() == fresh.keys()
    again, later = _views_by_draw(cache, 0, True), _views_by_draw(cache, 1, True)
    clean = [k for k in fresh if k[1] == 0]
    crops = [k for k in fresh if k[1] > 0]
    assert clean and crops
    assert all(torch.equal(fresh[k], cached[k]) for k in clean)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    assert sum(not torch.equal(fresh[k], cached[k]) for k in crops) > 0.9 * len(crops)
    first = {row: image for (row, view), image in fresh.items() if view > 0}
    rows = [(row, view) for row, view in later if view > 0 and row in first]
    assert rows and sum(not torch.equal(first[r], later[r, v]) for r, v in rows) > 0.9 * len(rows)


def test_online_teacher_on_fresh_views_trains_without_a_replay_proof(cache, tmp_path):
    with pytest.raises(ValueError, match="--online-views fresh needs --online-teacher"):
        distill.run(_cfg(cache, tmp_path / "no", method="kd", epochs=1, online_views="fresh"))
    with pytest.raises(ValueError, match="--online-views"):
        distill.run(_cfg(cache, tmp_path / "bad", method="kd", epochs=1, online_teacher=True, online_views="new"))
    out = distill.run(_cfg(cache, tmp_path / "fresh", method="kd", epochs=2, online_teacher=True,
                           online_views="fresh"))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["kd"]) and rec["eval"]["n"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary.get("replay_cosine") is None


def test_teacher_adaptation_is_stored_and_reported(cache, tmp_path):
    out = distill.run(_cfg(cache, tmp_path / "adapt", method="kd", epochs=1, scenario="uda", labels_per_class=None,
                           source=("domain0",), target=("domain1",), teacher_adapt=2))
    head = json.loads((out / "summary.json").read_text())["head"]
    assert head["adapted"] and head["rounds"] == 2 and head["group"].endswith("-adapt2")
    assert 0 <= head["eval_top1_before"] <= 1 and 0 <= head["eval_top1_after"] <= 1
    group = CacheStore.open(cache).group[head["group"]]
    assert group.attrs["complete"] and group["weight"].shape[0] == CLASSES


def test_bad_method_option_on_the_command_line(cache, tmp_path):
    base = ["distill", "--cache", str(cache), "--student", "test_efficientnet",
            "--scenario", "ssl", "--labels-per-class", "2", "--epochs", "1", "--no-progress", "--no-check-dataset"]
    for opt, match in (("temperature=0", "temperature=0.*must be > 0"), ("normalize=maybe", "normalize.*boolean"),
                       ("w_kdd=1", "no option.*w_kdd")):
        proc = run_cli(*base, "--method-opt", opt, "--out", str(tmp_path / opt), check=False)
        assert proc.returncode == 2 and re.search(match, proc.stderr.replace("\n", " ")), (opt, proc.stderr[-500:])
        assert not (tmp_path / opt).exists()


def test_customkd_phases_are_computed_once_and_shared_by_every_student(cache, tmp_path, monkeypatch):
    """precompute() keeps the customisation phases with the cache; a run then reads them (it never fits),
    and reaches exactly the classifier a run that fits them itself reaches."""
    from kdcache.methods import customkd

    cfg = _cfg(cache, tmp_path / "a", method="customkd", epochs=2, workers=0, seed=5)
    before = set((cache / "derived").glob("customkd-*/phase-*")) if (cache / "derived").is_dir() else set()
    distill.precompute(cfg)
    made = set((cache / "derived").glob("customkd-*/phase-*")) - before
    assert sorted(p.name for p in made) == ["phase-0000", "phase-0001"]

    def no_fit(self, phase, device):
        raise AssertionError("phase fitted again")

    fitted = customkd.CustomKD._fit_phase
    monkeypatch.setattr(customkd.CustomKD, "_fit_phase", no_fit)
    for student, out in (("test_efficientnet", "a"), ("test_vit", "b")):  # another student reads the same phases
        distill.run(_cfg(cache, tmp_path / out, method="customkd", epochs=2, workers=0, seed=5, student=student))
    read = [load_file(str(tmp_path / out / "method.safetensors")) for out in ("a", "b")]
    monkeypatch.setattr(customkd.CustomKD, "_fit_phase", fitted)
    shutil.rmtree(cache / "derived")  # nothing kept: this run fits every phase itself
    distill.run(_cfg(cache, tmp_path / "c", method="customkd", epochs=2, workers=0, seed=5))
    own = load_file(str(tmp_path / "c" / "method.safetensors"))
    for state in read:
        for name in ("m_weight", "m_bias", "phases"):
            assert torch.equal(state[name], own[name]), name
    assert int(own["phases"]) == 2 and own["m_weight"].abs().sum() > 0


@pytest.mark.parametrize("record", [pytest.param("train", marks=pytest.mark.slow), "clean",
                                    pytest.param("late", marks=pytest.mark.slow)])
def test_customkd_moving_customisation_resumes_exactly(cache, tmp_path, monkeypatch, record):
    """A customisation that moves with the student, and a target bootstrapped from its record, keep their state
    (the per-row record of the student's predictions and the last customised classifier) in the checkpoint: a run stopped after an epoch and
    resumed ends bit-identical to an uninterrupted one, phase by phase; only the first phase is kept with the
    cache (the later ones depend on the student). `late`: the moving refits start at the third phase (move_from),
    after the resume, from a clean record taken from the second epoch on."""
    opts = (("student_weight", 0.5), ("w_self", 1.0), ("self_threshold", 0.5), ("refit_threshold", 0.5), ("anchor", True),
            ("bootstrap", 0.5), ("record", record))
    if record == "late":
        opts = (("student_weight", 1.0), ("refit_threshold", 0.0), ("anchor", True), ("move_from", 0.5),
                ("record", "clean"))
    kw = dict(method="customkd", method_options=opts, epochs=3, workers=0, seed=3, image_size=32)
    distill.run(_cfg(cache, tmp_path / "ref", **kw))

    class Stop(Exception):
        pass

    real = run_dir.save_checkpoint

    def save_then_stop(run_dir, epoch, *a, **k):
        path = real(run_dir, epoch, *a, **k)
        if epoch == 1:
            raise Stop
        return path

    monkeypatch.setattr(run_dir, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        distill.run(_cfg(cache, tmp_path / "run", **kw))
    monkeypatch.setattr(run_dir, "save_checkpoint", real)
    distill.run(_cfg(cache, tmp_path / "run", resume=True, **kw))
    recs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "run")]
    keys = ("custom_teacher_eval_top1", "custom_target_eval_top1", "custom_fit_top1", "student_record_confident", "loss",
            "self", "custom")
    assert [[r.get(k) for k in keys] for r in recs[0]] == [[r.get(k) for k in keys] for r in recs[1]]
    assert recs[0][-1]["custom_phase"] == 3 and "student_record_confident" in recs[0][-1]
    for name in ("student.safetensors", "method.safetensors"):
        a, b = (load_file(str(tmp_path / d / name)) for d in ("ref", "run"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    record = load_file(str(tmp_path / "ref" / "method.safetensors"))["memory._extra_state"]
    assert record[:, -1].sum() > 0  # rows were recorded, and the checkpoint holds them


# the ends of the range by default; two points inside it under -m slow (they train 6 epochs each)
@pytest.mark.parametrize("move_from,epochs,first", [(0.0, 3, 1), pytest.param(0.5, 6, 3, marks=pytest.mark.slow),
                                                    pytest.param(0.75, 6, 5, marks=pytest.mark.slow), (1.0, 4, 4)])
def test_customkd_moving_customisation_starts_at_move_from(cache, tmp_path, monkeypatch, move_from, epochs, first):
    """With move_from, the phases before `first` (move_from of the run, never before the second) are the
    teacher-only chain's, kept with the cache and read from it; the later ones refit with the student's record.
    A clean record only those refits read is taken from two epochs before the first of them."""
    from kdcache.methods import customkd

    refits, recorded = [], []
    real_fit, real_end = customkd.CustomKD._fit_with_student, customkd.CustomKD.end_epoch

    def fit_with_student(self, ctx):
        refits.append(int(self.phases))
        return real_fit(self, ctx)

    def end_epoch(self, ctx, epoch):
        real_predict = ctx.predict_clean

        def predict(mask):
            recorded.append(epoch)
            return real_predict(mask)

        ctx.predict_clean = predict
        try:
            return real_end(self, ctx, epoch)
        finally:
            ctx.predict_clean = real_predict

    monkeypatch.setattr(customkd.CustomKD, "_fit_with_student", fit_with_student)
    monkeypatch.setattr(customkd.CustomKD, "end_epoch", end_epoch)
    opts = (("student_weight", 1.0), ("refit_threshold", 0.0), ("anchor", True), ("move_from", move_from),
            ("record", "clean"))
    out = tmp_path / "run"
    distill.run(_cfg(cache, out, method="customkd", method_options=opts, epochs=epochs, workers=0, seed=1,
                     image_size=32))
    assert refits == list(range(first, epochs))
    assert recorded == list(range(max(0, first - 2) if move_from > 0 else 0, epochs))
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["custom_phase"] for r in rec] == list(range(1, epochs + 1))
    monkeypatch.undo()
    distill.run(_cfg(cache, tmp_path / "fixed", method="customkd", method_options=(("student_weight", 0.0),),
                     epochs=epochs, workers=0, seed=1, image_size=32))  # the teacher-only chain
    fixed = [json.loads(x) for x in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    keys = ("custom_teacher_eval_top1", "custom_fit_top1")
    assert [[r[k] for k in keys] for r in rec[:first]] == [[r[k] for k in keys] for r in fixed[:first]]


def test_tensorboard_log_holds_the_epoch_metrics(cache, tmp_path):
    """--tensorboard writes each epoch's numbers as scalars (step = epoch), the same numbers as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    distill.run(_cfg(cache, out, method="kd", epochs=2, workers=0, eval_every=1, tensorboard=True))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    top1 = [(e.step, e.value) for e in events.Scalars("eval/top1")]
    assert top1 == [(r["epoch"] + 1, pytest.approx(r["eval"]["top1"])) for r in records]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_tensorboard_without_the_package_is_a_clear_error(cache, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match=r"--tensorboard needs the tensorboard package: pip install tensorboard"):
        distill.run(_cfg(cache, tmp_path / "run", method="kd", epochs=1, workers=0, tensorboard=True))
    assert not (tmp_path / "run").exists()


def test_the_default_optimiser_is_timms_with_no_decay_on_norms_and_biases():
    from kdcache.train.engine import make_optimizer

    model = create_student_for_test()
    names = {id(p): n for n, p in model.named_parameters()}
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        grouped = make_optimizer(name, model, 1e-3, 0.05)
        assert type(grouped) is cls
        by_decay = {g["weight_decay"]: g["params"] for g in grouped.param_groups}
        assert set(by_decay) == {0.0, 0.05}
        assert by_decay[0.0] and all(p.ndim <= 1 for p in by_decay[0.0])  # norm weights and biases
        assert all(p.ndim > 1 for p in by_decay[0.05])
        assert any("bn" in names[id(p)] for p in by_decay[0.0]) and any("bias" in names[id(p)] for p in by_decay[0.0])
        every = make_optimizer(name, model, 1e-3, 0.05, decay_norm_bias=True)  # the setting of earlier runs
        assert len(every.param_groups) == 1 and every.param_groups[0]["weight_decay"] == 0.05
        assert sum(len(g["params"]) for g in grouped.param_groups) == len(every.param_groups[0]["params"])
    sgd = make_optimizer("sgd", model, 1e-3, 0.05)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    with pytest.raises(ValueError, match="--optimizer"):
        make_optimizer("lamb", model, 1e-3, 0.05)


def test_a_run_saved_before_the_optimiser_default_changed_resumes_only_with_its_own_setting(cache, tmp_path):
    """A run whose saved config predates `decay_norm_bias` decayed every parameter: a resume that would
    change that is refused by name, and `--decay-norm-bias` resumes it."""
    from kdcache.train.engine import load_checkpoint

    out = tmp_path / "run"
    old = _cfg(cache, out, method="kd", epochs=2, workers=0, decay_norm_bias=True)
    distill.run(dataclasses.replace(old, epochs=1))
    path, state = load_checkpoint(out)
    del state["config"]["decay_norm_bias"]  # as saved before the option existed
    torch.save(state, path / "state.pt")
    with pytest.raises(CacheError, match=r"--decay-norm-bias was on, now off"):
        distill.run(dataclasses.replace(old, decay_norm_bias=False, resume=True))
    distill.run(dataclasses.replace(old, resume=True))
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    store = CacheStore.open(cache)
    assert run_dir.config_hash(old, store) != run_dir.config_hash(dataclasses.replace(old, decay_norm_bias=False), store)


def test_a_run_made_on_the_stream_before_windows_is_not_resumed_on_the_new_one(cache, tmp_path):
    """A checkpoint whose config predates --interleave and --clean-share was trained on batches of one shard and
    views drawn 1/V clean: its next epochs are not those of the run it began, so the resume is refused by name."""
    from kdcache.train.engine import load_checkpoint

    out = tmp_path / "run"
    cfg = _cfg(cache, out, method="kd", epochs=2, workers=0)
    distill.run(dataclasses.replace(cfg, epochs=1))
    path, state = load_checkpoint(out)
    for key in ("interleave", "clean_share"):
        del state["config"][key]  # as saved before the options existed
    torch.save(state, path / "state.pt")
    with pytest.raises(CacheError, match=r"--interleave.*--clean-share.*start a new run"):
        distill.run(dataclasses.replace(cfg, resume=True))


def create_student_for_test():
    from kdcache.students import create_student

    return create_student("test_efficientnet", 5)


# the stream is the same for any number of workers; a last batch of one joins the batch before it ------------

@settings(deadline=None)
@given(samples=st.integers(0, 300), size=st.integers(1, 40))
def test_batches_keep_the_order_and_never_end_with_one_sample(samples, size):
    from kdcache.train.loader import batched, num_batches

    batches = list(batched(range(samples), size))
    assert [x for b in batches for x in b] == list(range(samples))
    assert len(batches) == num_batches(samples, size)
    assert all(len(b) == size for b in batches[:-1])
    if batches:
        last = len(batches[-1])
        assert last <= size + 1 and (last > 1 or samples == 1 or size == 1)


def test_the_stream_is_the_same_for_any_number_of_workers(cache):
    """Batches (rows, views, pixels, teacher rows) depend on (seed, epoch, shards), never on --workers or on how
    the shards are cut into chunks for the workers; torch's generator moves alike."""
    from kdcache.train.loader import make_loader

    store = CacheStore.open(cache)
    train = store.array("splits")[:] == 0
    labels = np.where(train, store.array("labels")[:], -1)
    reps = train.astype(np.int32) * np.where(np.arange(N) % 7 == 0, 3, 1)  # some rows drawn three times
    batch = 30
    reps[np.flatnonzero(reps == 1)[:(reps.sum() - 1) % batch]] = 0  # the epoch leaves one sample for a last batch
    shards = rank_shards(reps, S, seed=4, epoch=2, rank=0, world=1)

    def batches(workers: int, chunk_size: int = 0):
        cfg = StreamConfig(str(cache), image_size=24, seed=4, shuffle_buffer=40, logits=True, chunk_size=chunk_size)
        torch.manual_seed(0)
        got = list(make_loader(cfg, shards, reps, labels, 2, batch, workers))
        return got, torch.rand(3)

    ref, after = batches(0)
    rows = torch.cat([b["row"] for b in ref]).tolist()
    assert sorted(rows) == np.repeat(np.arange(N), reps).tolist()  # every draw once
    assert [len(b["row"]) for b in ref] == [batch] * (len(ref) - 1) + [batch + 1]
    cfg = StreamConfig(str(cache), image_size=24, seed=4, shuffle_buffer=40, logits=True)
    assert [s["row"] for s in CacheStream(cfg, shards, reps, labels, 2)] == rows  # iterated directly: the same
    for workers, chunk_size in ((1, 0), (2, 0), (2, 16), (3, 7)):
        got, moved = batches(workers, chunk_size)
        assert torch.equal(moved, after), (workers, chunk_size)
        assert len(got) == len(ref), (workers, chunk_size)
        for a, b in zip(ref, got):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (workers, chunk_size)

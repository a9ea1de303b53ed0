"""Hostile and careless input: each numbered case of the reliability list, reproduced and refused.

Nothing bad gets through silently: a damaged or tampered cache is named by `info --verify` and refused
by `distill`, `extract --repair` restores it bit-identically, bad options are one-line errors naming the
flag, and two runs never share a run folder.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_same_cache, read_all, run_cli
from PIL import Image

from kdcache import cacheinfo
from kdcache.train.engine import TrainingDiverged
from kdcache.images import BadImage, decode_packed
from kdcache.train.loader import CacheStream, StreamConfig
from kdcache.pack import member_digest, read_members, shard_name
from kdcache.cache.format import CacheError
from kdcache.cache.integrity import missing_files, record_digests, shard_checksum
from kdcache.cache.store import CacheStore
from kdcache.extract.teacher import build_teacher
from kdcache.stages import distill, extract
from kdcache.train import inputs, run_dir
from kdcache.stages.config import ConfigError, resolve

N, S = 96, 8


def _extract_cfg(out, **kw) -> extract.ExtractConfig:
    base = dict(dataset="synthetic", dataset_options=(("n", N),), teacher="test_vit", random_init=True, views=2,
                shard_size=S, batch_size=6, workers=0, out=str(out), progress=False)
    base.update(kw)
    return extract.ExtractConfig(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return extract.run(_extract_cfg(tmp_path_factory.mktemp("hostile") / "ref"))


@pytest.fixture
def cache(reference, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def _distill_cfg(cache, out, **kw) -> distill.DistillConfig:
    base = dict(cache=str(cache), student="test_efficientnet", image_size=32, method="kd", scenario="ssl",
                labels_per_class=2, epochs=1, batch_size=16, workers=0, out=None if out is None else str(out), progress=False,
                check_dataset=False)
    base.update(kw)
    return distill.DistillConfig(**base)


def _repair(cache) -> None:
    extract.run(_extract_cfg(cache, repair=True))


def _problems(cache) -> list[str]:
    return cacheinfo.verify(CacheStore.open(cache))


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar shard member by member; `change(name, data)` returns [(name, data)] (empty: drop)."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members += change(m.name, tar.extractfile(m).read())
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# 1. a signal during the probe fit ---------------------------------------------------------------------

def test_interrupted_probe_fit_leaves_an_incomplete_cache_that_extract_finishes(reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    calls = []
    real = CacheStore.write_arrays

    def interrupted(self, k, data):
        calls.append(k)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the signal arrives while the probe's logits are written
        return real(self, k, data)

    monkeypatch.setattr(CacheStore, "write_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract.run(_extract_cfg(out))
    monkeypatch.undo()
    store = CacheStore.open(out)
    assert store.shard_done().all() and not cacheinfo.summarize(store)["complete"]
    assert any("never fitted" in p for p in cacheinfo.verify(store))
    with pytest.raises(CacheError, match="never fitted"):
        distill.run(_distill_cfg(out, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    extract.run(_extract_cfg(out))  # the same command fits the head
    assert_same_cache(reference, out)


# 2. tar shards: flipped bytes, truncation, renamed / dropped / swapped / symlinked members, pixel bombs -

def _flip_png_byte(name, data, target):
    if name == target:
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    return [(name, data)]


def test_flipped_png_byte_is_found_skipped_when_streaming_and_repaired(cache, reference, capfd):
    k, row = 3, 3 * S + 2
    tar = cache / "images" / shard_name(k)
    _rewrite_tar(tar, lambda n, d: _flip_png_byte(n, d, f"{row:09d}.png"))
    assert [p for p in _problems(cache) if p.startswith(f"shard {k}: packed images")]
    # the stream checks every member it reads against its digest: the row is skipped and reported
    store = CacheStore.open(cache)
    reps = np.zeros(N, np.int32)
    reps[k * S:(k + 1) * S] = 1
    samples = list(CacheStream(StreamConfig(str(cache), 32, clean_only=True, features=False), [k], reps,
                               store.array("labels")[:], 0))
    assert sorted(s["row"] for s in samples) == [r for r in range(k * S, (k + 1) * S) if r != row]
    assert f"shard {k} packed images: 1 member(s) differ" in capfd.readouterr().err
    _repair(cache)
    assert (cache / "images" / shard_name(k)).read_bytes() == (reference / "images" / shard_name(k)).read_bytes()
    assert_same_cache(reference, cache)
    assert _problems(cache) == []


@pytest.mark.parametrize("damage", ["truncate", "rename", "drop", "swap", "symlink", "extra"])
def test_tar_damage_is_named_by_verify_and_repaired_bit_identically(cache, reference, damage):
    k = 5
    tar = cache / "images" / shard_name(k)
    first, second = f"{k * S:09d}.png", f"{k * S + 1:09d}.png"
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:3000])
    elif damage == "rename":
        _rewrite_tar(tar, lambda n, d: [(n.replace(".png", ".jpg") if n == first else n, d)])
    elif damage == "drop":
        _rewrite_tar(tar, lambda n, d: [] if n == first else [(n, d)])
    elif damage == "swap":  # a member taken from another row, under this row's name
        other = dict((n, d) for n, d in _members(cache / "images" / shard_name(0)))
        _rewrite_tar(tar, lambda n, d: [(n, other[f"{0:09d}.png"] if n == first else d)])
    elif damage == "symlink":
        data = dict(_members(tar))
        with tarfile.open(tar, "w") as t:
            link = tarfile.TarInfo(first)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(link)
            for n, d in data.items():
                if n != first:
                    info = tarfile.TarInfo(n)
                    info.size = len(d)
                    t.addfile(info, io.BytesIO(d))
    elif damage == "extra":
        _rewrite_tar(tar, lambda n, d: [(n, d)] + ([("../escape.png", d)] if n == second else []))
    problems = [p for p in _problems(cache) if p.startswith(f"shard {k}:")]
    assert len(problems) == 1 and "packed images" in problems[0], problems
    store = CacheStore.open(cache)
    found, issues = read_members(tar, store.layout.rows(k))  # the reader never raises
    assert issues or len(found) < S or any(member_digest(*found[r]) != bytes(store.array("image_digests")[r])
                                           for r in found)
    _repair(cache)
    assert_same_cache(reference, cache)
    assert (cache / "images" / shard_name(k)).read_bytes() == (reference / "images" / shard_name(k)).read_bytes()
    assert not (cache / "escape.png").exists()


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (the pixel bomb of a hostile shard)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    import zlib

    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid IHDR checksum
    return bytes(data)


def test_a_pixel_bomb_member_is_refused_from_its_header(cache):
    for side in (400, 12000):  # just above the bound, and far above it
        with pytest.raises(BadImage, match="larger than the cache's image bound"):
            decode_packed(_png_declaring(side, side), max_side=384)
    bomb = _png_declaring(20000, 20000)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_packed(bomb, max_side=384)
    # even with its digest recorded (a consistent forgery), the stream skips it without decoding
    k, row = 2, 2 * S
    tar = cache / "images" / shard_name(k)
    _rewrite_tar(tar, lambda n, d: [(n, bomb if n == f"{row:09d}.png" else d)])
    store = CacheStore.open(cache, mode="r+")
    digests = store.array("image_digests")[:]
    digests[row] = np.frombuffer(member_digest("png", bomb), np.uint8)
    store.array("image_digests")[:] = digests
    record_digests(store, k, {"image_digests": digests[k * S:(k + 1) * S]})  # the forgery updates its digest too
    reps = np.zeros(N, np.int32)
    reps[k * S:(k + 1) * S] = 1
    rows = [s["row"] for s in CacheStream(StreamConfig(str(cache), 32, clean_only=True, features=False), [k], reps,
                                          store.array("labels")[:], 0)]
    assert row not in rows and len(rows) == S - 1


def test_random_byte_flips_in_packed_images_never_crash_the_decoder(reference):
    rng = np.random.default_rng(0)
    members = [d for n, d in _members(reference / "images" / shard_name(0)) if n.endswith(".png")]
    outcomes = {"refused": 0, "decoded": 0}
    for t in range(60):
        data = bytearray(members[t % len(members)])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        if t % 3 == 0:
            data = data[: int(rng.integers(8, len(data)))]
        try:
            img = decode_packed(bytes(data), max_side=384)
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            outcomes["decoded"] += 1
        except BadImage:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 60


# 3. non-finite training ------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_training_naming_the_step(cache, tmp_path, monkeypatch):
    from kdcache.train.engine import TrainModule

    real = TrainModule.forward
    calls = []

    def nan_at_step_3(self, **inputs):
        parts = real(self, **inputs)
        calls.append(1)
        if len(calls) == 3:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(TrainModule, "forward", nan_at_step_3)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch 1/1.*step 3.*--lr.*--method-opt"):
        distill.run(_distill_cfg(cache, run))
    assert not (run / "checkpoints").exists() and not (run / "student.safetensors").exists()


def test_temperature_zero_is_refused_before_training(cache, tmp_path):
    proc = run_cli("distill", "--cache", str(cache), "--student", "test_efficientnet", "--method", "kd",
                   "--method-opt", "temperature=0", "--out", str(tmp_path / "run"), "--no-check-dataset", check=False)
    assert proc.returncode == 2 and "temperature" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "run").exists()


# 4. booleans and numbers written as words ------------------------------------------------------------

def test_yaml_values_are_typed_booleans_parsed_and_bad_values_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text('resume: "no"\nlr: "1e-3"\nepochs: "3"\nprogress: off\n')
    cfg = resolve(distill.DistillConfig, good)
    assert cfg.resume is False and cfg.lr == 1e-3 and cfg.epochs == 3 and cfg.progress is False
    for text, match in [("lr: abc\n", "'lr' must be a finite number"), ("resume: maybe\n", "'resume' must be true"),
                        ("epochs: 1.7\n", "'epochs' must be an integer"), ("epochs: ten\n", "'epochs'"),
                        ("lr: .nan\n", "'lr' must be a finite"), ("student: 5\n", "'student' must be a string"),
                        ("epoch: 3\n", "unknown option 'epoch' \\(did you mean 'epochs'\\?\\)")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            resolve(distill.DistillConfig, bad)


def test_method_booleans_as_words(cache):
    from kdcache.methods import parse_method_options

    assert parse_method_options("customkd", {"normalize": "false"})["normalize"] is False
    assert parse_method_options("customkd", {"normalize": "yes"})["normalize"] is True


# 5. tampered metadata, arrays, labels, status, deleted chunks ----------------------------------------

def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_a_changed_dtype_or_shape_in_an_array_zarr_json_is_refused(cache, tmp_path):
    _edit_json(cache / "features" / "zarr.json", lambda m: m.update(data_type="float32"))
    with pytest.raises(CacheError, match="array 'features' is float32"):
        CacheStore.open(cache)
    proc = run_cli("info", "--cache", str(cache), "--verify", check=False)
    assert proc.returncode == 2 and "features" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,edit", [
    ("teacher.feature_dim", lambda a: a["teacher"].update(feature_dim=65)),
    ("layout.feature_dim", lambda a: a["layout"].update(feature_dim="64")),
    ("head.kind", lambda a: a.pop("head")),
    ("layout", lambda a: a.pop("layout")),
])
def test_tampered_or_missing_metadata_is_one_error_naming_the_field(cache, field, edit):
    _edit_json(cache / "zarr.json", lambda m: edit(m["attributes"]))
    with pytest.raises(CacheError, match=field.replace(".", r"\.")):
        CacheStore.open(cache)


def test_rewritten_labels_are_found_refused_and_repaired(cache, reference, tmp_path):
    store = CacheStore.open(cache, mode="r+")
    labels = store.array("labels")[:]
    labels[:10] = (labels[:10] + 1) % 8
    store.array("labels")[:] = labels
    assert any("labels" in p for p in _problems(cache))
    with pytest.raises(CacheError, match="labels differ"):
        distill.run(_distill_cfg(cache, tmp_path / "run"))
    _repair(cache)
    assert_same_cache(reference, cache)


def test_a_rewritten_status_is_found_by_verify_and_refused_by_distill(cache, reference, tmp_path):
    store = CacheStore.open(cache, mode="r+")
    status = store.status()
    status[4 * S + 1] = 2  # a done row marked bad: it would silently drop out of training
    store.array("status")[:] = status
    assert any(p.startswith("shard 4:") for p in _problems(cache))
    with pytest.raises(CacheError, match=r"status: shard\(s\) 4 differ"):
        distill.run(_distill_cfg(cache, tmp_path / "run"))
    _repair(cache)
    assert_same_cache(reference, cache)


def test_features_changed_behind_the_checksums_stop_training_at_the_read(cache, reference, tmp_path):
    store = CacheStore.open(cache, mode="r+")
    feats = store.array("features")[7 * S:8 * S]
    feats[0, 0, :4] += 1  # a well-formed write: the codec reads it fine, only the digests can tell
    store.array("features")[7 * S:8 * S] = feats
    assert any(p.startswith("shard 7:") for p in _problems(cache))
    with pytest.raises(CacheError, match="shard 7 of features differs from the digest"):
        distill.run(_distill_cfg(cache, tmp_path / "run", scenario="supervised", labels_per_class=None))
    _repair(cache)
    assert_same_cache(reference, cache)


def test_deleted_chunks_are_refused_by_distill_without_verify_and_repaired(cache, reference, tmp_path):
    (cache / "features" / "c" / "6" / "0" / "0").unlink()
    with pytest.raises(CacheError, match=r"missing \(first: features of shard 6\)"):
        distill.run(_distill_cfg(cache, tmp_path / "run"))
    _repair(cache)
    assert_same_cache(reference, cache)


def test_a_missing_group_is_an_error_not_a_keyerror(cache):
    shutil.rmtree(cache / "logits")
    with pytest.raises(CacheError, match="array 'logits' is missing"):
        CacheStore.open(cache)
    proc = run_cli("info", "--cache", str(cache), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# 6. two runs on one run folder -----------------------------------------------------------------------

def test_a_second_distill_on_a_locked_run_folder_fails_fast_naming_the_first(cache, tmp_path):
    run = tmp_path / "run"
    lock = run_dir.lock_run_dir(run)  # this process holds the folder, as a running distill would
    try:
        proc = run_cli("distill", "--cache", str(cache), "--student", "test_efficientnet", "--image-size", "32",
                       "--method", "kd", "--epochs", "1", "--workers", "0", "--out", str(run), "--no-check-dataset",
                       "--no-progress", check=False)
        assert proc.returncode == 2 and f"in use by distill pid {os.getpid()}" in proc.stderr
        assert {p.name for p in run.iterdir()} <= run_dir.LOCK_FILES  # the second run wrote nothing
    finally:
        run_dir.unlock_run_dir(run, lock)
    assert not run.exists()  # nothing was started in it: no empty run folder is left


# 7. --resume on a replaced cache ---------------------------------------------------------------------

def test_resume_refuses_a_cache_that_was_replaced(cache, tmp_path):
    run = tmp_path / "run"
    distill.run(_distill_cfg(cache, run, epochs=1))
    shutil.rmtree(cache)
    extract.run(_extract_cfg(cache, view_seed=1))  # another cache at the same path
    with pytest.raises(CacheError, match="not the one run .* started from"):
        distill.run(_distill_cfg(cache, run, epochs=2, resume=True))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


# 8. a read-only cache --------------------------------------------------------------------------------

def test_a_read_only_cache_works_for_a_method_that_derives_data(cache, tmp_path, monkeypatch):
    from kdcache.cache.store import DerivedPlaces

    monkeypatch.setattr(DerivedPlaces, "writable", lambda self: False)  # as on a read-only mount (root ignores chmod)
    monkeypatch.setenv("KDCACHE_DERIVED_DIR", str(tmp_path / "derived"))
    before = read_all(cache)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    os.chmod(cache, 0o555)
    try:  # ssl with a probe head that saw every train label: the scenario's probe must be refit (derived data)
        distill.run(_distill_cfg(cache, tmp_path / "run", method="customkd"))
    finally:
        os.chmod(cache, 0o755)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == files
    after = read_all(cache)
    assert sorted(before) == sorted(after)
    assert list((tmp_path / "derived").iterdir())  # the derived heads went beside it


# 9. sizes, devices, and the command line -------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(image_size=1), "--image-size must be between 16"), (dict(image_size=0), "--image-size"),
    (dict(image_size=-5), "--image-size"), (dict(epochs=0), "--epochs must be >= 1"),
    (dict(lr=-1.0), "--lr"), (dict(labelled_ratio=1.5), "--labelled-ratio"), (dict(optimizer="adam"), "--optimizer"),
])
def test_out_of_range_distill_options_are_refused(cache, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        distill.run(_distill_cfg(cache, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw,match", [(dict(image_bound=0), "--image-bound"),
                                      (dict(teacher_input_size=1), "--teacher-input-size"),
                                      (dict(workers=-1), "--workers")])
def test_out_of_range_extract_options_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        extract.run(_extract_cfg(tmp_path / "c", **kw))
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(cache, tmp_path):
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        distill.run(_distill_cfg(cache, tmp_path / "run", device="cuda"))


def test_command_line_errors_are_one_line_and_debug_shows_the_traceback(cache, tmp_path):
    for args in (["--epochs", "ten"], ["--epochs", "1.7"], ["--image-size", "0"]):
        proc = run_cli("distill", "--cache", str(cache), "--out", str(tmp_path / "r"), *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = run_cli("--debug", "distill", "--cache", str(cache), "--image-size", "0", "--out", str(tmp_path / "r"),
                   check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "--image-size" in proc.stderr


def test_overwrite_through_a_symlinked_out_keeps_the_link(reference, tmp_path):
    real = tmp_path / "disk" / "cache"
    shutil.copytree(reference, real)
    link = tmp_path / "cache"
    link.symlink_to(real)
    extract.run(_extract_cfg(link, view_seed=1, overwrite=True))
    assert link.is_symlink() and CacheStore.open(link).attrs["views"]["seed"] == 1


def test_orphan_temporary_tars_are_removed_on_the_next_run(cache):
    orphan = cache / "images" / f".{shard_name(0)}.999999999.tmp"  # its writer (a dead pid) was killed
    orphan.write_bytes(b"half a tar")
    extract.run(_extract_cfg(cache))
    assert not orphan.exists()


def test_hints_quote_paths_with_spaces(tmp_path):
    with pytest.raises(CacheError, match="'.*my cache'"):
        CacheStore.open(tmp_path / "my cache")


def test_yaml_config_is_refused_with_the_file_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"batch_size": "many"}))
    with pytest.raises(ConfigError, match=f"--config {p}: option 'batch_size' must be an integer"):
        resolve(extract.ExtractConfig, p)


def test_default_run_folders_never_collide_and_resume_finds_the_run(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = distill.run(_distill_cfg(cache, None, epochs=1))
    second = distill.run(_distill_cfg(cache, None, epochs=1, seed=1))
    assert first != second and first.parent == second.parent == Path("runs")
    assert first.name.split("-")[2:4] == ["kd", "test_efficientnet"] and len(first.name.split("-")[-1]) == 8
    resumed = distill.run(_distill_cfg(cache, None, epochs=2, resume=True))  # the newest run of these settings
    assert resumed == first and len((first / "metrics.jsonl").read_text().splitlines()) == 2
    csv = (first / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,") and "eval/top1" in csv[0] and len(csv) == 3
    with pytest.raises(CacheError, match="has a checkpoint .*; continue it with the same command plus --resume --out runs"):
        distill.run(_distill_cfg(cache, str(first), epochs=1))
    with pytest.raises(CacheError, match="no run in runs/ has these settings"):
        distill.run(_distill_cfg(cache, None, epochs=1, seed=7, resume=True))


def test_scenario_options_that_would_be_ignored_are_refused(cache, tmp_path):
    for kw, match in [(dict(scenario="supervised", labels_per_class=None, source=("domain0",)),
                       "--source domain0 needs --scenario uda"),
                      (dict(scenario="supervised", labels_per_class=3), "--labels-per-class 3 needs --scenario ssl"),
                      (dict(labels_per_class=10_000), "class .* has only .* train rows")]:
        with pytest.raises(ValueError, match=match):
            distill.run(_distill_cfg(cache, tmp_path / "run", **kw))
        assert not (tmp_path / "run").exists()


# 10. junk files, one-class datasets, absurd options, interrupted extractions -------------------------

# each example builds a teacher or writes a file: fewer than the profile's default, more under make test-slow
EXAMPLES = 60 if os.environ.get("HYPOTHESIS_PROFILE") == "slow" else 15


def _folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    from conftest import write_image

    for c in range(classes):
        for i in range(per_class):
            write_image(root / f"c{c}" / f"{i}.png", 10 * c + i)
    return root


def test_a_file_over_the_size_limit_is_a_bad_row_and_is_never_read(tmp_path):
    import tracemalloc

    from kdcache.datasets import create_dataset
    from kdcache.images import MAX_FILE_BYTES
    from kdcache.pack import read_original

    data = _folder(tmp_path / "data")
    huge = data / "c0" / "huge.jpg"
    huge.touch()
    os.truncate(huge, 3 * 2**30)  # sparse: 3 GiB that cost no disk
    dataset = create_dataset("imagefolder", data)
    row = [s.key for s in dataset.samples].index("c0/huge.jpg")
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=f"{3 * 2**30:,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes"):
            read_original(dataset, row)
        assert tracemalloc.get_traced_memory()[1] < 2**20  # nothing of it was read
    finally:
        tracemalloc.stop()
    out = extract.run(_extract_cfg(tmp_path / "cache", dataset="imagefolder", data_root=str(data),
                                   dataset_options=()))
    store = CacheStore.open(out)
    row = list(store.text("keys")).index("c0/huge.jpg")  # its row in the cache's (shuffled) order
    assert store.status()[row] == 2 and (store.status() == 1).sum() == len(dataset) - 1
    assert store.text("reasons", row, row + 1)[0].startswith(f"file too large: {3 * 2**30:,} bytes")
    assert cacheinfo.verify(store) == []


@pytest.mark.hypothesis
@pytest.mark.parametrize("size_over_limit", [-1, 0, 1, 5000])
def test_a_file_is_read_only_up_to_the_limit(tmp_path, size_over_limit):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kdcache.datasets import Dataset, Sample
    from kdcache.pack import read_original

    limit = 4096

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.binary(min_size=0, max_size=64))
    def check(head):
        path = tmp_path / "f.jpg"
        path.write_bytes(head)
        os.truncate(path, limit + size_over_limit)
        ds = Dataset("x", str(tmp_path), ["a", "b"], ["d"], [Sample("f.jpg", 0, 0, 0, limit + size_over_limit)])
        if size_over_limit <= 0:
            assert read_original(ds, 0, limit) == path.read_bytes()
        else:
            with pytest.raises(BadImage, match=f"{limit + size_over_limit:,} bytes, over the limit of {limit:,}"):
                read_original(ds, 0, limit)

    check()


def test_a_file_that_grows_while_read_is_cut_at_the_limit(tmp_path):
    """A pipe reports size 0 and then streams on, like a file that grows after its size was checked: the read
    stops one byte past the limit."""
    import threading

    from kdcache.datasets import Dataset, Sample
    from kdcache.pack import read_original

    limit = 2**16
    fifo = tmp_path / "growing.jpg"
    os.mkfifo(fifo)
    written = []

    def writer():
        try:
            with open(fifo, "wb") as f:
                for _ in range(64):  # 4 MiB in all, far past the limit
                    f.write(b"\xff" * limit)
                    written.append(limit)
        except BrokenPipeError:  # the reader stopped, as it should
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    ds = Dataset("x", str(tmp_path), ["a", "b"], ["d"], [Sample("growing.jpg", 0, 0, 0, 0)])
    with pytest.raises(BadImage, match=f"more than {limit:,} bytes"):
        read_original(ds, 0, limit)
    thread.join(timeout=10)
    assert sum(written) < 64 * limit


def test_a_one_class_dataset_is_refused_before_anything_is_made(tmp_path):
    proc = run_cli("extract", "--dataset", "synthetic", "--dataset-opt", "classes=1", "--teacher", "test_vit",
                   "--random-init", "--no-progress", "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--dataset-opt classes=1" in proc.stderr and "at least 2" in proc.stderr
    data = _folder(tmp_path / "data", classes=1)
    with pytest.raises(ConfigError, match=f"--data-root {data}: .* has only 1 class \\('c0'\\).* --head none"):
        extract.run(_extract_cfg(tmp_path / "b", dataset="imagefolder", data_root=str(data), dataset_options=()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # asked for explicitly, the teacher's features alone: no logits, and a cache that verifies
    out = extract.run(_extract_cfg(tmp_path / "c", dataset="imagefolder", data_root=str(data), dataset_options=(),
                                   head="none"))
    store = CacheStore.open(out)
    assert not store.has("logits") and (store.status() == 1).all() and cacheinfo.verify(store) == []


def test_all_zero_shards_are_stored_and_older_caches_without_them_still_verify(cache, tmp_path):
    """Zarr stores no file for a chunk of fill values unless told to; kdcache tells it, so an absent file is
    always a lost one. A cache written before that (no file for an all-zero shard, e.g. the logits of a
    one-class probe) still verifies, opens for training and needs no repair: the shard's recorded digest is
    that of zeros. A lost file of a shard that was not all zeros is still named."""
    store = CacheStore.open(cache, mode="r+")
    store.write_arrays(3, {"logits": np.zeros((S, 2, 8), np.float16)})
    zero_file = cache / "logits" / "c" / "3" / "0" / "0"
    assert zero_file.is_file()  # stored, zeros and all
    for name in ("features", "logits", "views", "status", "labels", "domains", "splits", "image_digests"):
        arr = store.array(name)
        for k in range(N // S):
            key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
            assert (cache / name / key).is_file(), (name, k)
    zero_file.unlink()  # as a cache written before every chunk was stored has it
    store = CacheStore.open(cache)
    assert missing_files(store) == [] and cacheinfo.verify(store) == []
    inputs.open_cache(str(cache))  # trainable as is
    (cache / "logits" / "c" / "4" / "0" / "0").unlink()  # a shard that was not zeros
    problems = cacheinfo.verify(CacheStore.open(cache))
    assert any("logits of shard 4" in p and "--repair" in p for p in problems), problems
    assert not any("shard 3" in p for p in problems)


def test_caches_without_array_digests_tell_an_all_zero_shard_by_its_checksum(cache):
    """Checksums version 1 (no per-array digests): the shard checksum decides whether an absent file held zeros."""
    store = CacheStore.open(cache, mode="r+")
    del store.group["array_digests"]
    del store.group["image_digests"]
    attrs = dict(store.group.attrs, checksums=1)
    store.group.attrs.put(attrs)
    store = CacheStore.open(cache, mode="r+")
    status = store.status()
    for k in range(N // S):
        r = store.layout.rows(k)
        store.write_checksum(k, shard_checksum(store, store.read_shard(k), status[r.start:r.stop]))
    store.write_arrays(3, {"logits": np.zeros((S, 2, 8), np.float16)})
    (cache / "logits" / "c" / "3" / "0" / "0").unlink()
    (cache / "logits" / "c" / "5" / "0" / "0").unlink()
    assert missing_files(CacheStore.open(cache)) == [("logits", 5)]


@pytest.mark.hypothesis
def test_teacher_input_sizes_the_model_cannot_take_are_named_with_sizes_that_work(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kdcache.datasets import create_dataset
    from kdcache.teachers import TeacherError

    dataset = create_dataset("synthetic", None, n=8)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.integers(16, 200))
    def check(size):
        cfg = _extract_cfg(tmp_path / "c", teacher_input_size=size)
        if size % 16 == 0:
            assert build_teacher(cfg, dataset)[3]["features"] == 64
            return
        with pytest.raises(TeacherError) as err:
            build_teacher(cfg, dataset)
        msg = str(err.value)
        assert msg.startswith(f"--teacher-input-size {size}: teacher test_vit cannot take") and "\n" not in msg
        lo, hi = map(int, re.search(r"e\.g\. (\d+) or (\d+)", msg).groups())
        assert lo % 16 == hi % 16 == 0 and lo <= max(size, 16) < hi
        build_teacher(_extract_cfg(tmp_path / "c", teacher_input_size=lo), dataset)  # the hint works

    check()
    proc = run_cli("extract", "--dataset", "synthetic", "--teacher", "test_vit", "--random-init", "--no-progress",
                   "--teacher-input-size", "33", "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "--teacher-input-size 33" in proc.stderr and "multiple of its patch size 16, e.g. 32 or 48" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_an_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
    victim = tmp_path / "model.safetensors"
    victim.write_bytes(b"precious")
    for out, extra, said in [(victim, [], f"--out {victim} is a file"),
                             (victim, ["--overwrite"], f"--out {victim} is a file"),
                             (victim / "cache", [], f"--out {victim / 'cache'}: {victim} is a file, not a folder")]:
        proc = run_cli("extract", "--dataset", "synthetic", "--teacher", "test_vit", "--random-init", "--no-progress",
                       "--out", str(out), *extra, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert said in proc.stderr, proc.stderr
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("kw,match", [
    (dict(views=10**9), "--views must be between 1 .* and 1024, got 1000000000"),
    (dict(views=0), "--views must be between 1"),
    (dict(views=1024, shard_size=10**7), "--views 1024 with --shard-size 10000000 needs .* GiB"),
])
def test_absurd_views_are_refused_before_anything_is_made(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        extract.run(_extract_cfg(tmp_path / "c", **kw))
    assert list(tmp_path.iterdir()) == []


def test_verify_of_an_interrupted_extraction_says_run_it_again_not_repair(reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    for method, at in (("write_shard", 3), ("write_arrays", 4)):  # during the teacher pass, during the probe fit
        real, calls = getattr(CacheStore, method), []

        def interrupted(self, k, *args, real=real, calls=calls, at=at):
            calls.append(k)
            if len(calls) == at:
                raise KeyboardInterrupt
            return real(self, k, *args)

        monkeypatch.setattr(CacheStore, method, interrupted)
        with pytest.raises(KeyboardInterrupt):
            extract.run(_extract_cfg(out))
        monkeypatch.undo()
        problems = cacheinfo.verify(CacheStore.open(out))
        assert problems and all("run the same extract command again" in p for p in problems), problems
        assert not any("--repair" in p.replace("--repair is for damage", "") for p in problems), problems
        if method == "write_shard":
            assert problems[0].startswith(f"incomplete: {N // S - 2} of {N // S} shard(s) are not extracted")
    extract.run(_extract_cfg(out))
    assert cacheinfo.verify(CacheStore.open(out)) == []
    assert_same_cache(reference, out)


def test_an_extract_that_finds_the_head_being_fitted_waits_and_reads_it(reference, tmp_path):
    """Another process (a rank of a killed job that still runs) is fitting the probe head of a cache whose
    shards are all done: an extract on it waits for that fit under the head lock, then reads it, and returns
    only with the head fitted."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, cli_env

    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    CacheStore.open(out, mode="r+").update_attrs(head_fit={"fitted": False})
    code = ("import sys, time; sys.path.insert(0, %r); import filelock; from kdcache.cache.store import CacheStore; "
            "from kdcache.heads import fit_store_probe\n"
            "with filelock.FileLock(%r):\n"
            "    print('fitting', flush=True); time.sleep(3)\n"
            "    fit_store_probe(CacheStore.open(%r, mode='r+'))\n"
            "    print('fitted', flush=True)\n") % (str(ROOT), str(out / "images" / "head-fit.lock"), str(out))
    fitter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert fitter.stdout.readline().strip() == "fitting"
        t = time.monotonic()
        extract.run(_extract_cfg(out))
        waited = time.monotonic() - t
        assert fitter.stdout.readline().strip() == "fitted"  # the other process fitted it, this one waited
    finally:
        fitter.kill()
        fitter.wait()
    head = out / "heads" / "extract"
    mtimes = {p: p.stat().st_mtime_ns for p in head.rglob("*") if p.is_file()}
    assert waited >= 2 and CacheStore.open(out).meta.head_fitted
    extract.run(_extract_cfg(out))  # finds it fitted: fits nothing again
    assert {p: p.stat().st_mtime_ns for p in head.rglob("*") if p.is_file()} == mtimes
    assert cacheinfo.verify(CacheStore.open(out)) == []


# 10. training: a last batch of one, --batch-size 1, KDEP on few rows, resume with fewer epochs ---------------

def test_an_epoch_that_leaves_one_sample_trains_a_batchnorm_student(cache, tmp_path):
    """At 32 px the last BatchNorm layers of mobilenetv3_small_050 see 1x1 maps: a batch of one image cannot
    train. An epoch whose samples leave one for a last batch gives it to the batch before."""
    from kdcache.students import create_student

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        create_student("mobilenetv3_small_050", 8).train()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    store = CacheStore.open(cache)
    train = int((store.array("splits")[:] == 0).sum())
    batch = min(d for d in range(2, train) if (train - 1) % d == 0 and (train - 1) // d <= 8)  # train = k * batch + 1
    out = distill.run(_distill_cfg(cache, tmp_path / "run", student="mobilenetv3_small_050", scenario="supervised",
                                   labels_per_class=None, batch_size=batch))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["images"] == train and rec["steps"] == (train - 1) // batch and np.isfinite(rec["loss"])


def test_batch_size_one_is_refused_for_a_batchnorm_student_and_trains_one_without(cache, tmp_path):
    proc = run_cli("distill", "--cache", str(cache), "--student", "mobilenetv3_small_050", "--image-size", "32",
                   "--method", "kd", "--batch-size", "1", "--epochs", "1", "--workers", "0", "--out",
                   str(tmp_path / "bn"), "--no-check-dataset", "--no-progress", check=False)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and error.startswith("error: --batch-size 1: student mobilenetv3_small_050 has "
                                                     "BatchNorm layers") and "--batch-size 2" in error, proc.stderr
    assert not (tmp_path / "bn").exists()
    out = distill.run(_distill_cfg(cache, tmp_path / "vit", student="test_vit", batch_size=1, scenario="supervised",
                                   labels_per_class=None, eval_every=0))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["steps"] == rec["images"] > 0 and np.isfinite(rec["loss"])  # LayerNorm trains on single images


def test_kdep_trains_on_fewer_train_rows_than_feature_dims_and_a_stale_group_is_recomputed(tmp_path):
    from kdcache.cache.derived import derived_group, read_group, write_group

    small = extract.run(_extract_cfg(tmp_path / "small", dataset_options=(("n", 40),), views=1))
    store = CacheStore.open(small, mode="r+")
    d = store.layout.feature_dim
    train = int(((store.array("splits")[:] == 0) & (store.status() == 1)).sum())
    assert train < d
    # as a run of an earlier version left it: the statistics of `train` rows, shaped (train, d)
    path = f"derived/svd-k{d}"
    write_group(store, path, {"mean": np.zeros(d, np.float32), "components": np.ones((train, d), np.float32),
                              "singular_values": np.ones(train, np.float32)}, {"rows": train})
    cfg = _distill_cfg(small, tmp_path / "run", method="kdep", student="mobilenetv3_small_050", scenario="supervised",
                       labels_per_class=None)
    assert inputs.student_and_method(cfg, store)[1].k == d
    out = distill.run(cfg)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["kdep"]) and rec["images"] > 0
    comps = CacheStore.open(small).group[path]["components"][:]
    assert comps.shape == (d, d)
    rank = train - 1  # the centred train features
    assert np.allclose(comps[:rank] @ comps[:rank].T, np.eye(rank), atol=1e-4)
    assert not comps[train:].any()  # no direction beyond the train rows: a zero target there
    # computed, checked, then written: statistics of the wrong shape are never kept
    with pytest.raises(RuntimeError, match="wrong shape"):
        derived_group(store, "derived/other", lambda: ({"a": np.zeros(3)}, {}), {"a": (4,)})
    assert read_group(store, "derived/other") is None and "derived/other" not in store.group


def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(cache, tmp_path):
    run = tmp_path / "run"
    distill.run(_distill_cfg(cache, run, epochs=2))

    def files():  # what the run holds (the lock's owner note is rewritten by each process that takes the folder)
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in run_dir.LOCK_FILES}

    before = files()
    args = ["distill", "--cache", str(cache), "--student", "test_efficientnet", "--image-size", "32", "--method", "kd",
            "--scenario", "ssl", "--labels-per-class", "2", "--batch-size", "16", "--workers", "0", "--out", str(run),
            "--no-check-dataset", "--no-progress", "--resume"]
    proc = run_cli(*args, "--epochs", "1", check=False)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and error.startswith("error: --epochs 1: run "), proc.stderr
    assert "already trained 2 epochs" in error and "--epochs 2 or more" in error
    assert files() == before  # config.yaml included
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    run_cli(*args, "--epochs", "3")
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3


def test_a_run_resumed_with_other_workers_ends_where_an_uninterrupted_one_does(cache, tmp_path, monkeypatch):
    """--workers may change on --resume (machines differ): a run stopped after its first epoch and resumed with
    another worker count ends bit-identical to one that ran through without workers."""
    from safetensors.torch import load_file

    def cfg(out, workers, **kw):
        return _distill_cfg(cache, tmp_path / out, epochs=2, workers=workers, **kw)

    distill.run(cfg("ref", 0))
    save = run_dir.save_checkpoint

    def stop_after_the_first_epoch(run_dir, epoch, *args):
        path = save(run_dir, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt  # as a kill right after the checkpoint
        return path

    monkeypatch.setattr(run_dir, "save_checkpoint", stop_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg("run", 2))
    monkeypatch.undo()
    distill.run(cfg("run", 1, resume=True))
    records = {out: [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
               for out in ("ref", "run")}
    assert [r["epoch"] for r in records["run"]] == [0, 1]
    assert [r["loss"] for r in records["run"]] == [r["loss"] for r in records["ref"]]
    for name in ("student.safetensors", "method.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "run" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

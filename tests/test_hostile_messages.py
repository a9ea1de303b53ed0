"""Hostile and careless input, round three: options handed to the wrong place, data roots that loop, shell
globs that take more than run folders, pictures of unfinished or very wide caches, and messages that
state the wrong range, the wrong path or a raw value. Each case reproduced, then refused in one line
naming the flag, or handled as a user would expect."""
from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, tiny_extract_cfg

from kdcache.cache.store import CacheStore
from kdcache.datasets import DatasetError, create_dataset
from kdcache.pack import read_members, shard_name
from kdcache.stages import extract

N, S = 48, 8


def _extract_cfg(out, **kw) -> extract.ExtractConfig:
    return tiny_extract_cfg(out, N, S, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return extract.run(_extract_cfg(tmp_path_factory.mktemp("messages") / "ref"))


@pytest.fixture
def cache(reference, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def _packed(cache: Path) -> dict[str, bytes]:
    """key -> the packed image bytes of every done row."""
    store = CacheStore.open(cache)
    keys, out = store.text("keys"), {}
    for k in range(store.layout.num_shards):
        members, _ = read_members(store.images_dir / shard_name(k), store.layout.rows(k))
        out.update({str(keys[r]): data for r, (ext, data) in members.items() if ext != "bad"})
    return out


# --domain on a dataset whose own options name domains ---------------------------------------------------

def test_domain_selects_synthetic_domains_and_an_unknown_one_names_the_flag(reference, tmp_path):
    """--domain is the selection, never the synthetic layout's own `domains` (how many it generates)."""
    listed = create_dataset("synthetic", n=N, domains=3)
    only = create_dataset("synthetic", n=N, domains=3, only_domains=["domain2", "domain0"])
    assert only.domains == ["domain0", "domain2"] and len(only) == 32
    kept = [s for s in listed.samples if s.domain in (0, 2)]
    assert [s.key for s in only.samples] == [s.key for s in kept]
    assert [only.domains[s.domain] for s in only.samples] == [listed.domains[s.domain] for s in kept]
    by_key = {s.key: i for i, s in enumerate(listed.samples)}
    for i, s in enumerate(only.samples[:4]):  # read as the image it was before the selection
        assert only.read_bytes(i) == listed.read_bytes(by_key[s.key])
    with pytest.raises(DatasetError, match="^--domain: unknown domain\\(s\\) art; this dataset has: domain0, "
                                           "domain1, domain2$"):
        create_dataset("synthetic", n=N, domains=3, only_domains=["art"])

    out = extract.run(_extract_cfg(tmp_path / "d1", domains=("domain1",)))
    store = CacheStore.open(out)
    assert list(store.meta.domains) == ["domain1"] and store.layout.n == N // 2
    assert set(store.array("domains")[:].tolist()) == {0}
    whole = _packed(reference)
    assert all(whole[key] == data for key, data in _packed(out).items())  # the same images as the whole cache's
    from kdcache.train.inputs import check_dataset

    check_dataset(store)  # the recorded selection lists the same dataset again

    config = tmp_path / "c.yaml"
    config.write_text("domains: [domain7]\n")
    proc = run_cli("extract", "--config", config, "--dataset", "synthetic", "--teacher", "test_vit", "--random-init",
                   "--out", tmp_path / "d7", "--no-progress", check=False)
    assert proc.returncode == 2 and not (tmp_path / "d7").exists()
    assert proc.stderr.strip() == "error: --domain: unknown domain(s) domain7; this dataset has: domain0, domain1"


# a data root whose symbolic links loop -------------------------------------------------------------------

def test_symbolic_links_that_loop_are_skipped_with_a_warning_naming_them(tmp_path):
    from conftest import write_image

    root = tmp_path / "data"
    for c in range(2):
        for i in range(3):
            write_image(root / f"c{c}" / f"{i}.png", 10 * c + i)
    (root / "c0" / "loop").symlink_to("../c1/loop")  # c0/loop -> c1/loop -> c0/loop -> ...
    (root / "c1" / "loop").symlink_to("../c0/loop")
    (root / "c1" / "gone.png").symlink_to("loop.png")
    (root / "c1" / "loop.png").symlink_to("gone.png")
    with pytest.warns(UserWarning, match=f"^--data-root {root}: skipping 4 symbolic link\\(s\\) that loop .*: c0/loop, "
                                         "c1/gone.png, c1/loop \\(\\+1 more\\); remove them"):
        ds = create_dataset("imagefolder", root)
    assert [s.key for s in ds.samples] == [f"c{c}/{i}.png" for c in range(2) for i in range(3)]
    assert ds.classes == ["c0", "c1"]


# report runs/* in a fresh checkout -----------------------------------------------------------------------

def test_report_of_a_glob_skips_files_and_says_when_there_are_no_runs(tmp_path):
    """`report runs/*` (and `make report`) in a fresh checkout: the glob takes the shipped runs/README.md."""
    import json
    import subprocess

    from conftest import ROOT, cli_env

    from kdcache.report import read_report

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(ROOT / "runs" / "README.md", runs / "README.md")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "cli.py", tmp_path / "cli.py")
    # the Makefile's own report command, without its setup step (-o: take the virtual environment as made)
    make = subprocess.run(["make", "-s", "-o", ".venv/.installed", "report", f"PY={sys.executable}"], cwd=tmp_path,
                          capture_output=True, text=True, env=cli_env())
    assert make.returncode == 0, make.stderr
    assert make.stdout == "" and make.stderr.splitlines() == [
        "(skipped runs/README.md: a file, not a run folder)",
        "no runs to report: none of the paths given is a run folder (train one with `python cli.py distill`, then "
        "`python cli.py evaluate --run <run folder>`)"]
    with pytest.raises(ValueError, match=f"^{runs / 'README.md'} is a file, not a run folder$"):
        read_report(runs / "README.md")

    run = runs / "r1"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({
        "run": "r1", "student": "s", "method": "kd", "scenario": "ssl", "student_metrics": {"top1": 0.5},
        "teacher_metrics": {"top1": 0.75}, "params": 1000, "macs": 2000, "latency_cpu_b1": {"median_ms": 1.5}}))
    proc = run_cli("report", runs / "README.md", run)
    assert proc.returncode == 0 and "| s | kd | ssl | 0.5000 | 0.7500 |" in proc.stdout
    assert proc.stderr.strip() == f"(skipped {runs / 'README.md'}: a file, not a run folder)"
    proc = run_cli("report", run, tmp_path / "gone", check=False)
    assert proc.returncode == 2 and f"run folder {tmp_path / 'gone'} does not exist" in proc.stderr


# info --show-views: an unfinished cache, a cache of many views, a cache whose folder cannot be written ----

def test_the_views_picture_of_an_unfitted_probe_shows_no_placeholder_predictions(cache, tmp_path):
    from kdcache.viewpicture import _caption, cached_logits

    CacheStore.open(cache, mode="r+").update_attrs(head_fit={"fitted": False})  # as an interrupted extraction
    store = CacheStore.open(cache)
    assert cached_logits(store, [0, 1]) is None and _caption(store, None, 0, 1) == "view 1: head not fitted yet"
    proc = run_cli("info", "--cache", cache, "--show-views", "2", "--views-out", tmp_path / "v.png")
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "v.png") and lines[-2].startswith(
        "views picture: no teacher predictions: the probe head is not fitted yet")
    assert "placeholders; run the extract command again" in lines[-2]


def test_the_views_picture_of_many_views_draws_the_first_sixteen_and_says_so(tmp_path):
    from PIL import Image

    from kdcache.viewpicture import MAX_COLUMNS, picture_size

    many = extract.run(_extract_cfg(tmp_path / "many", views=20, head="none", teacher_input_size=32,
                                    dataset_options=(("n", 8),)))
    assert picture_size(2, 1024, mixed=False) == picture_size(2, MAX_COLUMNS, mixed=False) == (16 * 160, 2 * 160)
    assert picture_size(2, 1024, mixed=True) == picture_size(2, 8, mixed=True)
    proc = run_cli("info", "--cache", many, "--show-views", "2", "--views-out", tmp_path / "v.png")
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == ["views picture: the first 16 of the 20 views of each row (at most 16 pictures across)",
                          str(tmp_path / "v.png")]
    with Image.open(tmp_path / "v.png") as im:
        assert im.size == picture_size(2, 16, mixed=False)


def test_a_views_picture_that_cannot_be_written_beside_the_cache_names_views_out(cache, tmp_path, monkeypatch):
    from kdcache import viewpicture

    (tmp_path / "cache.views.png").mkdir()  # the default place is taken
    proc = run_cli("info", "--cache", cache, "--show-views", "1", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --show-views: cannot write the picture {tmp_path / 'cache.views.png'} (Is a directory); choose "
        "where it goes with --views-out PATH")
    monkeypatch.setattr(viewpicture, "writable", lambda folder: False)  # as on a read-only mount (root ignores chmod)
    with pytest.raises(ValueError, match="its folder is not writable\\); choose where it goes with --views-out"):
        viewpicture.picture_views(CacheStore.open(cache), 1, tmp_path / "ro" / "v.png")
    assert not (tmp_path / "ro" / "v.png").exists()
    monkeypatch.undo()
    run_cli("info", "--cache", cache, "--show-views", "1", "--views-out", tmp_path / "elsewhere.png")


# replay_cosine on an int8 cache --------------------------------------------------------------------------

def test_replay_cosine_of_an_int8_cache_reads_a_faithful_replay_as_faithful(tmp_path):
    """The probe's cached logits come from the int8-rounded features: the recomputed ones are rounded alike."""
    import json

    from kdcache.stages import distill

    cache = extract.run(_extract_cfg(tmp_path / "int8", feature_dtype="int8"))
    cfg = distill.DistillConfig(cache=str(cache), student="test_efficientnet", image_size=32, method="kd",
                                scenario="supervised", epochs=1, batch_size=16, workers=0, online_teacher=True,
                                out=str(tmp_path / "online"), progress=False)
    proof = json.loads((distill.run(cfg) / "summary.json").read_text())["replay_cosine"]
    assert proof["min"] >= 0.999 and proof["compared"] > 0, proof  # unrounded: 0.995 on this cache


# messages: the range stated, the hint of a KEY=VALUE flag, .nan in YAML ----------------------------------

@pytest.mark.parametrize("args,line", [
    (["--views", "-1"], "error: --views must be between 1 (view 0 is the clean view) and 1024, got -1"),
    (["--views", str(2**40)], f"error: --views must be between 1 (view 0 is the clean view) and 1024, got {2**40}"),
    (["--dataset-opt", "=3"], "error: --dataset-opt =3: the key is empty; write KEY=VALUE, e.g. --dataset-opt n=512"),
])
def test_extract_flag_errors_state_the_real_range_and_the_flag_syntax(tmp_path, args, line):
    proc = run_cli("extract", "--dataset", "synthetic", "--teacher", "test_vit", "--random-init", "--out",
                   tmp_path / "c", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == line and not (tmp_path / "c").exists()


def test_method_option_and_yaml_errors_say_what_is_wrong(tmp_path):
    from kdcache.stages import distill
    from kdcache.stages.config import ConfigError, resolve

    proc = run_cli("distill", "--cache", tmp_path / "none", "--student", "test_efficientnet", "--method-opt", "=1",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --method-opt =1: the key is empty; write KEY=VALUE, e.g. --method-opt temperature=2")
    for text, line in [("method_options: {temperature: .nan}\n", "option 'method_options': temperature must be a "
                                                                  "finite number, got nan"),
                       ("method_options: {'': 2}\n", "option 'method_options': the key '' is not a name (key: value, "
                                                     "e.g. {temperature: 2})"),
                       ("views: -3\n", None)]:
        p = tmp_path / "c.yaml"
        p.write_text(text)
        if line is None:
            with pytest.raises(ConfigError, match="option 'views' must be between 1 \\(view 0 is the clean view\\) "
                                                  "and 1024, got -3$"):
                resolve(extract.ExtractConfig, p)
            continue
        with pytest.raises(ConfigError) as e:
            resolve(distill.DistillConfig, p)
        assert str(e.value) == f"--config {p}: {line}"


# resume refusals: each difference named by its flag, in words, never a raw record ------------------------

def test_an_extract_on_a_cache_of_other_settings_names_each_flag_and_value_briefly(reference, tmp_path):
    from kdcache.cache.format import CacheError

    mixed = extract.run(_extract_cfg(tmp_path / "mixed", mix="both", dataset_options=(("n", 16),), head="none"))
    with pytest.raises(CacheError) as e:
        extract.run(_extract_cfg(mixed, dataset_options=(("n", 16),), head="none"))
    assert str(e.value).splitlines()[1:] == [
        "  views.mix (--mix, --mix-prob, --mix-alpha): the cache has both (prob 0.5, alpha 1.0), this command asks "
        "for none", "pass --overwrite to replace it, or choose another --out"]
    with pytest.raises(CacheError) as e:
        extract.run(_extract_cfg(reference, views=3, logits_topk=3, dataset_options=(("n", 40),)))
    lines = [line.strip() for line in str(e.value).splitlines()[1:-1]]
    assert lines[0].startswith("dataset.N (--dataset, --data-root, --dataset-opt, --domain): the cache has 48, this "
                               "command asks for 40")
    assert re.fullmatch(r"dataset.fingerprint \(.*\): the cache has [0-9a-f]{12}, this command asks for [0-9a-f]{12}",
                        lines[1])
    assert lines[2:] == ["views.V (--views): the cache has 2, this command asks for 3",
                         "head.logits_topk (--logits-topk): the cache has none, this command asks for 3"]


def test_a_resume_with_other_options_names_their_flags_and_values_in_words(cache, tmp_path):
    from kdcache.cache.format import CacheError
    from kdcache.stages import distill

    cfg = distill.DistillConfig(cache=str(cache), student="test_efficientnet", image_size=32, method="kd",
                                scenario="supervised", epochs=1, batch_size=16, workers=0, out=str(tmp_path / "run"),
                                progress=False, check_dataset=False)
    distill.run(cfg)
    changed = dataclasses.replace(cfg, epochs=2, resume=True, seed=3, method_options=(("temperature", 3),),
                                  check_dataset=True, teacher_weights=None)
    with pytest.raises(CacheError, match="^--resume with another config: check-dataset was off, now on; --method-opt "
                                         "was none, now temperature=3; --seed was 0, now 3; use the original flags or "
                                         "a new --out$"):
        distill.run(changed)


# fix-it commands name the cache where it is -----------------------------------------------------------------

def test_fix_it_commands_name_the_cache_they_were_opened_from_not_where_it_was_made(reference, tmp_path):
    import shlex

    from kdcache import cacheinfo
    from kdcache.cache.format import CacheError
    from kdcache.train.inputs import open_cache

    copy = tmp_path / "a copy"
    shutil.copytree(reference, copy)
    CacheStore.open(copy, mode="r+").mark_todo(2)
    with pytest.raises(CacheError) as e:
        open_cache(str(copy))
    command = str(e.value).split("resume with: ", 1)[1]
    assert str(reference) not in command and command.endswith(f"--out {shlex.quote(str(copy))} --no-progress")
    assert shlex.split(command)[:3] == ["python", "cli.py", "extract"]
    extract.run(_extract_cfg(copy))  # the same options: finishes it

    tar = copy / "images" / shard_name(0)
    tar.write_bytes(tar.read_bytes()[:1000])
    fix = cacheinfo.verify(CacheStore.open(copy))[-1]
    assert fix.startswith("fix: run the extract command with --repair (python cli.py extract --dataset synthetic ")
    assert f"--out {shlex.quote(str(copy))} --repair --no-progress)" in fix and str(reference) not in fix
    proc = run_cli(*shlex.split(fix.split("(", 1)[1].split(")", 1)[0])[2:], "--workers", "0")
    assert proc.returncode == 0 and cacheinfo.verify(CacheStore.open(copy)) == []


# evaluate on a run that is still training, or that stopped before its end ---------------------------------

def test_evaluate_of_a_run_in_training_or_stopped_says_so_and_how_to_finish_it(cache, tmp_path):
    import shlex
    import subprocess

    from conftest import ROOT, cli_env

    from kdcache.cache.format import CacheError
    from kdcache.stages import distill, evaluate

    run = tmp_path / "run"
    distill.run(distill.DistillConfig(cache=str(cache), student="test_efficientnet", image_size=32, method="kd",
                                      scenario="supervised", epochs=1, batch_size=16, workers=0, out=str(run),
                                      progress=False, check_dataset=False))
    (run / "summary.json").unlink()  # as a run stopped after its epoch, before its end
    with pytest.raises(CacheError) as e:
        evaluate.load_run(run)
    assert str(e.value) == (
        f"run {run} has no finished student yet: its training stopped after 1 epoch(s); finish it with `python cli.py "
        f"distill --config {shlex.quote(str(run / 'config.yaml'))} --resume --out {shlex.quote(str(run))}`, then "
        "evaluate it")

    code = ("import sys, time; sys.path.insert(0, %r); from pathlib import Path; "
            "from kdcache.train.run_dir import lock_run_dir\n"
            "lock = lock_run_dir(Path(%r)); print('training', flush=True); time.sleep(60)\n") % (str(ROOT), str(run))
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert trainer.stdout.readline().strip() == "training"
        proc = run_cli("evaluate", "--run", run, "--no-progress", check=False)
        assert proc.returncode == 2 and re.fullmatch(
            f"error: run {re.escape(str(run))} is still training \\(distill pid {trainer.pid} on .*\\); evaluate it "
            "when that distill has finished\n", proc.stderr), proc.stderr
    finally:
        trainer.kill()
        trainer.wait()
    command = str(e.value).split("`")[1]
    run_cli(*shlex.split(command)[2:], "--no-progress")  # the command given finishes the run
    assert (run / "summary.json").is_file()
    evaluate.load_run(run)


# torchrun: one cache line for the job, the count of every rank's images ------------------------------------

@pytest.mark.slow  # a torchrun job; CI runs it (make test-slow)
def test_a_torchrun_extract_prints_one_cache_line_and_counts_every_rank(tmp_path):
    import subprocess

    from conftest import ROOT, cli_env

    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "cli.py"),
           "extract", "--dataset", "synthetic", "--dataset-opt", f"n={N}", "--teacher", "test_vit", "--random-init",
           "--views", "2", "--shard-size", str(S), "--workers", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"cache: {out}  (inspect: python cli.py info --cache {out})"]
    counts = [line for line in proc.stderr.splitlines() if line.startswith("extracted ")]
    assert len(counts) == 1 and re.fullmatch(f"extracted {N} images x 2 views in {N // S} shard\\(s\\) at [0-9.]+ "
                                             "img/s \\(2 ranks\\)", counts[0]), counts


# an error raised in a DataLoader worker -------------------------------------------------------------------------

def test_a_damaged_shard_read_in_a_loader_worker_is_one_line_naming_the_shard(cache, tmp_path):
    """torch raises a worker's error again with the worker's whole traceback as its message; the user sees the
    error itself, as without workers."""
    f = cache / "features" / "c" / "1" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    lines = {}
    for workers in ("0", "1"):
        proc = run_cli("distill", "--cache", cache, "--student", "test_efficientnet", "--image-size", "32", "--method",
                       "kd", "--scenario", "supervised", "--epochs", "1", "--batch-size", "16", "--workers", workers,
                       "--out", tmp_path / f"run-{workers}", "--no-check-dataset", "--no-progress", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines[workers] = proc.stderr.splitlines()[-1]
    assert lines["1"] == lines["0"] == (f"error: cache {cache}: shard 1 of features differs from the digest recorded "
                                        "when it was written; check with `info --verify`, fix with `extract --repair`")

"""Stage one end to end: the store format, resume after SIGKILL, replay, ranks, cooperation."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
import zarr
from conftest import ROOT, TINY, assert_same_cache, cli_env, read_all, run_cli

from kdcache.cacheinfo import verify
from kdcache.datasets import create_dataset, row_permutation
from kdcache.extraction import ShardClaims
from kdcache.train.loader import CacheStream, StreamConfig
from kdcache.pack import read_shard, shard_name
from kdcache.replay import replay_shard, stored_views
from kdcache.cache.store import CacheStore, dequantize_int8, quantize_int8
from kdcache.teachers import create_teacher

N, S, V, G = 160, 8, 2, 2
ARGS = TINY + ["--dataset-opt", f"n={N}", "--views", str(V), "--shard-size", str(S), "--tokens", str(G),
               "--batch-size", "6"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted extraction (two DataLoader workers) that the other runs must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli("extract", *ARGS, "--workers", "2", "--out", str(out))
    return out


def test_store_opens_with_plain_zarr_and_has_documented_arrays(reference):
    g = zarr.open_group(str(reference), mode="r")
    arrays = dict(g.arrays())
    expected = {"features": ((N, V, 64), "float16"), "logits": ((N, V, 8), "float16"),
                "tokens": ((N, V, G * G, 64), "float16"), "views": ((N, V, 10), "float32"),
                "labels": ((N,), "int32"), "domains": ((N,), "int16"), "splits": ((N,), "int8"),
                "status": ((N,), "uint8")}
    for name, (shape, dtype) in expected.items():
        assert arrays[name].shape == shape and str(arrays[name].dtype) == dtype, name
        if name != "status":
            assert arrays[name].shards[0] == S  # one shard of samples = one file
    # rows hold the dataset's samples in the seeded order the cache records (row r: sample order[r])
    listed = create_dataset("synthetic", n=N)
    samples = [listed.samples[i] for i in row_permutation(N, 0)]
    key = bytes(arrays["keys"][3]).rstrip(b"\0").decode()  # fixed-width UTF-8, zero-padded
    assert arrays["keys"].shape == (N, g.attrs["key_bytes"]) and key == samples[3].key
    assert (arrays["status"][:] == 1).all()
    assert list(arrays["labels"][:]) == [s.label for s in samples]
    assert g.attrs["rows"] == {"order": "shuffled", "seed": 0}
    assert g.attrs["dataset"]["fingerprint"] == listed.fingerprint()
    a = dict(g.attrs)
    assert a["format"] == "kdcache" and a["format_version"] == 2
    assert a["teacher"]["name"] == "test_vit" and a["teacher"]["preprocess"]["input_size"] == 160
    assert a["teacher"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert a["dataset"]["N"] == N and len(a["dataset"]["fingerprint"]) == 64
    assert a["views"]["V"] == V and a["views"]["policy"] == "default"
    assert a["head"]["kind"] == "probe" and a["head_fit"]["fitted"] and a["head_fit"]["samples"] > 0
    assert a["pack"]["shard_size"] == S and a["tokens"]["grid"] == G
    assert {"pipeline_version", "created", "command"} <= set(a)
    # the resolved options sit beside the cache, not inside the Zarr root
    assert yaml.safe_load((reference.parent / "cache.extract.yaml").read_text())["views"] == V
    assert not [p.name for p in reference.iterdir() if p.is_file() and p.name != "zarr.json"]
    files = os.listdir(reference / "features" / "c")
    assert len(files) == N // S  # one file per shard
    # nothing in the store is a pickle
    for p in Path(reference).rglob("*"):
        if p.is_file() and p.suffix != ".tar":
            assert not p.read_bytes().startswith(b"\x80"), p
    # the probe head is stored as derived data and produces the cached logits
    w, b = g["heads/extract/weight"][:], g["heads/extract/bias"][:]
    f = arrays["features"][:].astype(np.float32)
    assert np.allclose(f @ w.T + b, arrays["logits"][:].astype(np.float32), atol=0.05, rtol=1e-2)


def _wait_for_shards(proc: subprocess.Popen, out: Path, shards: int, timeout: float = 180) -> None:
    """Until `shards` shards of the cache being written at `out` are done (or the process ended)."""
    sums = out / "shard_checksums" / "c"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if sums.is_dir() and len(os.listdir(sums)) >= shards:
            return
        time.sleep(0.005)


@pytest.mark.slow  # several processes; CI runs it (make test-slow)
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    out = tmp_path / "cache"
    args = [sys.executable, str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0", "--out", str(out)]
    proc = subprocess.Popen(args, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_shards(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = zarr.open_group(str(out), mode="r")["status"][:]
    assert 0 < (status == 1).sum() < N, "the kill must land part-way"
    run_cli("extract", *ARGS, "--workers", "1", "--out", str(out))
    assert_same_cache(reference, out)


def test_replayed_view_reproduces_cached_feature(reference):
    store = CacheStore.open(reference)
    teacher = create_teacher("test_vit", random_init=True)
    pre = teacher.preprocess
    feats, views = store.array("features"), store.array("views")
    batch, rows = [], []
    for k in (0, 7, 19):
        packed = {row: data for row, _, data in read_shard(store.images_dir / shard_name(k))}
        draws = [(row, v) for row in packed for v in range(V)]
        for got in replay_shard(packed, draws, stored_views(views), [(pre.input_size, pre.interpolation)]):
            batch.append(got.images[0])
            rows.append((got.row, got.view))
    out = teacher(torch.stack(batch))["features"]
    cached = torch.tensor(np.stack([feats[r, v] for r, v in rows]).astype(np.float32))
    cos = torch.nn.functional.cosine_similarity(out, cached, dim=1)
    assert cos.min() >= 0.999, cos.min()


def test_two_ranks_under_torchrun_match_one(reference, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_cache(reference, out)


@pytest.mark.slow
def test_world_size_may_change_between_starts(reference, tmp_path):
    """A 2-rank torchrun job killed part-way (agent and ranks) is finished by a 3-rank job: the new ranks
    split the shards still to do, and the cache equals one process's."""
    out = tmp_path / "cache"

    def torchrun(ranks: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0", "--out", str(out)]

    agent = subprocess.Popen(torchrun(2), env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_shards(agent, out, 3)
    os.killpg(agent.pid, signal.SIGKILL)  # the whole job: agent and both ranks
    agent.wait()
    done = int((zarr.open_group(str(out), mode="r")["status"][:] == 1).sum())
    assert 0 < done < N, "the kill must land part-way"
    proc = subprocess.run(torchrun(3), env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_cache(reference, out)


@pytest.mark.slow  # several processes; CI runs it (make test-slow)
def test_elastic_torchrun_restarts_after_a_rank_is_killed_and_finishes_the_same_cache(reference, tmp_path):
    """torchrun elastic (c10d rendezvous, --max-restarts 1), 2 CPU ranks: one rank is killed part-way; the
    agent restarts the group, the ranks split the shards still to do, and the cache equals one process's."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:1", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "--max-restarts", "1",
           str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0", "--out", str(out)]
    agent = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_shards(agent, out, 3)
    ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[0]), signal.SIGKILL)
    killed_at = int((zarr.open_group(str(out), mode="r")["status"][:] == 1).sum())
    err = agent.communicate(timeout=300)[1]
    assert agent.returncode == 0, err[-3000:]
    assert killed_at < N, "the kill must land part-way"
    assert "exitcode: -9" in err, err[-2000:]  # the agent saw the killed rank, restarted the group, and it finished
    assert_same_cache(reference, out)


@pytest.mark.slow  # several processes; CI runs it (make test-slow)
def test_second_extract_on_same_cache_cooperates(reference, tmp_path):
    out = tmp_path / "cache"
    args = [sys.executable, str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0", "--out", str(out)]
    small = [f"n={N // 20}" if a == f"n={N}" else a for a in ARGS]  # a key given twice is refused
    assert small != ARGS
    run_cli("extract", *small, "--workers", "0", "--out", str(out), "--overwrite")
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--overwrite")  # recreate, full size
    # start two at once on a fresh cache: each takes the shards the other has not claimed
    fresh = tmp_path / "fresh"
    a = subprocess.Popen([*args[:-1], str(fresh)], env=cli_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    b = subprocess.Popen([*args[:-1], str(fresh)], env=cli_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    errs = [p.communicate(timeout=300)[1] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, errs
    assert sum(_shards_done(e) for e in errs) == N // S  # none twice
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(fresh))  # finalises if needed
    assert_same_cache(reference, fresh)
    assert_same_cache(reference, out)


def _shards_done(stderr: str) -> int:
    m = re.search(r"in (\d+) shard\(s\)", stderr)
    return int(m.group(1)) if m else 0


@pytest.mark.slow  # several processes; CI runs it (make test-slow)
def test_a_process_started_by_hand_waits_for_the_shards_another_holds(reference, tmp_path):
    """While another process holds half the shards, an extract does the other half, then waits for the held
    ones instead of returning with the cache unfinished (a rank of a killed job may still be writing them);
    when the holder dies without finishing them, it computes them. It returns only with the cache complete and
    its head fitted, equal to one uninterrupted extraction."""
    out = tmp_path / "cache"
    parts = N // S + 1  # a part that owns no shard: creates the store, extracts nothing
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--part", f"{parts - 1}/{parts}")
    assert not CacheStore.open(out).shard_done().any()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from kdcache.extraction import ShardClaims; "
        "c = ShardClaims(%r); [c.try_claim(k) for k in range(0, %d, 2)]; print('held', flush=True); "
        "time.sleep(600)") % (str(ROOT), str(out / "images"), N // S)], stdout=subprocess.PIPE, text=True,
        env=cli_env())
    extract_proc = None
    try:
        assert holder.stdout.readline().strip() == "held"
        extract_proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", *ARGS, "--workers", "0",
                                         "--out", str(out)], env=cli_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not CacheStore.open(out).shard_done()[1::2].all():
            assert extract_proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
        assert extract_proc.poll() is None, "returned while another process held shards"
        assert not CacheStore.open(out).shard_done()[0::2].any()
    except BaseException:
        if extract_proc is not None:
            extract_proc.kill()
        raise
    finally:
        holder.kill()
        holder.wait()
    err = extract_proc.communicate(timeout=300)[1]
    assert extract_proc.returncode == 0, err[-3000:]
    assert "being written by another process" in err and _shards_done(err) == N // S
    assert CacheStore.open(out).meta.head_fitted
    assert_same_cache(reference, out)


@pytest.mark.slow
def test_job_array_parts_fill_the_cache_together(reference, tmp_path):
    """--part i/N (or auto/N from the scheduler's index) takes shards k % N == i; the parts together give
    the cache of one process, and the last part to finish fits the head."""
    out = tmp_path / "cache"
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--part", "1/3")
    done = CacheStore.open(out).shard_done()
    assert done[1::3].all() and not done[0::3].any() and not done[2::3].any()
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--part", "auto/3", env_extra={
        "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5"})  # task 5 of an array 5-7: part 0
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--part", "auto/3", env_extra={
        "JOB_COMPLETION_INDEX": "2"})
    assert_same_cache(reference, out)


@pytest.mark.parametrize("text, env, expect", [
    (None, {}, (0, 1)), ("2/4", {}, (2, 4)), ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"},
                                              (3, 4)),
    ("auto/8", {"JOB_COMPLETION_INDEX": "7"}, (7, 8)), ("4/4", {}, "0 <= i < N"), ("x", {}, "expected i/N"),
    ("auto", {"JOB_COMPLETION_INDEX": "1"}, "give it as --part auto/N"), ("auto/2", {}, "no job-array index")])
def test_part_is_parsed_or_refused_by_name(text, env, expect, monkeypatch):
    from kdcache.stages.extract import parse_part

    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if isinstance(expect, tuple):
        assert parse_part(text) == expect
    else:
        with pytest.raises(ValueError, match=re.escape(expect)):
            parse_part(text)


@pytest.mark.slow  # several processes; CI runs it (make test-slow)
def test_claims_are_exclusive_between_processes(tmp_path):
    mine = ShardClaims(tmp_path)
    assert mine.try_claim(3)
    code = ("import sys; sys.path.insert(0, %r); from kdcache.extraction import ShardClaims; "
            "c = ShardClaims(%r); print(c.try_claim(3), c.try_claim(4))" % (str(ROOT), str(tmp_path)))
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert other.stdout.split() == ["False", "True"]
    mine.release(3)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert other.stdout.split() == ["True", "True"]


def test_other_teacher_at_out_is_refused_unless_overwrite(reference, tmp_path):
    out = tmp_path / "cache"
    small = [a if a != f"n={N}" else "n=16" for a in ARGS]
    run_cli("extract", *small, "--workers", "0", "--out", str(out))
    before = read_all(out)
    other = [a if a != "test_vit" else "test_efficientnet" for a in small]
    proc = run_cli("extract", *other, "--workers", "0", "--out", str(out), check=False)
    assert proc.returncode == 2
    assert "another teacher" in proc.stderr and "teacher.name" in proc.stderr and "--overwrite" in proc.stderr
    after = read_all(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing lost
    run_cli("extract", *other, "--workers", "0", "--out", str(out), "--overwrite")
    assert zarr.open_group(str(out), mode="r").attrs["teacher"]["name"] == "test_efficientnet"


def test_info_reports_and_verify_finds_a_damaged_shard(reference, tmp_path):
    proc = run_cli("info", "--cache", str(reference), "--verify", "--json")
    s = json.loads(proc.stdout)
    assert s["complete"] and s["rows"] == {"done": N, "bad": 0, "todo": 0} and s["verify"] == []
    assert s["shards"] == {"total": N // S, "done": N // S, "shard_size": S}
    assert 0 < s["bytes_per_view"]["features"] < 2 * 64
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    shard = copy / "features" / "c" / "5" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("info", "--cache", str(copy), "--verify", check=False)
    assert proc.returncode == 1 and "shard 5" in proc.stdout


def test_quantize_int8_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    x[0, 0] = 0  # an all-zero vector keeps scale 1 and decodes to zeros
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.shape == (5, 3) and scale.dtype == np.float32
    back = dequantize_int8(q, scale)
    assert np.abs(back - x).max() <= scale.max() / 2 + 1e-6
    assert not back[0, 0].any()
    assert np.abs(q).max() == 127


def test_int8_cache_stores_a_quarter_of_the_bytes_less_and_decodes_close_to_float16(reference, tmp_path):
    out = tmp_path / "int8"
    run_cli("extract", *ARGS, "--workers", "0", "--feature-dtype", "int8", "--out", str(out))
    q, ref = CacheStore.open(out), CacheStore.open(reference)
    assert q.array("features").dtype == np.int8 and q.array("tokens").dtype == np.int8
    assert q.array("feature_scale").shape == (N, V) and q.array("token_scale").shape == (N, V, G * G)
    assert q.attrs["storage"] == {"feature_dtype": "int8"}
    for name in ("features", "tokens"):
        a = ref.read(name, 0, N).astype(np.float32).reshape(N * V, -1)
        b = q.read(name, 0, N).reshape(N * V, -1)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999, (name, cos.min())
    assert np.array_equal(q.array("views")[:], ref.array("views")[:])
    assert verify(q) == []
    stream = CacheStream(StreamConfig(str(out), 16, tokens=True), [0, 1], np.ones(N, np.int32),
                         q.array("labels")[:], epoch=0)
    decoded = q.read("features", 0, 2 * S)
    for s in stream:  # stage two sees the dequantised rows
        assert torch.equal(s["feature"], torch.from_numpy(decoded[s["row"], s["view"]]))
    info = json.loads(run_cli("info", "--cache", str(out), "--json").stdout)
    ref_info = json.loads(run_cli("info", "--cache", str(reference), "--json").stdout)
    assert info["bytes_per_view"]["features"] < 0.75 * ref_info["bytes_per_view"]["features"]
    assert info["storage"] == {"feature_dtype": "int8"} and ref_info["storage"] == {"feature_dtype": "float16"}
    # a cache keeps the dtype it was made with: resuming with another is refused
    r = run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), check=False)
    assert r.returncode == 2 and "storage.feature_dtype" in r.stderr


def test_cache_opens_as_one_xarray_dataset(reference):
    import xarray as xr

    ds = xr.open_zarr(str(reference), consolidated=False)
    store = CacheStore.open(reference)
    assert ds["features"].dims == ("row", "view", "feature") and ds.sizes["row"] == store.layout.n
    assert np.array_equal(ds["features"].isel(view=0).values, store.array("features")[:, 0])
    keys = [bytes(k).rstrip(b"\0").decode() for k in ds["keys"].values[:2]]  # UTF-8 bytes, zero-padded
    assert ds["keys"].dims == ("row", "key_byte") and keys == list(store.text("keys", 0, 2))
    assert ds.attrs["format"] == "kdcache"


def test_tensorstore_reads_every_array(reference):
    """Every array of the cache opens with tensorstore's zarr3 driver, no kdcache code involved: the text
    arrays (keys, reasons, shard checksums) are fixed-width UTF-8 bytes, not Zarr strings it cannot read."""
    import tensorstore as ts

    store = CacheStore.open(reference)

    def read(name):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(reference / name)}}
        return ts.open(spec, read=True).result().read().result()

    names = sorted(n for n, _ in zarr.open_group(str(reference), mode="r").arrays())
    assert {"features", "labels", "keys", "reasons", "shard_checksums"} <= set(names)
    for name in names:
        assert np.array_equal(read(name), store.array(name)[:]), name

    def text(values):
        return [bytes(v).rstrip(b"\0").decode() for v in values]

    assert text(read("keys")) == list(store.text("keys")) and text(read("keys"))[3] == \
        create_dataset("synthetic", n=N).samples[row_permutation(N, 0)[3]].key
    assert text(read("shard_checksums")) == list(store.checksums()) and all(len(c) == 64 for c in store.checksums())
    assert set(text(read("reasons"))) == {""}  # no bad rows in the reference


def test_packed_shards_follow_the_webdataset_layout(reference):
    """Each shard is a plain ustar tar of `<row:09d>.<ext>` members in row order (webdataset's sample
    layout: key, dot, one extension), with fixed metadata, so webdataset and `tar` read it as is."""
    import tarfile

    store = CacheStore.open(reference)
    lay = store.layout
    for k in (0, lay.num_shards - 1):
        with tarfile.open(store.images_dir / shard_name(k)) as tar:
            members = tar.getmembers()
        rows = lay.rows(k)
        assert [m.name.split(".")[0] for m in members] == [f"{r:09d}" for r in rows]
        assert all(m.name.count(".") == 1 and m.name.split(".")[1] in ("png", "jpg", "bad") for m in members)
        assert all(m.isfile() and m.mtime == 0 and m.mode == 0o644 for m in members)


def test_extraction_progress_moves_every_batch_and_ends_at_every_view(tmp_path, monkeypatch):
    """The bar counts view-images and moves on every teacher batch, not once per shard."""
    from kdcache import extraction
    from kdcache.stages import extract as stage

    updates, totals = [], []

    class Bar:
        def __init__(self, total=None, **kw):
            totals.append(total)

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(extraction, "tqdm", Bar)
    n, s, v, batch = 24, 12, 2, 6
    stage.run(stage.ExtractConfig(dataset="synthetic", dataset_options=(("n", n),), teacher="test_vit",
                                  random_init=True, views=v, shard_size=s, batch_size=batch, workers=0,
                                  out=str(tmp_path / "cache"), progress=True))
    assert totals == [n * v] and sum(updates) == n * v
    assert len([u for u in updates if u]) >= n * v // batch  # one update per batch of view-images


def _as_format_1(path: Path) -> None:
    """Rewrite a cache's text arrays the way format 1 stored them (Zarr strings), as an older kdcache left it."""
    from kdcache.cache.store import _compressor, _inner_chunk, decode_text

    g = zarr.open_group(str(path), mode="r+")
    lay = dict(g.attrs)["layout"]
    values = {n: decode_text(g[n][:]) for n in ("keys", "reasons", "shard_checksums")}
    for name in values:
        del g[name]
    for name in ("keys", "reasons"):
        g.create_array(name, shape=(lay["n"],), chunks=(_inner_chunk(lay["shard_size"]),), shards=(lay["shard_size"],),
                       dtype=str, compressors=_compressor("zstd"), fill_value="", dimension_names=("row",))
        g[name][:] = values[name]
    g.create_array("shard_checksums", shape=(len(values["shard_checksums"]),), chunks=(1,), dtype=str, fill_value="",
                   dimension_names=("shard",))
    g["shard_checksums"][:] = values["shard_checksums"]
    attrs = dict(g.attrs)
    attrs.pop("key_bytes")
    g.attrs.put(dict(attrs, format_version=1))


def test_format_1_caches_still_open_verify_and_resume(reference, tmp_path):
    """A cache written before the text arrays became bytes reads, verifies, fingerprints and resumes as before."""
    old = tmp_path / "old"
    import shutil

    shutil.copytree(reference, old)
    _as_format_1(old)
    new, store = CacheStore.open(reference), CacheStore.open(old, mode="r+")
    assert store.attrs["format_version"] == 1 and store.array("keys").dtype != np.uint8
    assert list(store.text("keys")) == list(new.text("keys")) and list(store.checksums()) == list(new.checksums())
    assert store.fingerprint() == new.fingerprint()
    assert verify(store) == []
    store.mark_todo(1)  # a shard sent back to work is rewritten in the old format
    r = run_cli("extract", *ARGS, "--workers", "0", "--out", str(old), check=False)
    assert r.returncode == 0, r.stderr
    again = CacheStore.open(old)
    assert again.attrs["format_version"] == 1 and verify(again) == []
    assert list(again.checksums()) == list(new.checksums())
    assert np.array_equal(again.array("features")[:], new.array("features")[:])

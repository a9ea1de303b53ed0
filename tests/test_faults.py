"""Faults and bad input lose nothing. The random-kill trials are the opt-in fault suite
(`make test-faults`, marker `faults`); the rest run with `make test`. Each prints its figures."""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, assert_same_cache, cli_env, read_all, run_cli
from safetensors.torch import load_file

from kdcache.cacheinfo import verify
from kdcache.cache.format import CacheError
from kdcache.cache.store import CacheStore
from kdcache.stages import extract

N, S = 96, 8
ARGS = TINY + ["--dataset-opt", f"n={N}", "--views", "2", "--shard-size", str(S), "--batch-size", "6"]
TRIALS = int(os.environ.get("KDCACHE_FAULT_TRIALS", "20"))


def figures(name: str, **values) -> None:
    print(f"\n[fault suite] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "ref"
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out))
    return out


def _timeline(args, ranks: int, marker: Path) -> tuple[float, float]:
    """(seconds until `marker` appears, total seconds) of one uninterrupted run: kills are drawn in between,
    where the work happens, rather than during interpreter start-up."""
    t = time.perf_counter()
    proc, seen = _launch(args, ranks), None
    while proc.poll() is None:
        if seen is None and marker.exists():
            seen = time.perf_counter() - t
        time.sleep(0.005)
    assert proc.returncode == 0
    total = time.perf_counter() - t
    return (seen if seen is not None else 0.0), total


def _kill_between(proc, marker: Path, window: float, rng: random.Random) -> bool:
    """Wait for `marker`, then SIGKILL at a random point of the next `window` seconds; True if it ran."""
    while proc.poll() is None and not marker.exists():
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 1.0) * window)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    return False


def _survivors(out: Path) -> list[int]:
    """Processes still running with `out` on their command line. torchrun starts each rank in a session of its
    own, so a SIGKILL of the launcher's process group leaves its ranks running: they finish their shards and
    may fit the head while the resume runs (it must wait for them, never race them)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in argv and int(d.name) != os.getpid():
            pids.append(int(d.name))
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent is whatever reaps it, which may be slow to)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: list[int], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} still run"
        time.sleep(0.05)


def _launch(args, ranks: int):
    if ranks == 1:
        cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(ROOT / "cli.py"), *args]
    # a new session, so the kill reaches every rank the launcher started
    return subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.mark.faults
@pytest.mark.parametrize("ranks", [1, 2])
def test_extract_survives_sigkill_at_random_points(reference, tmp_path, ranks):
    ref = read_all(reference)
    rng = random.Random(ranks)
    mid_run = lost = outlived = repair_advised = 0
    start, total = _timeline(["extract", *ARGS, "--workers", "0", "--out", str(tmp_path / "timing")], ranks,
                             tmp_path / "timing" / "zarr.json")
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}"
        args = ["extract", *ARGS, "--workers", "0", "--out", str(out)]
        _kill_between(_launch(args, ranks), out / "zarr.json", total - start, rng)
        survivors = _survivors(out)
        outlived += int(bool(survivors))
        try:
            store = CacheStore.open(out)
            mid_run += int(0 < (store.status() == 1).sum() < N)
            # a kill damages nothing: what verify advises is to run the extraction again, never --repair
            advice = [p for p in verify(store) if "--repair" in p.replace("--repair is for damage", "")]
            repair_advised += int(bool(advice))
            assert not advice, advice
        except CacheError:  # killed before or while the store was created
            pass
        run_cli(*args)  # resume (one rank); it returns only once the cache is complete
        got = read_all(out)
        lost += int((got["status"] != 1).sum()) + sum(int(not np.array_equal(ref[k], got[k])) for k in ref)
        assert_same_cache(reference, out)
        _wait_gone(survivors)  # before the folder goes: ranks of the killed job may still be finishing
        shutil.rmtree(out)
    figures(f"extract SIGKILL, {ranks} rank(s)", trials=TRIALS, killed_mid_run=mid_run, survived=TRIALS,
            ranks_outlived_the_kill=outlived, repair_advised=repair_advised, rows_or_arrays_lost=lost)
    assert lost == 0


@pytest.mark.faults
def test_distill_survives_sigkill_at_random_points(reference, tmp_path):
    base = ["distill", "--cache", str(reference), "--student", "test_efficientnet", "--image-size", "32",
            "--scenario", "ssl", "--labels-per-class", "2", "--epochs", "3", "--batch-size", "16", "--workers", "0",
            "--method", "kd", "--no-progress"]
    start, total = _timeline([*base, "--out", str(tmp_path / "ref")], 1, tmp_path / "ref" / "config.yaml")
    ref = load_file(str(tmp_path / "ref" / "student.safetensors"))
    rng = random.Random(7)
    trials = max(1, TRIALS // 2)
    mid_run = 0
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        mid_run += _kill_between(_launch([*base, "--out", str(out)], 1), out / "config.yaml", total - start, rng)
        ckpts = out / "checkpoints"
        for d in ckpts.glob("epoch-*") if ckpts.exists() else []:  # every visible checkpoint is whole
            load_file(str(d / "student.safetensors"))
            torch.load(d / "state.pt", weights_only=True)
        run_cli(*base, "--out", str(out), "--resume")
        epochs = [int(re.search(r'"epoch": (\d+)', x).group(1)) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [0, 1, 2]
        got = load_file(str(out / "student.safetensors"))
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        shutil.rmtree(out)
    figures("distill SIGKILL then --resume", trials=trials, killed_mid_run=mid_run, survived=trials,
            epochs_lost=0)


def test_disk_full_is_a_clear_error_and_resume_finishes(reference, tmp_path, monkeypatch):
    cfg = extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N),), teacher="test_vit",
                                random_init=True, views=2, shard_size=S, batch_size=6, workers=0,
                                out=str(tmp_path / "cache"), progress=False)
    real = CacheStore.write_shard
    calls = []

    def full_disk(self, k, data, status):
        calls.append(k)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, k, data, status)

    monkeypatch.setattr(CacheStore, "write_shard", full_disk)
    with pytest.raises(CacheError, match="disk full.*run the same command again"):
        extract.run(cfg)
    status = CacheStore.open(tmp_path / "cache").status()
    assert (status[calls[2] * S:(calls[2] + 1) * S] == 0).all()  # the failed shard stays todo
    assert (status == 1).sum() == 2 * S  # the two shards written before are kept
    monkeypatch.undo()
    extract.run(cfg)
    figures("disk full", faults=1, survived=1, rows_lost=int((CacheStore.open(tmp_path / "cache").status() != 1).sum()))
    assert_same_cache(reference, tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_found_and_repair_recomputes_only_it(reference, tmp_path, damage):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    victim = out / "features" / "c" / "4" / "0" / "0"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3] if damage == "truncate" else
                       data[:40] + bytes(b ^ 0x5A for b in data[40:80]) + data[80:])
    proc = run_cli("info", "--cache", str(out), "--verify", check=False)
    assert proc.returncode == 1 and "shard 4" in proc.stdout and "shard 5" not in proc.stdout
    others = {p: p.stat().st_mtime_ns for p in (out / "features" / "c").rglob("*") if p.is_file() and p != victim}
    proc = run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--repair")
    assert "repair: shard 4" in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())  # only the damaged shard was rewritten
    assert_same_cache(reference, out)
    assert run_cli("info", "--cache", str(out), "--verify").returncode == 0
    figures(f"damaged shard ({damage})", found=1, repaired=1, other_shards_rewritten=0)


def test_malformed_tar_members_are_never_written_outside(reference, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    store = CacheStore.open(out, mode="r+")
    store.mark_todo(2)
    tar_path = out / "images" / "shard-00002.tar"
    tar_path.unlink()
    import io

    with tarfile.open(tar_path, "w") as tar:
        for name in ("../../escaped.txt", "/tmp/kdcache-absolute.txt", "000000016.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
    run_cli("extract", *ARGS, "--workers", "0", "--out", str(out))
    assert not (tmp_path / "escaped.txt").exists() and not (out / "escaped.txt").exists()
    assert not Path("/tmp/kdcache-absolute.txt").exists()
    assert_same_cache(reference, out)  # the shard was packed again from the dataset
    figures("malformed tar members", inputs_tried=3, written_outside=0)


def test_no_user_string_reaches_a_shell_and_no_pickle_is_read_from_a_cache():
    sources = list((ROOT / "kdcache").rglob("*.py")) + [ROOT / "cli.py"]
    text = {p: p.read_text() for p in sources}
    for p, src in text.items():
        assert "shell=True" not in src and "os.system(" not in src and "os.popen(" not in src, p
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), (p, m.group(0))
        assert "pickle.load(" not in src and "pickle.loads(" not in src, p  # the CIFAR reader uses a restricted one


def test_cache_of_other_preprocessing_is_refused(reference, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    before = read_all(out)
    proc = run_cli("extract", *ARGS, "--workers", "0", "--out", str(out), "--teacher-input-size", "96", check=False)
    assert proc.returncode == 2 and "teacher.preprocess" in proc.stderr and "--overwrite" in proc.stderr
    after = read_all(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    figures("mismatched preprocessing", refused=1, arrays_changed=0)

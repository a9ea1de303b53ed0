"""Caches on object storage: extract to, verify, resume and distil from s3:// on a real S3-compatible
server (moto's server mode, started here on a free local port; s3fs is the client)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import ROOT, TINY, assert_same_cache, cli_env, run_cli

N, S, V = 48, 8, 2
ARGS = TINY + ["--dataset-opt", f"n={N}", "--views", str(V), "--shard-size", str(S), "--batch-size", "6",
               "--workers", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; yields the environment a process needs to reach it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the moto S3 server did not start")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]).mkdir("caches")
    yield env
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def reach(s3, monkeypatch):
    """This test process reaches the server too (zarr and s3fs read the same configuration)."""
    import fsspec.config

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3["FSSPEC_S3_ENDPOINT_URL"]})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3


def _done_rows(url: str) -> int:
    try:
        return int((zarr.open_group(url, mode="r")["status"][:] == 1).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


@pytest.mark.s3
@pytest.mark.slow
def test_extract_to_s3_killed_then_resumed_equals_a_local_cache_and_distils(reach, tmp_path):
    local = tmp_path / "local"
    run_cli("extract", *ARGS, "--out", str(local))
    url = "s3://caches/tiny"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", *ARGS, "--out", url]
    proc = subprocess.Popen(cmd, env=cli_env(**reach), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while proc.poll() is None and _done_rows(url) < 2 * S and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < _done_rows(url) < N, "the kill must land part-way"

    run_cli("extract", *ARGS, "--out", url, env_extra=reach)  # resume: only the shards still to do
    assert_same_cache(local, url)
    import s3fs

    fs = s3fs.S3FileSystem()
    for k in range(N // S):  # the packed images are the same objects, byte for byte
        name = f"shard-{k:05d}.tar"
        assert fs.cat(f"caches/tiny/images/{name}") == (local / "images" / name).read_bytes(), name
    assert not fs.glob("caches/tiny/images/*.lock") and not fs.glob("caches/tiny/images/*.tmp")

    info = run_cli("info", "--cache", url, "--verify", "--json", env_extra=reach)
    assert json.loads(info.stdout)["complete"] and "verify" in info.stdout

    # damage one object: verify names its shard, --repair recomputes it, and the cache is whole again
    key = "caches/tiny/features/c/1/0/0"
    data = bytearray(fs.cat(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(key, bytes(data))
    bad = run_cli("info", "--cache", url, "--verify", check=False, env_extra=reach)
    assert bad.returncode != 0 and "shard 1" in bad.stdout + bad.stderr
    run_cli("extract", *ARGS, "--out", url, "--repair", env_extra=reach)
    assert_same_cache(local, url)

    run = tmp_path / "run"
    run_cli("distill", "--cache", url, "--student", "test_efficientnet", "--method", "kd", "--scenario", "ssl",
            "--labels-per-class", "2", "--epochs", "1", "--image-size", "32", "--workers", "1", "--no-progress",
            "--out", str(run), env_extra=reach)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["eval"]["top1"] <= 1.0 and np.isfinite(record["loss"])
    assert json.loads((run / "summary.json").read_text())["cache"] == url


def test_a_url_without_its_filesystem_package_is_refused_by_name(tmp_path):
    r = run_cli("extract", *ARGS, "--out", "nosuchfs://bucket/x", check=False)
    assert r.returncode == 2 and "nosuchfs://bucket/x" in r.stderr
    assert not (ROOT / "nosuchfs:").exists()


def test_memory_url_cache_equals_a_local_one(tmp_path):
    """fsspec's in-memory filesystem (no server, this process only) takes the object-storage code path: whole
    uploads, no locks. The cache equals a local one and verifies."""
    from kdcache.cacheinfo import verify
    from kdcache.datasets import create_dataset, row_permutation
    from kdcache.stages import extract
    from kdcache.cache.store import CacheStore

    def cfg(out):
        return extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", 24),), teacher="test_vit",
                                     random_init=True, views=2, shard_size=8, batch_size=6, workers=0, out=out,
                                     progress=False)

    url = f"memory://kdcache-test/{tmp_path.name}"
    extract.run(cfg(url))
    extract.run(cfg(str(tmp_path / "local")))
    assert_same_cache(tmp_path / "local", url)
    store = CacheStore.open(url)
    first = create_dataset("synthetic", n=24).samples[row_permutation(24, 0)[0]].key  # row 0: the shuffled order's
    assert verify(store) == [] and store.text("keys", 0, 1)[0] == first
    assert store.path.fs.cat(f"/kdcache-test/{tmp_path.name}/images/shard-00000.tar") == \
        (tmp_path / "local" / "images" / "shard-00000.tar").read_bytes()

"""Shared test helpers: tiny image trees, tiny teachers, subprocess runs of the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying an unreachable hub

try:  # generated cases (hypothesis): a few per property by default, many under HYPOTHESIS_PROFILE=slow (make test-slow)
    from hypothesis import settings

    settings.register_profile("quick", max_examples=25, deadline=None)
    settings.register_profile("slow", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
except ImportError:  # the test-only packages are not installed: the tests that use them say so
    pass


def write_image(path: Path, value: int, size=(24, 20), fmt=None) -> Path:
    """An image whose colour encodes `value` (recoverable from the pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = (value * 37) % 256
    arr[..., 1] = (value * 91) % 256
    arr[..., 2] = value % 256
    Image.fromarray(arr).save(path, format=fmt)
    return path


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(*args: str, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the CLI with `args`: in this process (typer's CliRunner, one thread, as the subprocess would
    use), or in a fresh interpreter when the call needs its own environment (`env_extra`) or working
    directory (`cwd`)."""
    if kw:
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                              env=cli_env(**kw.pop("env_extra", {})), cwd=kw.pop("cwd", ROOT), **kw)
    else:
        proc = _in_process(args)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _in_process(args) -> subprocess.CompletedProcess:
    import torch
    from typer.testing import CliRunner

    from kdcache.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives the subprocess: bit-identical to its outputs
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["kdcache", *args], result.exit_code, result.stdout, stderr)


def read_all(path) -> dict[str, np.ndarray]:
    """Every array of a cache, read with plain zarr (sub-groups included)."""
    out = {}

    def walk(group, prefix=""):
        for name, arr in group.arrays():
            out[prefix + name] = arr[...]
        for name, sub in group.groups():
            walk(sub, prefix + name + "/")

    walk(zarr.open_group(str(path), mode="r"))
    return out


def assert_same_cache(a, b) -> None:
    x, y = read_all(a), read_all(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype, name
        assert np.array_equal(x[name], y[name]), f"array {name} differs"


TINY = ["--dataset", "synthetic", "--teacher", "test_vit", "--random-init", "--no-progress"]


@pytest.fixture
def tiny_args():
    return list(TINY)


def tiny_extract_cfg(out, n: int, shard_size: int = 8, **kw):
    """The extract config of a tiny cache: `n` synthetic images, a random test_vit, 2 views, `shard_size` rows a
    shard, no workers (keyword arguments replace any field)."""
    from kdcache.stages import extract

    base = dict(dataset="synthetic", dataset_options=(("n", n),), teacher="test_vit", random_init=True, views=2,
                shard_size=shard_size, batch_size=6, workers=0, out=str(out), progress=False)
    return extract.ExtractConfig(**(base | kw))

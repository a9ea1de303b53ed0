"""The CLI's error boundary: which errors are the user's (one line, exit code 2) and which are bugs (one line
that says so, exit code 1), errors raised in DataLoader workers, and torchrun ranks that end with their
launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import ROOT

from kdcache import dist
from kdcache.cache.format import CacheError
from kdcache.cli import _errors, _from_worker, app
from kdcache.options import ConfigError


def _report_raising(monkeypatch, tmp_path, err: Exception):
    import kdcache.report

    def broken(*_):
        raise err

    monkeypatch.setattr(kdcache.report, "table", broken)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    return res.exit_code, res.stderr.strip()


@pytest.mark.parametrize("err", [ValueError("boom"), json.JSONDecodeError("Expecting value", "x", 0),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")])
def test_a_value_error_from_an_unexpected_place_is_a_bug(monkeypatch, tmp_path, err):
    """A ValueError that no check of kdcache raised (a library's, or an internal invariant's) is not shown as the
    user's mistake."""
    code, stderr = _report_raising(monkeypatch, tmp_path, err)
    assert code == 1 and "\n" not in stderr, stderr
    assert stderr.startswith(f"error: unexpected {type(err).__name__}: ") and "a bug in kdcache" in stderr \
        and "--debug" in stderr


@pytest.mark.parametrize("err", [ConfigError("--epochs: must be >= 1, got 0"), CacheError("no cache at /x")])
def test_an_error_of_the_users_input_is_one_line_exit_2(monkeypatch, tmp_path, err):
    assert _report_raising(monkeypatch, tmp_path, err) == (2, f"error: {err}")


def test_every_plain_value_error_left_in_kdcache_is_an_internal_check():
    """A check of the user's input raises the error class of what it checks (ConfigError, CacheError, ...);
    the plain ValueErrors left guard invariants that only a bug can break."""
    internal = {"datasets.py": 2, "adapt.py": 2, "methods/base.py": 1, "methods/customkd.py": 2,
                "methods/memory.py": 1, "train/ema.py": 1}  # ema: --ema's range is the schema's
    found = {}
    for path in (ROOT / "kdcache").rglob("*.py"):
        n = path.read_text().count("raise ValueError")
        if n:
            found[path.relative_to(ROOT / "kdcache").as_posix()] = n
    assert found == internal


# ---------------------------------------------------------------------------------- DataLoader workers

class _Raises(torch.utils.data.Dataset):
    def __init__(self, err: Exception):
        self.err = err

    def __len__(self):
        return 2

    def __getitem__(self, i):
        try:
            raise self.err
        except type(self.err) as e:  # a chained error: the last one is what the worker raised
            raise type(self.err)(*self.err.args) from e


def _from_loader(err: Exception) -> Exception:
    loader = torch.utils.data.DataLoader(_Raises(err), num_workers=1)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    assert "in DataLoader worker process 0" in str(caught.value)
    return caught.value


def _boundary(err: Exception, capsys) -> tuple[int, str]:
    with pytest.raises(typer.Exit) as ended:
        with _errors():
            raise err
    return ended.value.exit_code, capsys.readouterr().err.strip()


def test_a_user_error_raised_in_a_dataloader_worker_is_its_own_one_line(capsys):
    raised = _from_loader(CacheError("shard 3 of features differs from its digest;\nfix with `extract --repair`"))
    assert isinstance(raised, CacheError) and "Original Traceback" in str(raised)
    assert _boundary(raised, capsys) == (2, "error: shard 3 of features differs from its digest; fix with "
                                            "`extract --repair`")


def test_a_bug_raised_in_a_dataloader_worker_names_its_type_and_message(capsys):
    assert _boundary(_from_loader(ValueError("boom")), capsys) == (
        1, "error: unexpected ValueError: boom (a bug in kdcache: rerun with --debug for the traceback and report it)")
    code, line = _boundary(_from_loader(KeyError("rows")), capsys)
    assert code == 1 and line.startswith("error: unexpected KeyError: 'rows' (a bug")


def test_a_full_disk_in_a_worker_is_still_the_machines_and_an_unmakeable_error_keeps_its_name(capsys):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    original, name, text = _from_worker(_from_loader(full))
    assert isinstance(original, OSError) and original.errno == errno.ENOSPC
    assert (name, text) == ("OSError", "[Errno 28] No space left on device")
    assert _boundary(_from_loader(full), capsys) == (2, "error: [Errno 28] No space left on device")

    class TwoArgs(Exception):  # cannot be made from one string: torch raises a RuntimeError instead
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    wrapped = RuntimeError("Caught TwoArgs in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                           "last):\n  File \"x.py\", line 1, in f\n    g()\ntests.TwoArgs: one and two\n")
    assert _from_worker(wrapped)[1:] == ("TwoArgs", "one and two")
    code, line = _boundary(wrapped, capsys)
    assert code == 1 and line.startswith("error: unexpected TwoArgs: one and two (a bug")


def test_an_error_not_from_a_worker_is_left_as_it_is():
    err = ValueError("Caught nothing here")
    assert _from_worker(err) == (err, "ValueError", "Caught nothing here")


# ---------------------------------------------------------------------------------- torchrun ranks

class _Libc:
    def __init__(self):
        self.calls = []

    def prctl(self, *args):
        self.calls.append(args)
        return 0


@pytest.mark.parametrize("platform, env, called", [
    ("linux", {"LOCAL_RANK": "0"}, True), ("linux", {"TORCHELASTIC_RUN_ID": "x"}, True),
    ("linux", {}, False), ("darwin", {"LOCAL_RANK": "0"}, False), ("win32", {"LOCAL_RANK": "0"}, False)])
def test_a_torchrun_rank_on_linux_asks_for_sigterm_when_its_parent_dies(monkeypatch, platform, env, called):
    import ctypes

    libc = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: libc)
    monkeypatch.setattr(sys, "platform", platform)
    for k in list(os.environ):
        if k == "LOCAL_RANK" or k.startswith("TORCHELASTIC_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.end_with_launcher() is called
    assert libc.calls == ([(dist.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)] if called else [])


CHILD = "import time, kdcache.dist as d; print(d.end_with_launcher(), flush=True); time.sleep(120)"
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be collected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_whose_launcher_is_killed_ends_too():
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOCAL_RANK="0", OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    child = None
    try:
        pid, asked = parent.stdout.readline().split()
        child = int(pid)
        assert asked == "True" and _alive(child)
        parent.send_signal(signal.SIGKILL)  # no chance to end its child itself
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)

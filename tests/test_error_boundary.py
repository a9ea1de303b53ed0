"""The CLI's error boundary: which errors are the user's (one line, exit code 2) and which are bugs (one line
that says so, exit code 1)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import ROOT

from kdcache.cache.format import CacheError
from kdcache.cli import app
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
                "methods/memory.py": 1}
    found = {}
    for path in (ROOT / "kdcache").rglob("*.py"):
        n = path.read_text().count("raise ValueError")
        if n:
            found[path.relative_to(ROOT / "kdcache").as_posix()] = n
    assert found == internal

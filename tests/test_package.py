"""kdcache installs as one package with a console script; the checkout's entry points are the same command."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT, cli_env


def test_wheel_holds_one_package_and_the_console_script(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "kdcache", src / "kdcache", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"kdcache"}, top  # no generic top-level names (pipeline, stages, cli) on sys.path
    for module in ("kdcache/cli.py", "kdcache/cache/store.py", "kdcache/methods/customkd.py", "kdcache/stages/distill.py",
                   "kdcache/train/session.py", "kdcache/extract/work.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[console_scripts]" in text and "kdcache = kdcache.cli:run" in text


def test_python_m_kdcache_and_cli_py_are_the_same_command():
    outs = []
    for args in (["-m", "kdcache", "--help"], [str(ROOT / "cli.py"), "--help"]):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    for out in outs:
        assert "extract" in out and "distill" in out and "evaluate" in out
    proc = subprocess.run([sys.executable, "-c", "import kdcache, kdcache.stages.distill; print(kdcache.__version__)"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
